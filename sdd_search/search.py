"""The search: Ray Tune + Optuna choose SDD's knobs, Ray Train trains each trial, MLflow records.

Data flow (shared/DESIGN.md): spec -> Tuner(OptunaSearch, ASHA) -> per trial a TorchTrainer
running :func:`sdd_search.train.run_trial` on every worker -> metrics + a checkpoint each epoch
-> MLflow (a Tune callback in this driver process) -> leaderboard and registered students.

Ray stays at the edges: the model, loss and loop are plain PyTorch in train.py.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune import Callback

from sdd_search.config import TrialConfig
from sdd_search.spec import BASE_SPECIFIC, SEARCHABLE, Spec, resolved_plan
from sdd_search.tracking import SearchTracker, flatten
from sdd_search.trial import (
    PHASES,
    REFERENCE_NAMES,
    ROLE_KEY,
    TIMING_PREFIX,
    TRIAL_KEY,
    WORKER_FACTS,
    config_of,
    encode_choice,
    phase_seconds,
    searched_params,
    trial_driver,
)

# Ray Train settings for a Ray this search starts itself (one machine; a cluster keeps Ray's
# defaults). No spot-preemption watcher (one more process per trial, and nothing to preempt);
# a 1 s controller poll instead of 2 s (reports and the end of a trial arrive sooner).
LOCAL_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
}


HEAD_NODE_RESOURCE = "node:__internal_head__"  # every Ray head node has 1 of it
# Memory a running trial's processes take on its driver's node: Tune's trial actor (~140 MB)
# and result queue (~60 MB), Train's controller (~120 MB) and sync actor (~110 MB): unique set
# sizes measured with Ray 2.60, rounded up for headroom.
DRIVER_SIDE_BYTES = 600 * 2**20


class SearchError(RuntimeError):
    """A search that cannot start or continue; the message says what to do."""


# --------------------------------------------------------------------------------------------
# The search space


class SpaceSampler:
    """Optuna define-by-run space: base-specific knobs are only sampled for their base.

    A plain class (not a closure) because Tune pickles the searcher into its experiment state.
    """

    def __init__(self, space: dict[str, dict], defaults: dict[str, Any]):
        self.space = space
        self.defaults = defaults  # the spec's own value of every searched knob

    def __call__(self, trial) -> dict[str, Any]:
        base = self.defaults.get("base")
        unsampled = {}
        ordered = sorted(self.space, key=lambda k: k != "base")  # base first: others depend on it
        for knob in ordered:
            space = self.space[knob]
            if knob in BASE_SPECIFIC and BASE_SPECIFIC[knob] != base:
                unsampled[knob] = self.defaults[knob]  # unused by this base; kept for the record
                continue
            if space.get("choices") is not None:
                value = trial.suggest_categorical(
                    knob, [encode_choice(knob, c) for c in space["choices"]]
                )
            elif space.get("type") == "int":
                value = trial.suggest_int(
                    knob,
                    int(space["low"]),
                    int(space["high"]),
                    step=int(space.get("step") or 1),
                    log=space["log"],
                )
            else:
                step = space.get("step")
                value = trial.suggest_float(
                    knob,
                    space["low"],
                    space["high"],
                    log=space["log"],
                    step=None if space["log"] else step,
                )
            if knob == "base":
                base = value
        return unsampled


def baseline_point(spec: Spec) -> dict[str, Any]:
    """The spec's own values for every searched knob: evaluated first."""
    trial = spec.trial
    point = {}
    for knob in spec.space:
        section = getattr(trial, SEARCHABLE[knob])
        point[knob] = encode_choice(knob, getattr(section, knob))
    return point


# --------------------------------------------------------------------------------------------
# What runs on the cluster: sdd_search.trial (kept light: every trial imports it afresh)


def _teacher_state(trial: TrialConfig) -> dict | None:
    """The teacher's weights as numpy arrays: read zero-copy from each node's object store."""
    from sdd_search.teacher import ensure_teacher, load_teacher

    if trial.distill.method == "none" and trial.teacher.source != "torchvision":
        return None
    teacher = load_teacher(trial.teacher, _dataset_info(trial).num_classes, ensure_teacher(trial))
    return {k: v.detach().cpu().numpy() for k, v in teacher.state_dict().items()}


def _dataset_info(trial: TrialConfig):
    from sdd_search.data import dataset_info

    data = trial.data
    return dataset_info(
        data.dataset,
        data.root,
        data.image_size,
        synthetic_num_classes=data.synthetic_num_classes,
        synthetic_size=data.synthetic_size,
    )


