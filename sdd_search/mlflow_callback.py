"""The Tune callback that records every trial in MLflow, from the search's driver process.

A nested MLflow run per trial (see :mod:`sdd_search.tracking`): its knobs and whole
configuration as params, one step per epoch, where rank 0 trained as ``sys.*`` tags, and how
it ended (completed, stopped by the scheduler or a non-finite loss, failed with a one-line
reason). It also keeps each trial's wall-clock marks for :func:`sdd_search.overhead.summarise`.
"""

from __future__ import annotations

import os
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
    SearchTracker,
    flatten,
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
    ``search_id``: the search's experiment path (tags its runs). Picklable (Tune stores its callbacks in the experiment
    state): the MLflow client is made lazily from these plain settings.
    """

    def __init__(self, uri: str, experiment: str, search_id: str):
        self.uri, self.experiment, self.search_id = uri, experiment, search_id
        self._tracker: SearchTracker | None = None
        # trial id -> wall-clock marks (seconds since the epoch) and summed loop seconds
        self.timings: dict[str, dict[str, float]] = {}
        self.logged_epochs: dict[str, int] = {}
        self.fit_started = time.time()

    def setup(self, **info):
        self.fit_started = time.time()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tracker"] = None
        return state

    @property
    def tracker(self) -> SearchTracker:
        if self._tracker is None:
            self._tracker = SearchTracker(self.uri, self.experiment, self.search_id)
            self._tracker.start_parent("", {}, "", "")
        return self._tracker

    def _run(self, trial) -> str:
        config = trial.config
        params = {
            **{f"knob.{k}": v for k, v in searched_params(config).items()},
            **flatten(config_of(config).model_dump(mode="json")),
        }
        role = {SEARCH_ROLE: "trial", FINAL_ROLE: "final"}.get(role_of(config), "reference")
        name = trial_display_name(config, trial.trial_id)
        return self.tracker.trial_run(trial.trial_id, name, role, params, _final_tags(config))

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        self.timings.setdefault(trial.trial_id, {"trial_started": time.time()})
        self.tracker.set_tags(
            run_id, {"sdd_search.status": "running", "ray.trial_path": trial.path or ""}
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
        run_id = self._run(trial)
        if result.get("nonfinite_loss"):
            return
        epoch = int(result.get("epoch", 0) or 0)
        if epoch <= self._logged_epoch(trial.trial_id, run_id):
            return  # a replay after a restart: MLflow has this epoch already
        self.logged_epochs[trial.trial_id] = epoch
        keep = {k: v for k, v in result.items() if k in LOGGED_METRICS}
        self.tracker.log_epoch(run_id, keep, step=epoch, timestamp_ms=int(time.time() * 1000))
        # Where rank 0 trains (its first epoch after every start, so a restart on another node
        # updates them), and the world size.
        tags = {tag: str(result[key]) for key, tag in WORKER_FACTS.items() if key in result}
        if "world_size" in result:
            tags["sys.world_size"] = str(int(result["world_size"]))
        if tags:
            self.tracker.set_tags(run_id, tags)
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
        run_id = self._run(trial)
        last = trial.last_result or {}
        epoch = int(last.get("epoch", 0) or 0)
        epochs = config_of(trial.config).train.epochs  # the trial's own: the search may be shorter
        timing = self.timings.setdefault(trial.trial_id, {"trial_started": time.time()})
        timing["trial_ended"] = time.time()
        if last.get("nonfinite_loss"):
            self.tracker.end_trial(run_id, "STOPPED", last.get("stop_reason", "non-finite loss"))
        elif epoch >= epochs:
            self.tracker.end_trial(run_id, "COMPLETED")
        else:
            self.tracker.end_trial(
                run_id,
                "STOPPED",
                f"early-stopped by the scheduler after epoch {epoch} of {epochs}",
            )

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        self.tracker.end_trial(run_id, "FAILED", error_summary(trial))

    def on_trial_recover(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        self.tracker.set_tags(
            run_id, {"sdd_search.retried": "yes", "sdd_search.last_error": error_summary(trial)}
        )


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
    """The last meaningful line of a Tune trial's error (the exception), for a one-line reason."""
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
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line[:1000]
    return (lines[-1] if lines else "unknown error")[:1000]
