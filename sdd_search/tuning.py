"""Ray Tune for one search: starting Ray, what each trial's driver holds, the Tuner's
configuration (Optuna searcher and its study on disk, ASHA scheduler, the live view, trial
names) and fitting one of the search's Tune experiments (``references``, ``search``, ``final``),
fresh or restored.

Ray is imported inside the functions: importing this module does not start or import Ray, so
:func:`sdd_search.ray_compat.apply_ray_env_defaults` can run first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sdd_search import ray_compat, stopping
from sdd_search.ray_compat import HEAD_NODE_RESOURCE
from sdd_search.space import (
    FINAL_KEY,
    FINAL_ROLE,
    REFERENCE_NAMES,
    ROLE_KEY,
    SEARCH_ROLE,
    TRIAL_KEY,
    SpaceSampler,
    baseline_point,
    trial_display_name,
)
from sdd_search.spec import Spec

# Memory a running trial's processes take on its driver's node: Tune's trial actor (~140 MB)
# and result queue (~60 MB), Train's controller (~120 MB) and sync actor (~110 MB): unique set
# sizes measured with Ray 2.60, rounded up for headroom.
DRIVER_SIDE_BYTES = 600 * 2**20


def start_ray(address: str | None) -> str | None:
    """Join the Ray at ``address`` (e.g. "auto"), or start a fresh local one when None; a
    Ray this process already joined is kept as it is. Returns the URL of the dashboard of a
    Ray it started (None otherwise)."""
    import ray

    if ray.is_initialized():
        return None
    # Warnings, or less where the caller raised Ray's logger (the CLI hides Ray's chatter).
    level = max(logging.WARNING, logging.getLogger("ray").level)
    dashboard = None
    if address:
        runtime_env = ray_compat.joined_ray_runtime_env(address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level=level)
    else:
        # "local" always starts a fresh Ray, never joins another one running on this machine.
        # The dashboard serves the state API that Ray Train's placement-group cleaner needs
        # to free the workers of early-stopped trials; the workers ask this Ray's, not the
        # newest Ray's on the machine (ray_compat.local_ray_environment).
        ray_compat.apply_ray_env_defaults(local_ray=True)  # the local raylet's workers inherit
        port = ray_compat.dashboard_port()
        with ray_compat.local_ray_environment(port):
            context = ray.init(
                address="local",
                include_dashboard=True,
                dashboard_port=port,
                log_to_driver=False,
                logging_level=level,
            )
        dashboard = f"http://{context.dashboard_url}" if context.dashboard_url else None
    stopping.reinstall()  # ray.init replaced the SIGTERM handler with sys.exit
    return dashboard


def put_teacher(teacher_state: dict) -> dict:
    """The teacher's weights (name -> numpy array) in Ray's object store, as trials get them."""
    import ray

    return {"ref": ray.put(teacher_state)}


def can_restore(path: str) -> bool:
    """Whether a Tune experiment was started at ``path`` (a folder or a remote URI)."""
    from ray import tune

    return tune.Tuner.can_restore(path)


OPTUNA_DB = "optuna.db"  # the Optuna study's sqlite file in the search's folder


def optuna_storage_url(spec: Spec) -> str:
    """The SQLAlchemy URL of the search's Optuna study (named ``spec.name``):
    ``search.optuna_storage`` as given, else the sqlite file ``optuna.db`` in the search's
    folder; a search kept remotely (``s3://...``) keeps it in ``./<name>-optuna.db`` where the
    command runs (sqlite needs a local file)."""
    if spec.search.optuna_storage:
        return spec.search.optuna_storage
    folder = spec.experiment_path()
    if "://" in folder:
        return f"sqlite:///{Path(f'{spec.name}-optuna.db').resolve()}"
    return f"sqlite:///{folder}/{OPTUNA_DB}"


def optuna_study_exists(spec: Spec) -> bool:
    """Whether the search's Optuna storage already holds its study (never creates a sqlite
    file). Raises ValueError, with the driver's reason, for a storage it cannot open."""
    from sdd_search.tracking import sqlite_file

    url = optuna_storage_url(spec)
    path = sqlite_file(url)
    if path is not None and not path.exists():
        return False
    import optuna

    try:
        return spec.name in optuna.get_all_study_names(storage=url)
    except Exception as error:  # SQLAlchemy's and the database drivers' errors share no base
        raise ValueError(f"cannot open the Optuna storage {url}: {error}") from error