# --------------------------------------------------------------------------------------------
# MLflow from the driver


class MlflowTrialCallback(Callback):
    """Tune callback: a nested MLflow run per trial with params, per-epoch metrics and status.

    Picklable (Tune stores its callbacks in the experiment state): the MLflow client is made
    lazily from plain settings.
    """

    def __init__(self, uri: str, experiment: str, search_id: str, epochs: int, base_trial: dict):
        self.uri, self.experiment, self.search_id = uri, experiment, search_id
        self.epochs = epochs
        self.base_trial = base_trial
        self._tracker: SearchTracker | None = None
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
        role = config.get(ROLE_KEY, "search")
        name = f"trial-{trial.trial_id}" if role == "search" else f"reference-{role}"
        params = {
            **{f"knob.{k}": v for k, v in searched_params(config).items()},
            **flatten(config_of(config).model_dump(mode="json")),
        }
        return self.tracker.trial_run(
            trial.trial_id, name, "trial" if role == "search" else "reference", params
        )

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
            history = self.tracker.client.get_metric_history(run_id, "val_top1")
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
        keep = {k: v for k, v in result.items() if k in _LOGGED_METRICS}
        self.tracker.log_epoch(run_id, keep, step=epoch, timestamp_ms=int(time.time() * 1000))
        # Where rank 0 trains (its first epoch after every start, so a restart on another node
        # updates them), and the world size.
        tags = {tag: str(result[key]) for key, tag in WORKER_FACTS.items() if key in result}
        if "world_size" in result:
            tags["sys.world_size"] = str(int(result["world_size"]))
        if tags:
            self.tracker.set_tags(run_id, tags)
        if not result.get("replayed"):
            timing = self.timings.setdefault(trial.trial_id, {"trial_started": time.time()})
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
        timing = self.timings.setdefault(trial.trial_id, {"trial_started": time.time()})
        timing["trial_ended"] = time.time()
        if last.get("nonfinite_loss"):
            self.tracker.end_trial(run_id, "STOPPED", last.get("stop_reason", "non-finite loss"))
        elif epoch >= self.epochs:
            self.tracker.end_trial(run_id, "COMPLETED")
        else:
            self.tracker.end_trial(
                run_id,
                "STOPPED",
                f"early-stopped by the scheduler after epoch {epoch} of {self.epochs}",
            )

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        self.tracker.end_trial(run_id, "FAILED", _error_summary(trial))

    def on_trial_recover(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        self.tracker.set_tags(
            run_id, {"sdd_search.retried": "yes", "sdd_search.last_error": _error_summary(trial)}
        )


_LOGGED_METRICS = {
    "train_loss",
    "train_ce",
    "train_kd",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "best_val_top1",
    "lr",
    "epoch_seconds",
    "train_images_per_second",
}


def _error_summary(trial) -> str:
    """The last meaningful line of a trial's error (the exception), for a one-line reason."""
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


# --------------------------------------------------------------------------------------------
# The search


@dataclass
class SearchOutcome:
    experiment_path: str
    parent_run_id: str
    leaderboard: list[dict[str, Any]]
    best_student_path: str | None
    registered: list[tuple[str, str]] = field(default_factory=list)  # (trial_id, version)
    tracking_uri: str = ""
    wall_seconds: float = 0.0
    overhead: dict[str, float] = field(default_factory=dict)


def driver_resources(head_memory: float | None, concurrent: int) -> dict[str, float]:
    """What each trial's Tune driver holds (its Train controller runs on the same node).

    No CPU: it only waits on its Train workers, and k trials of n CPUs each must fit on k * n
    CPUs; a token of memory gives its bundle a resource. On a cluster (``head_memory``: the
    head node's memory in bytes) whose head can hold every concurrent trial's driver-side
    processes with room to spare, a sliver of the head's own resource as well: a lost worker
    node then costs its trials a Train restart from the last checkpoint, never a Tune retry of
    the whole trial. A smaller head leaves the drivers to Ray, spread over the workers.
    """
    resources = {"memory": 1.0}
    if head_memory is not None and concurrent * DRIVER_SIDE_BYTES <= 0.5 * head_memory:
        resources[HEAD_NODE_RESOURCE] = 0.001
    return resources


def _head_memory() -> float | None:
    """The Ray head node's memory in bytes (None if the cluster reports no head)."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and HEAD_NODE_RESOURCE in node.get("Resources", {}):
            return float(node["Resources"].get("memory", 0.0)) or None
    return None


def _setup(spec: Spec, num_classes: int) -> dict:
    return {
        "name": spec.name,
        "resources": spec.resources.model_dump(),
        "train_storage": f"{spec.experiment_path()}/train",
        "num_classes": num_classes,
        "metric": spec.search.metric,
    }


def _tune_config(spec: Spec):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    sampler = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=spec.search.seed, multivariate=True),
        "random": lambda: optuna.samplers.RandomSampler(seed=spec.search.seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=spec.search.seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=spec.search.seed),
    }[spec.search.sampler]()
    space = {k: v.model_dump() for k, v in spec.space.items()}
    searcher = None
    if space:
        searcher = OptunaSearch(
            space=SpaceSampler(space, {**baseline_point(spec), "base": spec.distill.base}),
            metric=spec.search.metric,
            mode=spec.search.mode,
            sampler=sampler,
            points_to_evaluate=[baseline_point(spec)] if spec.search.baseline_first else None,
        )
    if spec.search.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="epoch",
            # One past the last epoch: a trial that reaches the end finishes by itself (a clean
            # Train shutdown) instead of being stopped, i.e. killed, by the scheduler.
            max_t=spec.train.epochs + 1,
            grace_period=spec.search.grace_period,
            reduction_factor=spec.search.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return tune.TuneConfig(
        metric=spec.search.metric,
        mode=spec.search.mode,
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=spec.search.num_trials,
        max_concurrent_trials=spec.search.max_concurrent,
        trial_name_creator=_trial_name,
        trial_dirname_creator=_trial_name,
    )


def _reporter(knobs: list[str]):
    """A live trial table with the searched knobs and the metrics that matter, not the config."""
    from ray.tune import CLIReporter

    return CLIReporter(
        metric_columns={
            "epoch": "epoch",
            "val_top1": "val top-1",
            "best_val_top1": "best",
            "train_loss": "loss",
        },
        parameter_columns={k: k for k in [ROLE_KEY, *knobs]},
        max_report_frequency=30,
        sort_by_metric=True,
        max_progress_rows=30,
        max_column_length=12,
    )


def _trial_name(trial) -> str:
    role = trial.config.get(ROLE_KEY, "search")
    return f"{role}-{trial.trial_id}" if role != "search" else f"trial-{trial.trial_id}"


def _fit(name: str, spec: Spec, trainable, param_space: dict, tune_config, callback, resume: bool):
    """Start or resume one Tune experiment under the spec's storage."""
    from ray import tune

    path = f"{spec.experiment_path()}/{name}"
    if tune.Tuner.can_restore(path):
        if not resume:
            raise SearchError(
                f"search {spec.name!r} already exists at {path}; run again with --resume to continue "
                f"it, or change name: / --set name=... to start another"
            )
        tuner = tune.Tuner.restore(
            path,
            trainable=trainable,
            param_space=param_space,
            resume_unfinished=True,
            resume_errored=True,
        )
        # The restored run config holds an unpickled copy of the callback; use this run's.
        tuner._local_tuner.get_run_config().callbacks = [callback]
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune_config,
            run_config=tune.RunConfig(
                name=name,
                storage_path=spec.experiment_path(),
                callbacks=[callback],
                failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                progress_reporter=_reporter(list(spec.space) if name == "search" else []),
                verbose=1,
            ),
        )
    return tuner.fit()


