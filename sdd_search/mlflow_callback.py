"""The Tune callback that records every trial in MLflow, from the search's driver process.

A nested MLflow run per trial (see :mod:`sdd_search.tracking`): its knobs and whole
configuration as params, one step per epoch, where rank 0 trained as ``sys.*`` tags, and how
it ended (completed, stopped by the scheduler or a non-finite loss, failed with a one-line
reason). It also keeps each trial's wall-clock marks for :func:`sdd_search.overhead.summarise`.

Every MLflow call goes through a :class:`sdd_search.tracking_buffer.TrackingBuffer` as a small
operation (open a run, log an epoch, set tags, end a run), in the order Tune reported: while the
tracking server is away the trials keep training and the operations wait, and once it is back
every epoch is logged once. An epoch is logged only if the run holds no later one: a replayed
epoch after a restart is dropped, and so is an epoch trained again after its trial fell back to
an older checkpoint (``sdd_search.restore``): MLflow keeps the values it first logged for it.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from ray.tune import Callback

from sdd_search.space import (
    FINAL_KEY,
    FINAL_ROLE,
    SEARCH_ROLE,
    config_of,
    role_of,
    searched_params,
    trial_display_name,
)
from sdd_search.tracking import (
    TAG_FINAL_ENTRY,
    TAG_FINAL_ROLE,
    TAG_SEED,
    TAG_SELECTION_SCORE,
    TAG_SOURCE_TRIAL,
    TAG_STATUS,
    SearchTracker,
    flatten,
)
from sdd_search.tracking_buffer import (
    TrackingBuffer,
    TrackingUnavailableError,
    failing_fast,
    is_unreachable,
)
from sdd_search.trial import TIMING_PREFIX, WORKER_FACTS

# The result keys logged as per-epoch MLflow metrics.
LOGGED_METRICS = {
    "train_loss",
    "train_ce",
    "train_kd",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "best_val_top1",
    "test_loss",  # the final stage's, at its last epoch only
    "test_top1",
    "test_top5",
    "lr",
    "epoch_seconds",
    "train_images_per_second",
}


class MlflowTrialCallback(Callback):
    """Tune callback: a nested MLflow run per trial with params, per-epoch metrics and status.

    ``uri``: the MLflow tracking URI; ``experiment``: the MLflow experiment's name;
    ``search_id``: the search's experiment path (tags its runs); ``outage_seconds``: how long
    the tracking server may stay away before the search stops (``tracking.outage_seconds``).
    Picklable (Tune stores its callbacks in the experiment state): the MLflow client is made
    lazily from these plain settings; what waits for the server is saved with Tune's state.
    """

    def __init__(self, uri: str, experiment: str, search_id: str, outage_seconds: float = 600.0):
        self.uri, self.experiment, self.search_id = uri, experiment, search_id
        self._tracker: SearchTracker | None = None
        self.buffer = TrackingBuffer(outage_seconds, uri)
        self._opened: set[str] = set()  # trials whose run this driver opened
        self._stopped = False  # the server stayed away too long: nothing more is tried
        self._done_before: set[str] | None = None  # trials a restored experiment had finished
        # trial id -> wall-clock marks (seconds since the epoch) and summed loop seconds
        self.timings: dict[str, dict[str, float]] = {}
        self.logged_epochs: dict[str, int] = {}
        self.ended: set[str] = set()  # trials that ended in this driver
        self.fit_started = time.time()

    def setup(self, **info):
        self.fit_started = time.time()
        self._done_before = None  # each fit (references, search, final) has its own trials

    def has_ended(self, trial_id: str) -> bool:
        """Whether a trial ran to its end (completed, stopped early or failed for good): in
        this driver, or in an earlier one, as its MLflow run's status tag says. A trial that an
        interrupted fit left running has not."""
        if trial_id in self.ended:
            return True
        if self.buffer.pending or self.buffer.down_for:  # the server is away: not known here
            return False  # (an interrupted search: --resume asks again)
        with failing_fast():
            try:
                run_id = self.tracker.run_id_of(trial_id)
                if run_id is None:
                    return False
                status = self.tracker.client.get_run(run_id).data.tags.get(TAG_STATUS)
            except Exception as error:  # noqa: BLE001 (only an unreachable server is swallowed)
                if is_unreachable(error):
                    return False
                raise
        return status in ("completed", "stopped", "failed")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tracker"] = None
        return state

    @property
    def tracker(self) -> SearchTracker:
        if self._tracker is None:
            tracker = SearchTracker(self.uri, self.experiment, self.search_id)
            tracker.start_parent("", {}, "", "")
            self._tracker = tracker  # only once the server answered both
        return self._tracker

    # -- the operations, sent in order through the buffer -----------------------------------

    def _submit(self, *operation) -> None:
        if not self._stopped:
            try:
                self.buffer.submit(operation, self._send)
            finally:
                self._say_notices()

    def _say_notices(self) -> None:
        """The buffer's lines (the server away, back) on the search's output: above the live
        view in a terminal (it redirects stdout there), one plain line each elsewhere."""
        for line in self.buffer.take_notices():
            print(line, flush=True)

    def _send(self, operation: tuple) -> None:
        """Perform one operation: ("run", trial id, name, role, params, tags), ("epoch", trial
        id, epoch, metrics, timestamp ms), ("tags", trial id, tags) or ("end", trial id,
        status, reason)."""
        kind, trial_id, *args = operation
        if kind == "run":
            self.tracker.trial_run(trial_id, *args)
            return
        run_id = self.tracker.run_id_of(trial_id)
        if run_id is None:  # never opened (an operation of a run that no store holds)
            return
        if kind == "epoch":
            epoch, metrics, timestamp_ms = args
            if epoch <= self._logged_epoch(trial_id, run_id):
                return  # a replay after a restart, or redone after a fallback: MLflow has it
            self.tracker.log_epoch(run_id, metrics, step=epoch, timestamp_ms=timestamp_ms)
            self.logged_epochs[trial_id] = epoch
        elif kind == "tags":
            self.tracker.set_tags(run_id, args[0])
        elif kind == "end":
            self.tracker.end_trial(run_id, *args)

    def _run(self, trial) -> None:
        """Open the trial's MLflow run: created once, found again (and marked running) after."""
        config = trial.config
        params = {
            **{f"knob.{k}": v for k, v in searched_params(config).items()},
            **flatten(config_of(config).model_dump(mode="json")),
        }
        role = {SEARCH_ROLE: "trial", FINAL_ROLE: "final"}.get(role_of(config), "reference")
        name = trial_display_name(config, trial.trial_id)
        self._opened.add(trial.trial_id)
        self._submit("run", trial.trial_id, name, role, params, _final_tags(config))

    def _open(self, trial) -> None:
        if trial.trial_id not in self._opened:
            self._run(trial)

    def get_state(self) -> dict:
        """What waits for the tracking server: Tune saves it with the experiment's state."""
        return {"pending": list(self.buffer.pending)}

    def set_state(self, state: dict) -> None:
        self.buffer.restore(state.get("pending", []))

    def on_step_begin(self, iteration, trials, **info):
        """Try again what waits (when due); stop the search once the server stayed away too
        long (raised here, in Tune's loop, it ends the fit; Tune's last saved state resumes)."""
        if self._done_before is None:
            self._done_before = {t.trial_id for t in trials if t.status in _ENDED}
        if self._stopped:
            return
        try:
            self.buffer.flush(self._send)
            self.buffer.check()
        except TrackingUnavailableError:
            self._stopped = True
            raise
        finally:
            self._say_notices()

    def on_experiment_end(self, trials, **info):
        """Send everything before the fit returns (the search reads MLflow next). A fit that
        ended with trials unfinished (Ctrl-C: Tune marks them terminated as it cleans up, but
        this driver saw no end of theirs) does not wait for the server: Tune saved what waits
        with its state just before, and the resumed driver sends it."""
        if self._stopped:
            return
        done = self.ended | (self._done_before or set())
        try:
            if any(t.trial_id not in done for t in trials):
                self.buffer.flush(self._send, now=True)
                return
            self.buffer.drain(self._send)
        except TrackingUnavailableError:
            self._stopped = True
            raise
        finally:
            self._say_notices()

    # -- what Tune reports -------------------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run(trial)
        self.timings.setdefault(trial.trial_id, {"trial_started": time.time()})
        self._submit(
            "tags",
            trial.trial_id,
            {"sdd_search.status": "running", "ray.trial_path": trial.path or ""},
        )

    def on_trial_restore(self, iteration, trials, trial, **info):
        self.on_trial_start(iteration, trials, trial)

    def _logged_epoch(self, trial_id: str, run_id: str) -> int:
        """The last epoch this trial's run holds (read from MLflow once per driver)."""
        if trial_id not in self.logged_epochs:
            history = self.tracker.client.get_metric_history(run_id, "train_loss")  # each epoch
            self.logged_epochs[trial_id] = max((m.step for m in history), default=0)
        return self.logged_epochs[trial_id]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._open(trial)
        if result.get("nonfinite_loss"):
            return
        epoch = int(result.get("epoch", 0) or 0)
        keep = {k: v for k, v in result.items() if k in LOGGED_METRICS}
        # The timestamp is the result's: sent again after a lost answer, it is the same metric.
        self._submit("epoch", trial.trial_id, epoch, keep, int(time.time() * 1000))
        # Where rank 0 trains (its first epoch after every start, so a restart on another node
        # updates them), the world size, and how a restart found its checkpoints.
        tags = {tag: str(result[key]) for key, tag in WORKER_FACTS.items() if key in result}
        if "world_size" in result:
            tags["sys.world_size"] = str(int(result["world_size"]))
        if tags:
            self._submit("tags", trial.trial_id, tags)
        if not result.get("replayed"):
            self._time(trial.trial_id, result)

    def _time(self, trial_id: str, result: dict) -> None:
        """Add a trained epoch's loop seconds and the worker's start-up marks to the trial's."""
        timing = self.timings.setdefault(trial_id, {"trial_started": time.time()})
        timing["loop_seconds"] = timing.get("loop_seconds", 0.0) + float(
            result.get("epoch_seconds", 0.0)
        )
        timing["last_result"] = time.time()
        for key, value in result.items():
            if key.startswith(TIMING_PREFIX) and isinstance(value, (int, float)):
                timing[key[len(TIMING_PREFIX) :]] = float(value)
        if "driver_created" in timing:
            # Tune calls on_trial_start once the trial's actor is up: its start-up counts
            # from the actor process's creation (Ray may hand over an idle process made
            # earlier, so never before this Tuner started).
            created = max(timing.pop("driver_created"), self.fit_started)
            timing["trial_started"] = min(timing["trial_started"], created)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._open(trial)
        last = trial.last_result or {}
        epoch = int(last.get("epoch", 0) or 0)
        epochs = config_of(trial.config).train.epochs  # the trial's own: the search may be shorter
        timing = self.timings.setdefault(trial.trial_id, {"trial_started": time.time()})
        timing["trial_ended"] = time.time()
        self.ended.add(trial.trial_id)
        if last.get("nonfinite_loss"):
            ending = ("STOPPED", last.get("stop_reason", "non-finite loss"))
        elif epoch >= epochs:
            ending = ("COMPLETED", None)
        else:
            ending = ("STOPPED", f"early-stopped by the scheduler after epoch {epoch} of {epochs}")
        self._submit("end", trial.trial_id, *ending)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._open(trial)
        self.ended.add(trial.trial_id)
        self._submit("end", trial.trial_id, "FAILED", error_summary(trial))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._open(trial)
        self._submit(
            "tags",
            trial.trial_id,
            {"sdd_search.retried": "yes", "sdd_search.last_error": error_summary(trial)},
        )


