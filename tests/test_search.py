"""End to end, as a user runs it: `sdd-search SPEC`, real local Ray, Optuna, MLflow (sqlite)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from sdd_search.data import build_datasets_and_loaders

pytestmark = pytest.mark.slow


def run_cli(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: float = 600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "sdd_search", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def child_runs(client: MlflowClient, experiment: str) -> tuple[object, list]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sdd_search.role") == "parent"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


def test_search_end_to_end(write_spec, teacher_cache, tmp_path):
    spec_path = write_spec(
        {
            "search": {
                "num_trials": 2,
                "max_concurrent": 2,
                "scheduler": "asha",
                "grace_period": 1,
                "references": True,
            }
        }
    )
    result = run_cli([str(spec_path)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "Leaderboard" in out and "[baseline]" in out and "[kd]" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    assert "registered tiny-student v1" in out
    # Where the trials' time went outside their training loops: the share, and every phase.
    assert re.search(r"orchestration overhead: \d+\.\d% of trial time", out), out[-2000:]
    (phases,) = [line for line in out.splitlines() if "median per trial:" in line]
    for phase in ("trial actor start", "train workers start", "worker imports", "shutdown"):
        assert re.search(rf"{phase} \d+\.\ds", phases), phases

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent, children = child_runs(client, "sdd-search/tiny")
    assert parent.info.status == "FINISHED"
    metrics = parent.data.metrics
    assert 0.0 < metrics["orchestration_overhead_fraction"] < 1.0
    assert metrics["overhead_s/train_workers_start"] > 0.0, metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "leaderboard.csv", "leaderboard.txt", "search_space.json"} <= artifacts
    roles = sorted(r.data.tags["sdd_search.role"] for r in children)
    assert roles == ["reference", "reference", "trial", "trial"]
    trial_ids = [r.data.tags["sdd_search.trial_id"] for r in children]
    assert len(set(trial_ids)) == len(trial_ids)
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.params["train.epochs"] == "2"
        history = client.get_metric_history(run.info.run_id, "val_top1")
        steps = [m.step for m in history]
        assert steps == sorted(set(steps)) and steps[0] == 1, steps
        assert run.data.tags["sdd_search.status"] in ("completed", "stopped")
    trial_runs = [r for r in children if r.data.tags["sdd_search.role"] == "trial"]
    for run in trial_runs:
        assert "knob.scales" in run.data.params and "knob.temperature" in run.data.params
    # The first trial is the spec's own point (baseline_first).
    temperatures = {float(r.data.params["knob.temperature"]) for r in trial_runs}
    assert 4.0 in temperatures

    # The champion loads back from the registry and predicts with the accuracy it was logged with.
    versions = client.search_model_versions("name='tiny-student'")
    assert len(versions) == 2
    champion = client.get_model_version_by_alias("tiny-student", "champion")
    champion_run = client.get_run(champion.run_id)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pytorch.load_model("models:/tiny-student@champion")
    _, _, val = build_datasets_and_loaders(
        "digits", root=None, batch_size=128, device=torch.device("cpu"), image_size=8
    )
    correct = seen = 0
    with torch.no_grad():
        for images, labels in val:
            logits = model(images)
            assert logits.shape == (labels.shape[0], 10)
            correct += int((logits.argmax(1) == labels).sum())
            seen += labels.shape[0]
    accuracy = 100.0 * correct / seen
    assert accuracy == pytest.approx(champion_run.data.metrics["val_top1"], abs=1e-6)
    # The pyfunc flavour serves the same logits from a numpy batch (the logged signature).
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-student@champion")
    batch = next(iter(val))[0][:4].numpy()
    np.testing.assert_allclose(
        pyfunc.predict(batch), model(torch.from_numpy(batch)).detach().numpy(), rtol=1e-5
    )

    # Running the same search again without --resume is a clear error, not an overwrite.
    again = run_cli([str(spec_path)], cwd=tmp_path, timeout=120)
    assert again.returncode == 2
    assert "already exists" in again.stderr and "--resume" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def _logged_epochs(uri: str) -> list[int]:
    """The last epoch MLflow holds for each trial run of the search (sorted), as it logs them."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sdd-search/tiny")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], "tags.`sdd_search.role` = 'trial'")
    return sorted(
        max((m.step for m in client.get_metric_history(r.info.run_id, "val_top1")), default=0)
        for r in runs
    )


def test_kill_driver_and_resume(write_spec, teacher_cache, tmp_path):
    spec_path = write_spec(
        {
            "train": {"epochs": 3},
            "search": {"num_trials": 2, "max_concurrent": 1, "scheduler": "none"},
        }
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "sdd_search", str(spec_path)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    deadline = time.time() + 400

    # Kill once the first trial has finished and the second is mid-training (one trial at a
    # time: the kill lands between the second trial's first and last epochs).
    def mid_second_trial(epochs: list[int]) -> bool:
        return len(epochs) == 2 and 1 <= epochs[0] < 3 and epochs[1] == 3

    while time.time() < deadline and not mid_second_trial(_logged_epochs(uri)):
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    subprocess.run(["ray", "stop", "--force"], capture_output=True)
    before = _logged_epochs(uri)
    assert mid_second_trial(before), before

    resumed = run_cli([str(spec_path), "--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert resumed.stdout.count("registered tiny-student v") == 2

    client = MlflowClient(tracking_uri=uri)
    parent, children = child_runs(client, "sdd-search/tiny")
    assert parent.info.status == "FINISHED"
    trial_ids = [r.data.tags["sdd_search.trial_id"] for r in children]
    assert len(trial_ids) == 2 and len(set(trial_ids)) == 2
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags
        assert run.data.tags["sdd_search.status"] == "completed", run.data.tags
        # Every epoch logged once: the finished trial was not rerun, the interrupted one
        # continued from its checkpoint (its replayed epochs were not logged again).
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
        assert steps == [1, 2, 3], (run.data.tags["sdd_search.trial_id"], steps)
    # Resuming a search that does not exist is a clear error.
    missing = run_cli(
        [str(spec_path), "--resume", "--set", "name=nothing-here"], cwd=tmp_path, timeout=120
    )
    assert missing.returncode == 2 and "no search" in missing.stderr


def test_spec_yaml_in_repo_matches_embedded_default():
    root = Path(__file__).resolve().parents[1]
    embedded = root / "sdd_search" / "default_spec.yaml"
    assert (root / "search_spaces" / "quickstart.yaml").read_text() == embedded.read_text()
    assert yaml.safe_load(embedded.read_text())["data"]["dataset"] == "digits"