def driver_resources(head_memory: float | None, concurrent: int) -> dict[str, float]:
    """What each trial's Tune driver holds (its Train controller runs on the same node).

    No CPU: it only waits on its Train workers, and k trials of n CPUs each must fit on k * n
    CPUs; a token of memory gives its bundle a resource. On a cluster (``head_memory``: the
    head node's memory in bytes) whose head can hold every concurrent trial's driver-side
    processes with room to spare, a sliver of the head's own resource as well: a lost worker
    node then costs its trials a Train restart from the last checkpoint, never a Tune retry of
    the whole trial. A smaller head leaves the drivers to Ray, spread over the workers.
    ``concurrent``: the trials that run at once.
    """
    resources = {"memory": 1.0}
    if head_memory is not None and concurrent * DRIVER_SIDE_BYTES <= 0.5 * head_memory:
        resources[HEAD_NODE_RESOURCE] = 0.001
    return resources


def head_memory() -> float | None:
    """The Ray head node's memory in bytes (None if the cluster reports no head)."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and HEAD_NODE_RESOURCE in node.get("Resources", {}):
            return float(node["Resources"].get("memory", 0.0)) or None
    return None


def trainable(spec: Spec, num_classes: int, teacher: dict | None, head: float | None):
    """Tune's trainable: :func:`sdd_search.trial.trial_driver` with the search's settings,
    the teacher's object-store reference (``{"ref": ...}`` or None) and the resources of
    :func:`driver_resources` (``head``: the head node's memory in bytes, None off a cluster)."""
    from ray import tune

    from sdd_search.trial import trial_driver

    setup = {
        "name": spec.name,
        "resources": spec.resources.model_dump(),
        "train_storage": f"{spec.experiment_path()}/train",
        "num_classes": num_classes,
        "metric": spec.search.metric,
    }
    with_teacher = tune.with_parameters(trial_driver, teacher=teacher, setup=setup)
    return tune.with_resources(with_teacher, driver_resources(head, spec.search.max_concurrent))


def _trial_name(trial) -> str:
    return trial_display_name(trial.config, trial.trial_id)


def reference_experiment(spec: Spec) -> tuple[dict, Any]:
    """(param space, TuneConfig) of the references: one trial per REFERENCE_NAMES."""
    from ray import tune

    param_space = {
        TRIAL_KEY: spec.search_trial.model_dump(mode="json"),
        ROLE_KEY: tune.grid_search(list(REFERENCE_NAMES)),
    }
    config = tune.TuneConfig(
        metric=spec.search.metric,
        mode=spec.search.mode,
        max_concurrent_trials=spec.search.max_concurrent,
        trial_name_creator=_trial_name,
        trial_dirname_creator=_trial_name,
    )
    return param_space, config


def search_experiment(spec: Spec) -> tuple[dict, Any]:
    """(param space, TuneConfig) of the searched trials: Optuna samples the spec's space."""
    from ray import tune

    param_space = {TRIAL_KEY: spec.search_trial.model_dump(mode="json"), ROLE_KEY: SEARCH_ROLE}
    config = tune.TuneConfig(
        metric=spec.search.metric,
        mode=spec.search.mode,
        search_alg=_searcher(spec),
        scheduler=_scheduler(spec),
        num_samples=spec.search.num_trials,
        max_concurrent_trials=spec.search.max_concurrent,
        trial_name_creator=_trial_name,
        trial_dirname_creator=_trial_name,
    )
    return param_space, config


def final_experiment(spec: Spec, entries: list[dict]) -> tuple[dict, Any]:
    """(param space, TuneConfig) of the final stage: one trial per (configuration, seed) of
    ``entries`` (:func:`sdd_search.space.final_entries`), at the full recipe on all the
    training data; nothing is searched or stopped early."""
    from ray import tune

    param_space = {
        TRIAL_KEY: spec.final_trial.model_dump(mode="json"),
        ROLE_KEY: FINAL_ROLE,
        FINAL_KEY: tune.grid_search(entries),
    }
    config = tune.TuneConfig(
        max_concurrent_trials=spec.final.max_concurrent or spec.search.max_concurrent,
        trial_name_creator=_trial_name,
        trial_dirname_creator=_trial_name,
    )
    return param_space, config


def _searcher(spec: Spec):
    """Tune's OptunaSearch over the spec's space with its sampler, its study in the search's
    Optuna storage (:func:`optuna_storage_url`); None for an empty space."""
    if not spec.space:
        return None
    import optuna

    from sdd_search.optuna_study import StudySearch
    from sdd_search.tracking import sqlite_file

    seed = spec.search.seed
    sampler = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
    }[spec.search.sampler]()
    space = {k: v.model_dump() for k, v in spec.space.items()}
    start = baseline_point(spec.trial, spec.space)
    url = optuna_storage_url(spec)
    path = sqlite_file(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    # A study that exists already is a resumed search's: its first point is queued (or ran).
    new = not optuna_study_exists(spec)
    searcher = StudySearch(
        storage_url=url,
        study_name=spec.name,
        space=SpaceSampler(space, {**start, "base": spec.distill.base}),
        metric=spec.search.metric,
        mode=spec.search.mode,
        sampler=sampler,
        points_to_evaluate=[start] if spec.search.baseline_first and new else None,
    )
    if new:
        searcher.study().set_user_attr("metric", spec.search.metric)
    return searcher


def _scheduler(spec: Spec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.search.scheduler != "asha":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        # One past the last epoch: a trial that reaches the end finishes by itself (a clean
        # Train shutdown) instead of being stopped, i.e. killed, by the scheduler.
        max_t=spec.search_trial.train.epochs + 1,
        grace_period=spec.search.grace_period,
        reduction_factor=spec.search.reduction_factor,
    )


def live_view(name: str, spec: Spec, knobs: list[str], epochs: int):
    """The live view (:class:`sdd_search.live_view.LiveView`) of the Tune experiment ``name``:
    its trials' ``knobs`` (as the spec names them) and ``epochs`` each."""
    from sdd_search.live_view import LiveView

    return LiveView(
        stage=name,
        search=spec.name,
        metric=spec.search.metric,
        mode=spec.search.mode,
        knobs=knobs,
        epochs=epochs,
        asha=name == "search" and spec.search.scheduler == "asha",
    )


class SearchInterrupted(RuntimeError):
    """A Tune experiment ended before all its trials did (Ctrl-C, SIGTERM): its state and
    the running trials' last checkpoints are saved; ``--resume`` continues it."""


def require_complete(name: str, results, expected: int, callback) -> None:
    """Raise SearchInterrupted unless ``expected`` trials of the experiment ``name`` ended.

    Tune's own Ctrl-C handling stops the loop, saves the experiment state with the running
    trials still unfinished, and returns normally: only the trials' ends tell the difference.
    ``callback``: the MLflow callback, which saw (or recorded, in an earlier driver) each end.
    """
    ended = sum(
        1
        for result in results
        if result.error or callback.has_ended((result.metrics or {}).get("trial_id", ""))
    )
    if ended < expected:
        raise SearchInterrupted(f"{name}: {ended} of {expected} trials ended")


def fit(name: str, spec: Spec, trainable, experiment: tuple[dict, Any], callback, resume: bool):
    """Run the Tune experiment ``name`` ("references", "search" or "final") under the spec's
    storage, shown by its live view: restored with its unfinished and errored trials when
    ``resume`` and it exists, else fresh. ``experiment``: (param space, TuneConfig);
    ``callback``: this run's MLflow callback."""
    from ray import tune

    param_space, tune_config = experiment
    path = f"{spec.experiment_path()}/{name}"
    trial = spec.final_trial if name == "final" else spec.search_trial
    view = live_view(
        name, spec, [] if name == "references" else list(spec.space), trial.train.epochs
    )
    if resume and can_restore(path):
        tuner = tune.Tuner.restore(
            path,
            trainable=trainable,
            param_space=param_space,
            resume_unfinished=True,
            resume_errored=True,
        )
        ray_compat.use_callbacks_after_restore(tuner, [callback, view])
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune_config,
            run_config=tune.RunConfig(
                name=name,
                storage_path=spec.experiment_path(),
                callbacks=[callback, view],
                failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                verbose=0,  # Tune's own table and logs: the live view reports instead
            ),
        )
    try:
        return tuner.fit()
    finally:
        view.close()  # the display stops even when the stage does not end (Ctrl-C, an error)