def _rows(results, role_of) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        metrics = result.metrics or {}
        config = result.config or {}
        frame = result.metrics_dataframe
        best = (
            float(frame["val_top1"].max())
            if frame is not None and "val_top1" in frame
            else float("nan")
        )
        rows.append(
            {
                "trial": metrics.get("trial_id", ""),
                "role": role_of(config),
                "status": "error"
                if result.error
                else ("nan" if metrics.get("nonfinite_loss") else "done"),
                "epochs": int(frame["epoch"].max())
                if frame is not None and "epoch" in frame and frame["epoch"].notna().any()
                else 0,
                "val_top1": float(metrics.get("val_top1", float("nan"))),
                "best_val_top1": best,
                "params": searched_params(config),
                "checkpoint": metrics.get("checkpoint_path"),
            }
        )
    return rows


def format_leaderboard(rows: list[dict[str, Any]], metric_name: str = "val_top1") -> str:
    header = (
        f"{'rank':>4}  {'trial':<18} {'epochs':>6} {'final top-1':>11} {'best top-1':>10}  knobs"
    )
    lines = [header, "-" * len(header)]
    rank = 0
    for row in rows:
        searched = row["role"] == "search"
        rank += searched
        base = row["params"].get("base")
        shown = {  # a knob of another base loss was not used by this trial
            k: v
            for k, v in row["params"].items()
            if k not in BASE_SPECIFIC or not base or BASE_SPECIFIC[k] == base
        }
        knobs = ", ".join(f"{k}={_short(v)}" for k, v in shown.items()) or "(spec values)"
        name = row["trial"] if searched else f"[{row['role']}]"
        place = str(rank) if searched else "-"  # references are yardsticks, not ranked
        lines.append(
            f"{place:>4}  {name:<18} {row['epochs']:>6} {row['val_top1']:>10.2f}% {row['best_val_top1']:>9.2f}%  "
            f"{knobs}{'' if row['status'] == 'done' else '  (' + row['status'] + ')'}"
        )
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _sort_key(mode: str):
    def key(row):
        value = row["val_top1"]
        if math.isnan(value):
            return math.inf
        return -value if mode == "max" else value

    return key


