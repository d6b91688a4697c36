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


def _logged_epochs(uri: str, role: str = "trial") -> list[int]:
    """The last epoch MLflow holds for each run of one role (sorted), as the driver logs them."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sdd-search/tiny")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], f"tags.`sdd_search.role` = '{role}'")
    return sorted(
        max((m.step for m in client.get_metric_history(r.info.run_id, "val_top1")), default=0)
        for r in runs
    )


def test_search_end_to_end_killed_and_resumed(write_spec, teacher_cache, tmp_path):
    """The whole loop as a user runs it, with the driver killed mid-search (SIGKILL, then
    `ray stop`) and the search finished by `--resume`: references, Optuna trials, ASHA, MLflow
    runs with every epoch once, registered students, the champion loaded back."""
    spec_path = write_spec(
        {
            "train": {"epochs": 4},
            "search": {
                "num_trials": 2,
                "max_concurrent": 2,  # the references together, then the two trials together
                "scheduler": "asha",
                "grace_period": 3,  # one rung, at epoch 3: ASHA may stop the second trial there
                "references": True,
            },
        }
    )
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "sdd_search", str(spec_path)],
            cwd=tmp_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    # Kill once the references have finished and both trials have trained, the one behind
    # mid-training (after its first epoch, before ASHA's rung at 3); the other may be anywhere.
    # The resumed trials replay the epochs their checkpoints hold; one that ASHA stops on a
    # replayed epoch must still be registered (the last replay names the checkpoint).
    def mid_second_trial(epochs: list[int]) -> bool:
        return len(epochs) == 2 and 1 <= epochs[0] < 3

    deadline = time.time() + 400
    while time.time() < deadline and not mid_second_trial(_logged_epochs(uri)):
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.25)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    subprocess.run(["ray", "stop", "--force"], capture_output=True)
    assert mid_second_trial(_logged_epochs(uri)), _logged_epochs(uri)
    assert _logged_epochs(uri, "reference") == [4, 4]

    result = run_cli([str(spec_path), "--resume"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "Leaderboard" in out and "[baseline]" in out and "[kd]" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    assert "registered tiny-student v1" in out and "registered tiny-student v2" in out
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
        assert run.data.params["train.epochs"] == "4"
        # Every epoch once, from 1: the interrupted trial continued from its checkpoint, and
        # the epochs it replayed were not logged again; a finished run was not rerun.
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
        status = run.data.tags["sdd_search.status"]
        expected = [1, 2, 3, 4] if status == "completed" else [1, 2, 3]  # ASHA's rung: 3
        assert steps == expected, (status, steps)
        assert status in ("completed", "stopped")
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
