"""The cluster side of a trial (sdd_search.trial): light imports, configs, phase accounting."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdd_search.config import TrialConfig
from sdd_search.overhead import PHASES, phase_seconds
from sdd_search.space import ROLE_KEY, TRIAL_KEY, config_of, encode_choice
from sdd_search.tuning import HEAD_NODE_RESOURCE, driver_resources


def test_trial_processes_import_no_mlflow_tune_search_or_torch():
    # Every trial starts fresh Ray processes that import sdd_search.trial (Tune's actor, Train's
    # controller, each worker): it must not drag in MLflow, Optuna, scikit-learn or torch.
    code = (
        "import sys, sdd_search.trial; "
        "print(sorted(m for m in ('mlflow', 'optuna', 'sklearn', 'torch', 'ray.tune.search') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_spec_and_cli_import_without_torch():
    # `sdd-search --check` and every spec error answer without importing torch.
    code = "import sys, sdd_search.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _base() -> dict:
    return TrialConfig().model_dump(mode="json")


def test_config_of_applies_sampled_knobs_and_references():
    config = {TRIAL_KEY: _base(), ROLE_KEY: "search", "scales": encode_choice("scales", [1, 2])}
    config["temperature"] = 2.5
    trial = config_of(config)
    assert trial.distill.scales == [1, 2] and trial.distill.temperature == 2.5

    baseline = config_of({TRIAL_KEY: _base(), ROLE_KEY: "baseline"})
    assert baseline.distill.method == "none"
    kd = config_of({TRIAL_KEY: _base(), ROLE_KEY: "kd"})
    assert kd.distill.method == "sdd" and kd.distill.scales == [1] and kd.distill.base == "kd"


def _marks() -> dict[str, float]:
    return {
        "trial_started": 100.0,
        "driver_entered": 104.0,
        "worker_created": 110.0,
        "worker_imported": 116.0,
        "loop_started": 119.0,
        "last_result": 150.0,
        "trial_ended": 152.0,
    }


def test_phase_seconds_splits_a_trial_into_consecutive_phases():
    split = phase_seconds(_marks(), loop_seconds=30.0)
    assert split == {
        "trial actor start": 4.0,
        "train workers start": 6.0,
        "worker imports": 6.0,
        "teacher, data, model": 3.0,
        "checkpoints, reports": 1.0,  # 31 s from loop start to last result, 30 of them training
        "shutdown": 2.0,
    }
    # The phases and the loop add up to the trial's wall time.
    assert sum(split.values()) + 30.0 == pytest.approx(152.0 - 100.0)
    assert [p for p, _, _ in PHASES] == list(split)


def test_phase_seconds_needs_every_mark():
    marks = _marks()
    del marks["worker_created"]
    assert phase_seconds(marks, 30.0) is None
    assert phase_seconds({**_marks(), "worker_created": math.nan}, 30.0) is None


def test_trial_drivers_sit_on_the_head_of_a_cluster_when_they_fit():
    assert driver_resources(None, concurrent=4) == {"memory": 1.0}  # local: one node anyway
    gib = 2.0**30
    on_head = driver_resources(22 * gib, concurrent=8)  # the 32 GB head: Ray's memory share
    assert on_head[HEAD_NODE_RESOURCE] == pytest.approx(0.001)
    assert "CPU" not in on_head and "GPU" not in on_head
    # 64 concurrent trials would need ~38 GiB on that head: the drivers spread instead.
    assert driver_resources(22 * gib, concurrent=64) == {"memory": 1.0}


@pytest.mark.parametrize("psutil", ["vendored", "absent"])
def test_process_start_time_is_when_the_process_began(psutil):
    # The start-up phases count from a process's creation: with Ray's psutil, or from /proc.
    block = "sys.modules['psutil'] = None; " if psutil == "absent" else ""
    code = (
        f"import sys, time; {block}time.sleep(1.0); from sdd_search.trial import "
        "_process_start_time; print(time.time() - _process_start_time())"
    )
    import ray

    env = dict(os.environ)
    if psutil == "vendored":
        env["PYTHONPATH"] = str(Path(ray.__file__).parent / "thirdparty_files")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    age = float(out.stdout)
    assert 1.0 <= age < 30.0, age


# The error.txt Tune wrote for a trial whose placement group Ray removed (abridged: the
# traceback's frames, the worker's fields).
_WORKER_GROUP_ERROR = """Failure # 1 (occurred at 2026-12-03_06-50-53)
ray::ImplicitFunc.train() (pid=15421, ip=192.0.2.2, repr=trial_driver)
  File "ray/train/v2/api/data_parallel_trainer.py", line 195, in fit
    raise result.error
ray.train.WorkerGroupError: Training failed due to worker errors:
[Rank 0 Error Snippet]:
A worker health check failed.
Worker info: Worker(
  actor=Actor(RayTrainWorker, 8a8cacfd741be839c720810b01000000),
  distributed_context=DistributedContext(world_rank=0, world_size=1),
)
The actor died unexpectedly before finishing this task.
\tclass_name: RayTrainWorker
\tpid: 15631
The actor is dead because its worker process has died. Worker exit detail: Destroying worker \
since its placement group was removed.
"""


def test_a_trials_reason_is_its_exception_and_the_detail_ray_gave_in_one_line():
    from sdd_search.mlflow_callback import summarize_error

    assert summarize_error(_WORKER_GROUP_ERROR) == (
        "ray.train.WorkerGroupError: Training failed due to worker errors: A worker health "
        "check failed. The actor died unexpectedly before finishing this task. The actor is "
        "dead because its worker process has died. Worker exit detail: Destroying worker "
        "since its placement group was removed."
    )
    # A worker's own exception, inside Ray's report: that exception's line alone.
    raised = _WORKER_GROUP_ERROR.split("A worker health")[0] + (
        'Traceback (most recent call last):\n  File "sdd_search/trial.py", line 3, in run\n'
        "RuntimeError: lr 0.05: injected failure at epoch 2\n"
    )
    assert summarize_error(raised) == "RuntimeError: lr 0.05: injected failure at epoch 2"
    assert summarize_error("x" * 3000 + "Error") == "x" * 1000
    assert summarize_error("") == "unknown error"
