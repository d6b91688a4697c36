"""The Ray private names sdd_search.ray_compat relies on are there in the installed Ray.

Each test fails (never skips) when an upgrade of Ray renames or removes one: the message says
which name and what the search would lose. Plus the environment Ray is started with, the same
from the CLI or from ``run_search()`` in Python.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdd_search import ray_compat


def test_nothing_ray_compat_relies_on_is_missing():
    assert ray_compat.missing() == {}


def test_a_restored_tuner_takes_this_runs_callbacks(tmp_path):
    # Tuner.restore gives no run config: ray_compat reaches the restored one privately.
    from ray import tune
    from ray.tune.impl.tuner_internal import TunerInternal

    assert list(inspect.signature(TunerInternal.get_run_config).parameters) == ["self"]

    def trainable(config):
        return None

    class Marker(tune.Callback):
        pass

    first, second = Marker(), Marker()
    tune.Tuner(  # writes the experiment's tuner state, as a search's first run does
        trainable,
        run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path), callbacks=[first]),
    )
    restored = tune.Tuner.restore(str(tmp_path / "exp"), trainable=trainable)
    assert isinstance(restored._local_tuner, TunerInternal), "Tuner._local_tuner is gone"
    copies = restored._local_tuner.get_run_config().callbacks
    assert len(copies) == 1 and copies[0] is not first  # an unpickled copy, not our object
    ray_compat.use_callbacks_after_restore(restored, [second])
    assert restored._local_tuner.get_run_config().callbacks == [second]


def test_a_trial_trainer_starts_no_dataset_manager(tmp_path):
    # Train V2 adds a DatasetsCallback (a Ray Data DatasetManager actor per run) by default.
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    method = DataParallelTrainer._create_default_callbacks
    assert list(inspect.signature(method).parameters) == ["self"]
    assert issubclass(TorchTrainer, DataParallelTrainer)  # the override covers both trainers

    def train_fn(config):
        return None

    for workers, base in ((1, DataParallelTrainer), (2, TorchTrainer)):
        kwargs = {
            "scaling_config": ray.train.ScalingConfig(num_workers=workers),
            "run_config": ray.train.RunConfig(name=f"t{workers}", storage_path=str(tmp_path)),
        }
        plain = base(train_fn, **kwargs)._create_default_callbacks()
        assert any(isinstance(c, DatasetsCallback) for c in plain), "Ray's defaults changed"
        cls = ray_compat.trainer_class(workers)
        assert issubclass(cls, base) and cls.__name__ == base.__name__
        ours = cls(train_fn, **kwargs)._create_default_callbacks()
        assert not any(isinstance(c, DatasetsCallback) for c in ours)
        assert len(ours) == len(plain) - 1  # every other default kept


def test_the_head_node_resource_is_rays():
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    assert HEAD_NODE_RESOURCE_NAME == ray_compat.HEAD_NODE_RESOURCE


def test_env_defaults_never_override_the_environment(monkeypatch):
    for name in (*ray_compat.RAY_ENV_DEFAULTS, *ray_compat.LOCAL_TRAIN_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")  # the user's choice wins
    ray_compat.apply_ray_env_defaults()
    assert os.environ["RAY_TRAIN_V2_ENABLED"] == "1" and os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    assert os.environ["RAY_DEDUP_LOGS"] == "0"
    assert not any(name in os.environ for name in ray_compat.LOCAL_TRAIN_ENV)
    ray_compat.apply_ray_env_defaults(local_ray=True)
    assert {k: os.environ[k] for k in ray_compat.LOCAL_TRAIN_ENV} == ray_compat.LOCAL_TRAIN_ENV


# Run in a fresh interpreter: record the RAY_* settings at the moment Ray is first imported.
_FIRST_RAY_IMPORT = """
import importlib.abc, json, os, sys
seen = {}
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" and not seen:
            seen.update({k: os.environ.get(k) for k in KEYS})
        return None
sys.meta_path.insert(0, Watch())
from sdd_search.search import SearchError, run_search
from sdd_search.spec import spec_from_dict
imported_with_search = bool(seen)
spec = spec_from_dict({"name": "absent", "storage": sys.argv[1]})
try:
    run_search(spec, resume=True, log=lambda *_: None)
except SearchError as error:
    print(json.dumps({"seen": seen, "early": imported_with_search, "error": str(error)}))
"""


def test_run_search_from_python_sets_rays_environment_before_importing_ray(tmp_path):
    keys = sorted(ray_compat.RAY_ENV_DEFAULTS)
    env = {k: v for k, v in os.environ.items() if k not in keys}
    code = f"KEYS = {keys!r}\n" + _FIRST_RAY_IMPORT
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert not report["early"], "importing sdd_search.search imported Ray"
    assert "no search 'absent'" in report["error"]  # it got as far as looking for the search
    assert report["seen"] == ray_compat.RAY_ENV_DEFAULTS


def test_the_optuna_searchers_trials_are_read_through_the_fence():
    """sdd_search.optuna_study reads OptunaSearch's private trial table only through
    ray_compat: present on this Ray, one clear error where a Ray drops it."""
    from ray.tune.search.optuna import OptunaSearch

    assert ray_compat.optuna_search_trials(OptunaSearch()) == {}
    with pytest.raises(ray_compat.RayCompatError, match="OptunaSearch._ot_trials is gone"):
        ray_compat.optuna_search_trials(object())
    source = (Path(ray_compat.__file__).parent / "optuna_study.py").read_text()
    assert "_ot_trials" not in source


def test_a_ray_of_the_searchs_own_points_its_workers_state_api_at_itself(monkeypatch):
    """Train's placement-group cleaners ask the state API for their trial's controller: a local
    Ray's workers inherit its own dashboard's address (this process's environment is put back
    after ray.init), a joined host:port Ray's job gets RAY_ADDRESS."""
    import socket

    monkeypatch.setenv(ray_compat.API_SERVER_ENV, "http://elsewhere:1")
    port = ray_compat.dashboard_port()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # free, as Ray's dashboard will need it
    with ray_compat.local_ray_environment(port):
        assert os.environ[ray_compat.API_SERVER_ENV] == f"http://127.0.0.1:{port}"
    assert os.environ[ray_compat.API_SERVER_ENV] == "http://elsewhere:1"
    assert ray_compat.joined_ray_runtime_env("10.0.0.1:6379") == {
        "env_vars": {"RAY_ADDRESS": "10.0.0.1:6379"}
    }
    assert ray_compat.joined_ray_runtime_env("auto") is None
    assert ray_compat.joined_ray_runtime_env("ray://head:10001") is None