def run_search(
    spec: Spec,
    *,
    resume: bool = False,
    address: str | None = None,
    spec_text: str = "",
    log=print,
) -> SearchOutcome:
    """Run (or resume) the whole search described by ``spec``."""
    import ray

    started = time.time()
    experiment_path = spec.experiment_path()
    search_path = f"{experiment_path}/search"
    if not resume and _exists(search_path):
        raise SearchError(
            f"search {spec.name!r} already exists at {experiment_path}; run again with --resume to "
            f"continue it, or --set name=... to start another"
        )
    if resume and not _exists(search_path):
        raise SearchError(
            f"--resume: no search {spec.name!r} at {experiment_path} to resume (drop --resume to start it)"
        )

    log(resolved_plan(spec))
    trial = spec.trial
    info = _dataset_info(trial)
    num_classes = info.num_classes

    # Teacher first (trained once and cached), in this process: every trial reuses it.
    teacher_state = _teacher_state(
        trial.model_copy(update={"distill": trial.distill.model_copy(update={"method": "sdd"})})
    )

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # "local" always starts a fresh Ray, never joins another one running on this machine.
            # The dashboard serves the state API that Ray Train's placement-group cleaner needs
            # to free the workers of early-stopped trials.
            for name, value in LOCAL_TRAIN_ENV.items():
                os.environ.setdefault(name, value)  # the local raylet's workers inherit these
            ray.init(
                address="local",
                include_dashboard=True,
                log_to_driver=False,
                logging_level="warning",
            )
    teacher = {"ref": ray.put(teacher_state)} if teacher_state is not None else None

    from ray import tune

    tracker = SearchTracker(
        spec.tracking.uri, spec.experiment_name, experiment_path, spec.tracking.artifact_location
    )
    parent_run_id = tracker.start_parent(
        spec.name, spec.model_dump(mode="json"), spec_text, resolved_plan(spec)
    )
    base_trial = trial.model_dump(mode="json")
    callback = MlflowTrialCallback(
        tracker.uri, spec.experiment_name, experiment_path, spec.train.epochs, base_trial
    )
    trainable = tune.with_parameters(trial_driver, teacher=teacher, setup=_setup(spec, num_classes))
    head_memory = _head_memory() if address else None
    resources = driver_resources(head_memory, spec.search.max_concurrent)
    if head_memory is not None and HEAD_NODE_RESOURCE not in resources:
        log(
            f"trial drivers: spread over the cluster ({spec.search.max_concurrent} concurrent "
            f"trials need ~{spec.search.max_concurrent * DRIVER_SIDE_BYTES / 2**30:.0f} GiB, more "
            f"than half the head's {head_memory / 2**30:.0f} GiB)"
        )
    trainable = tune.with_resources(trainable, resources)

    status = "FAILED"
    try:
        reference_rows: list[dict] = []
        if spec.search.references:
            reference_results = _fit(
                "references",
                spec,
                trainable,
                {TRIAL_KEY: base_trial, ROLE_KEY: tune.grid_search(list(REFERENCE_NAMES))},
                tune.TuneConfig(
                    metric=spec.search.metric,
                    mode=spec.search.mode,
                    max_concurrent_trials=spec.search.max_concurrent,
                    trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_name,
                ),
                callback,
                resume=resume and _exists(f"{experiment_path}/references"),
            )
            reference_rows = _rows(reference_results, lambda c: c.get(ROLE_KEY, "search"))
        search_results = _fit(
            "search",
            spec,
            trainable,
            {TRIAL_KEY: base_trial, ROLE_KEY: "search"},
            _tune_config(spec),
            callback,
            resume=resume,
        )
        search_rows = sorted(
            _rows(search_results, lambda c: "search"), key=_sort_key(spec.search.mode)
        )
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            tracker.finish_parent("KILLED" if status == "KILLED" else "FAILED")

    rows = search_rows + reference_rows
    text = format_leaderboard(rows)
    tracker.log_leaderboard(
        [
            {k: v for k, v in r.items() if k != "params"} | {"params": str(r["params"])}
            for r in rows
        ],
        text,
    )
    registered, best_path = _register_best(spec, tracker, search_rows, info, num_classes, log)
    wall = time.time() - started
    overhead = _overhead(callback)
    if overhead:
        tracker.client.log_metric(
            parent_run_id, "orchestration_overhead_fraction", overhead["fraction"]
        )
        for key, seconds in overhead.items():
            if key.startswith("phase/"):
                name = key.removeprefix("phase/").replace(",", "").replace(" ", "_")
                tracker.client.log_metric(parent_run_id, f"overhead_s/{name}", seconds)
    tracker.client.log_metric(parent_run_id, "search_wall_seconds", wall)
    tracker.finish_parent("FINISHED")
    return SearchOutcome(
        experiment_path=experiment_path,
        parent_run_id=parent_run_id,
        leaderboard=rows,
        best_student_path=best_path,
        registered=registered,
        tracking_uri=tracker.uri,
        wall_seconds=wall,
        overhead=overhead,
    )