_ENDED = ("TERMINATED", "ERROR")  # Tune's statuses of a trial that will not run again


def _final_tags(config: dict) -> dict[str, str]:
    """A final-stage run's place: its configuration, role, seed, search trial and score."""
    if role_of(config) != FINAL_ROLE:
        return {}
    entry = config[FINAL_KEY]
    score = entry["selection_score"]
    return {
        TAG_FINAL_ENTRY: entry["entry"],
        TAG_FINAL_ROLE: entry["role"],
        TAG_SEED: str(entry["seed"]),
        TAG_SOURCE_TRIAL: entry["source_trial"],
        TAG_SELECTION_SCORE: "" if score is None else repr(float(score)),
    }


def error_summary(trial) -> str:
    """A Tune trial's error (the exception) in one line, for a reason tag and the live view."""
    text = ""
    try:
        path = trial.error_file
        if path and os.path.exists(path):
            text = Path(path).read_text()
    except Exception:
        text = ""
    if not text:
        error = getattr(trial, "get_error", lambda: None)()
        text = str(error or "unknown error")
    return summarize_error(text)


# An exception's own line: "RuntimeError: ...", "ray.train.WorkerGroupError: ...".
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")
# Lines of Ray's error reports that frame the detail rather than state it: "[Rank 0 Error
# Snippet]:", "Worker info: Worker(", its indented fields and closing ")", "\tpid: 123".
_FRAME_LINE = re.compile(r"^(\[.*\]:|Worker info:|\)|\s)")


def summarize_error(text: str) -> str:
    """The last exception line of a traceback or of Ray's error report, in at most 1000
    characters. Where that line only announces its detail (Ray's "Training failed due to
    worker errors:"), the detail's own sentences follow it on the same line (a placement group
    removed, a worker that died), without the report's framing."""
    raw = [line.rstrip() for line in text.strip().splitlines()]
    lines = [line for line in raw if line.strip()]
    if not lines:
        return "unknown error"
    headers = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)]
    if not headers:
        flagged = [line for line in lines if "Error" in line or "Exception" in line]
        return (flagged or lines)[-1].strip()[:1000]
    start = headers[-1]
    summary = lines[start].strip()
    if summary.endswith(":"):
        detail = [line.strip() for line in lines[start + 1 :] if not _FRAME_LINE.match(line)]
        summary = " ".join([summary, *detail])
    return summary[:1000]
