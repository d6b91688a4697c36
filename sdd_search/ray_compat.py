"""Where sdd-search leans on Ray beyond its public API, fenced in one place.

Each private name is used once, here, with the reason Ray gives no public way. An upgrade of
Ray that renames one fails tests/test_ray_compat.py loudly; at run time :func:`missing` lets the
search warn once at its start, and each use below raises or warns rather than silently carrying
on without it. Also the environment Ray is started with, the same from the CLI or the library.

Ray is imported inside the functions: this module is imported by every trial process and,
through :func:`apply_ray_env_defaults`, before Ray itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from collections.abc import Iterator

from sdd_search.environ import overridden

# Read when Ray (ray.train, ray._private) is imported or a Tuner fits: set before either.
RAY_ENV_DEFAULTS = {
    "RAY_TRAIN_V2_ENABLED": "1",  # Train V2: the trainers and callbacks below are V2's
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's classic output, silenced (verbose=0): sdd_search.live_view
    "RAY_DEDUP_LOGS": "1",
}
# Ray Train settings for a Ray this search starts itself (one machine; a cluster keeps Ray's
# defaults). No spot-preemption watcher (one more process per trial, and nothing to preempt);
# a 1 s controller poll instead of 2 s (reports and the end of a trial arrive sooner).
LOCAL_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
}

# Every Ray head node has 1 of this resource. Private (ray._common.constants.
# HEAD_NODE_RESOURCE_NAME), but the one way to place an actor on the head; Ray's own Train
# state actor asks for it the same way. Renamed, no node has it and the drivers spread out.
HEAD_NODE_RESOURCE = "node:__internal_head__"


class RayCompatError(RuntimeError):
    """The installed Ray lacks a private name sdd-search needs; the message says what to do."""


def apply_ray_env_defaults(local_ray: bool = False) -> None:
    """Set Ray's environment defaults (a value already in the environment wins).

    ``local_ray``: this process is about to start a Ray of its own (``ray.init("local")``),
    whose raylet's workers inherit :data:`LOCAL_TRAIN_ENV` as well.
    """
    for name, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if local_ray:
        for name, value in LOCAL_TRAIN_ENV.items():
            os.environ.setdefault(name, value)


# Ray Train's placement-group cleaner (one per trial, in a worker process) asks the state API
# every second whether its trial's controller still lives. With no address in its environment
# the state API asks the Ray started last on this machine (/tmp/ray/ray_current_cluster): with a
# second Ray here (another search, the user's own), that one has no such controller, and the
# cleaner removes the placement group of a healthy trial ("Destroying worker since its
# placement group was removed"). So a Ray this search starts puts its own dashboard's address
# in its workers' environment (the state API reads RAY_API_SERVER_ADDRESS first), and a Ray it
# joins at host:port gets RAY_ADDRESS in the job's runtime environment.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def dashboard_port(host: str = "127.0.0.1") -> int:
    """A free port on ``host`` for the dashboard of a Ray this search starts. Not Ray's default
    8265: a Ray given a port does not move to the next free one, and another Ray starting at
    the same moment would try 8265 too (the loser fails and leaves its GCS running)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def local_ray_environment(port: int, host: str = "127.0.0.1") -> Iterator[None]:
    """While ``ray.init`` starts a local Ray whose dashboard listens on ``host:port``: its
    raylet, and so every worker of it, inherits this process's environment with the state
    API pointed at that dashboard. This process's own environment is put back after."""
    with overridden({API_SERVER_ENV: f"http://{host}:{port}"}):
        yield


def joined_ray_runtime_env(address: str) -> dict | None:
    """The job runtime environment for joining the Ray at ``address``: its workers' state API
    asks that Ray (``host:port``); None for "auto" or a Ray Client address (``ray://``)."""
    if address == "auto" or "://" in address:
        return None
    return {"env_vars": {"RAY_ADDRESS": address}}


def _upgrade_hint() -> str:
    import ray

    return (
        f"the installed Ray {ray.__version__} lacks it (sdd-search is tested with Ray 2.60); "
        "install ray==2.60.* or update sdd_search/ray_compat.py (tests/test_ray_compat.py "
        "names what changed)"
    )


# --------------------------------------------------------------------------------------------
# Tune: the callbacks of a restored Tuner


def use_callbacks_after_restore(tuner, callbacks: list) -> None:
    """Make a Tuner restored by ``Tuner.restore`` call ``callbacks`` (this run's objects), and
    print nothing of its own (the live view among ``callbacks`` reports).

    ``Tuner.restore`` takes no run config: the restored one holds unpickled copies of the
    first run's callbacks, whose state (the MLflow callback's timings) this run never sees.
    No public way to reach it: ray-project/ray#41364 (open) asks for one.
    """
    import ray

    if ray.util.client.ray.is_connected():
        return  # Ray Client: the Tuner and its callbacks live in a remote actor; keep Ray's copies
    try:
        run_config = tuner._local_tuner.get_run_config()  # private: ray-project/ray#41364
    except AttributeError as error:
        raise RayCompatError(
            f"--resume needs Tuner._local_tuner.get_run_config() to hand the resumed search "
            f"its MLflow callback; {_upgrade_hint()}"
        ) from error
    run_config.callbacks = list(callbacks)
    # And no Tune table of its own, which a search started by an earlier sdd-search printed.
    run_config.verbose, run_config.progress_reporter = 0, None