def _exists(path: str) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(path)


def _overhead(callback: MlflowTrialCallback) -> dict[str, float]:
    """Trial wall time minus time inside the training loop, over trials timed in this run.

    Also the median seconds of each start-up and wind-down phase (``sdd_search.trial.PHASES``)
    over the trials whose workers reported every mark, as ``phase/<name>``.
    """
    walls, loops, phases, per_epoch = [], [], [], []
    for timing in callback.timings.values():
        if "trial_ended" in timing and timing.get("loop_seconds"):
            walls.append(timing["trial_ended"] - timing["trial_started"])
            loops.append(timing["loop_seconds"])
            split = phase_seconds(timing, timing["loop_seconds"])
            if split is not None:
                phases.append(split)
            if "report_seconds_per_epoch" in timing:
                per_epoch.append(timing["report_seconds_per_epoch"])
    if not walls:
        return {}
    per_trial = [w - ell for w, ell in zip(walls, loops, strict=True)]
    out = {
        "trials_timed": float(len(walls)),
        "median_trial_wall_s": float(np.median(walls)),
        "median_loop_s": float(np.median(loops)),
        "median_overhead_s": float(np.median(per_trial)),
        "fraction": float(sum(per_trial) / sum(walls)),
    }
    for phase, _, _ in PHASES if phases else ():
        out[f"phase/{phase}"] = float(np.median([p[phase] for p in phases]))
    if per_epoch:  # within "checkpoints, reports": what each epoch's report costs the worker
        out["report_seconds_per_epoch"] = float(np.median(per_epoch))
    return out


def _load_student(checkpoint_path: str):
    import ray.train

    from sdd_search.models import create_model
    from sdd_search.train import load_checkpoint

    with ray.train.Checkpoint(checkpoint_path).as_directory() as directory:
        state = load_checkpoint(directory)
    model = create_model(state["model_name"], num_classes=state["num_classes"])
    model.load_state_dict(state["student"])
    return model.eval(), state


def _register_best(
    spec: Spec, tracker: SearchTracker, rows: list[dict], info, num_classes: int, log
):
    """Log the top-k students as MLflow models, register them, alias the best one."""
    from sdd_search.teacher import save_model_file

    registered: list[tuple[str, str]] = []
    best_path = None
    candidates = [
        r
        for r in rows
        if r["checkpoint"] and r["status"] == "done" and not math.isnan(r["val_top1"])
    ]
    size = info.image_size
    example = np.zeros((2, info.channels, size, size), dtype=np.float32)
    for rank, row in enumerate(candidates[: spec.search.top_k]):
        run_id = tracker.run_id_of(row["trial"])
        if run_id is None:
            continue
        model, _ = _load_student(row["checkpoint"])
        if rank == 0 and "://" not in spec.experiment_path():
            best_path = f"{spec.experiment_path()}/best_student.pt"
            save_model_file(best_path, model, spec.student.model, num_classes)
        version = tracker.register_student(run_id, model, example, spec.registered_model_name)
        tracker.set_tags(
            run_id, {"sdd_search.registered_version": version, "sdd_search.rank": rank + 1}
        )
        registered.append((row["trial"], version))
        if rank == 0:
            tracker.set_alias(spec.registered_model_name, spec.tracking.alias, version)
    return registered, best_path