# --------------------------------------------------------------------------------------------
# Train: the trainer of one trial


def trainer_class(workers: int) -> type:
    """Ray Train's TorchTrainer for data-parallel trials; the plain (V2) trainer for one.

    TorchTrainer sets up the torch.distributed process group that DDP needs. One worker needs
    none, and the plain trainer keeps torch out of the trial's Tune actor and its Train
    controller: two fewer torch imports per trial (seconds of CPU, ~200 MB each). Either way
    without Ray Data's dataset manager, which Train starts for every run (a process per trial)
    although a trial here passes no Ray Dataset.
    """
    base = _plain_trainer() if workers == 1 else None
    if base is None:
        if workers == 1:
            _warn_once("one-worker trials use TorchTrainer: torch imported by their Tune actor")
        from ray.train.torch import TorchTrainer as base
    datasets_callback = _datasets_callback()
    if datasets_callback is None or not hasattr(base, "_create_default_callbacks"):
        _warn_once("Ray Train's dataset manager stays on: one more process per trial")
        return base

    class Trainer(base):
        # Private: Train V2 adds a DatasetsCallback, which starts a Ray Data DatasetManager
        # actor per run (ray-project/ray#63309), datasets or not; no public switch turns it off.
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, datasets_callback)]

    Trainer.__name__ = Trainer.__qualname__ = base.__name__
    return Trainer


def _plain_trainer() -> type | None:
    try:  # a DeveloperAPI outside the ray.train namespace (ray.train exports V1's only)
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    except ImportError:
        return None
    return DataParallelTrainer


def _datasets_callback() -> type | None:
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback  # private
    except ImportError:
        return None
    return DatasetsCallback


_warned: set[str] = set()


def _warn_once(consequence: str) -> None:
    if consequence not in _warned:
        _warned.add(consequence)
        warnings.warn(f"sdd_search.ray_compat: {consequence}; {_upgrade_hint()}", stacklevel=3)


# --------------------------------------------------------------------------------------------
# What the installed Ray lacks


def optuna_search_trials(searcher) -> dict:
    """Tune trial id -> optuna.Trial of an OptunaSearch: its private ``_ot_trials`` (Ray has no
    public accessor); sdd_search.optuna_study tags each Optuna trial with its Tune id and
    marks the ones a resume abandoned through it."""
    trials = getattr(searcher, "_ot_trials", None)
    if not isinstance(trials, dict):
        raise RayCompatError(
            "ray.tune.search.optuna.OptunaSearch._ot_trials is gone from this Ray: "
            f"the Optuna study cannot be kept; {_upgrade_hint()}"
        )
    return trials


def missing() -> dict[str, str]:
    """Each private Ray name this module relies on that the installed Ray lacks -> what the
    search loses without it. Empty on the Ray sdd-search is tested with."""
    problems = {}
    try:
        from ray.tune.impl.tuner_internal import TunerInternal
    except ImportError:
        TunerInternal = None
    if not callable(getattr(TunerInternal, "get_run_config", None)):
        problems["ray.tune.impl.tuner_internal.TunerInternal.get_run_config"] = "--resume fails"
    plain = _plain_trainer()
    if plain is None:
        problems["ray.train.v2.api.data_parallel_trainer.DataParallelTrainer"] = (
            "one-worker trials import torch in their Tune actor"
        )
    elif not callable(getattr(plain, "_create_default_callbacks", None)):
        problems["DataParallelTrainer._create_default_callbacks"] = "one more process per trial"
    if _datasets_callback() is None:
        problems["ray.train.v2._internal.callbacks.datasets.DatasetsCallback"] = (
            "one more process per trial"
        )
    try:
        from ray._common.constants import HEAD_NODE_RESOURCE_NAME  # private
    except ImportError:
        HEAD_NODE_RESOURCE_NAME = None
    if HEAD_NODE_RESOURCE_NAME != HEAD_NODE_RESOURCE:
        problems[f"the head node's resource {HEAD_NODE_RESOURCE!r}"] = (
            "trial drivers spread over the cluster: a lost node costs a Tune retry"
        )
    try:
        from ray.tune.search.optuna import OptunaSearch

        optuna_trials = getattr(OptunaSearch(), "_ot_trials", None)
    except Exception:  # noqa: BLE001 (any failure here means the same: not as relied on)
        optuna_trials = None
    if not isinstance(optuna_trials, dict):
        problems["ray.tune.search.optuna.OptunaSearch._ot_trials"] = (
            "the Optuna study on disk loses its Tune trial ids and resumes' abandoned trials"
        )
    return problems
