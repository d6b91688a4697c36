"""A torn trial checkpoint found on resume: the trial falls back to Train's previous checkpoint,
or restarts from epoch 1 when none loads, says which in one line, and the search carries on.

A real search (real Ray, MLflow sqlite, Optuna) is killed with both trials in flight; then one
trial's newest checkpoint file is truncated on disk, and every checkpoint of the other is
replaced by a PyTorch file that is not a trial checkpoint; then ``--resume``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from test_search import start_driver

pytestmark = pytest.mark.slow

# Epochs cost ~1 s here, a trial's start-up ~30-60 s: 8 epochs let the trial behind (started
# up to ~10 s later on a busy machine) report its first epoch before the one ahead finishes.
EPOCHS = 8


def _logged(client: MlflowClient) -> dict[str, int]:
    """Trial id -> the last epoch MLflow holds for it."""
    experiment = client.get_experiment_by_name("sdd-search/tiny")
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], "tags.`sdd_search.role` = 'trial'")
    return {
        run.data.tags["sdd_search.trial_id"]: max(
            (m.step for m in client.get_metric_history(run.info.run_id, "val_top1")), default=0
        )
        for run in runs
    }


def _checkpoint_files(runs: Path, trial_id: str) -> list[Path]:
    """The trial's checkpoint files in its Train run folder, oldest first (Train names each
    folder checkpoint_<date and time>)."""
    (folder,) = (runs / "tiny" / "train").glob(f"tiny-{trial_id}")
    return sorted(folder.glob("checkpoint_*/checkpoint.pt"))


def test_torn_checkpoints_fall_back_or_restart_and_every_epoch_is_logged_once(
    write_spec, teacher_cache, tmp_path
):
    spec_path = write_spec(
        {
            "train": {"epochs": EPOCHS},
            "search": {"num_trials": 2, "max_concurrent": 2, "references": False},
        }
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    driver = start_driver(spec_path, tmp_path, tmp_path / "first.log")

    # Kill with both trials in flight, the one ahead past epoch 2 (Train keeps its last two
    # checkpoints: the previous one is a whole one to fall back to).
    def in_flight(epochs: list[int]) -> bool:
        return len(epochs) == 2 and epochs[0] >= 1 and 2 <= epochs[1] < EPOCHS

    deadline = time.time() + 400
    while time.time() < deadline and not in_flight(sorted(_logged(client).values())):
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    subprocess.run(["ray", "stop", "--force"], capture_output=True)
    logged = _logged(client)
    assert in_flight(sorted(logged.values())), logged
    ahead, behind = sorted(logged, key=logged.get, reverse=True)

    # The trial ahead: every checkpoint but its oldest truncated (the newest is the one Train
    # restores; a newer folder the kill left half-uploaded is torn too).
    torn = _checkpoint_files(tmp_path / "runs", ahead)
    assert len(torn) >= 2, torn
    for path in torn[1:]:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    # The trial behind: every checkpoint a PyTorch file of someone else's.
    for path in _checkpoint_files(tmp_path / "runs", behind):
        torch.save({"weights": torch.zeros(3)}, path)

    resumed = subprocess.run(
        [sys.executable, "-m", "sdd_search", str(spec_path), "--resume"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "registered tiny-student v1" in resumed.stdout

    experiment = client.get_experiment_by_name("sdd-search/tiny")
    runs = {
        r.data.tags["sdd_search.trial_id"]: r
        for r in client.search_runs([experiment.experiment_id], "tags.`sdd_search.role` = 'trial'")
    }
    assert set(runs) == {ahead, behind}
    checkpoint = r"checkpoint_[\d_.-]+"
    fell_back = runs[ahead].data.tags.get("sdd_search.restore", "")
    assert re.fullmatch(
        rf"{checkpoint} was unreadable \(truncated or corrupt file[^;]*\); "
        rf"resumed from {checkpoint}, epoch (\d)",
        fell_back,
    ), fell_back
    restarted = runs[behind].data.tags.get("sdd_search.restore", "")
    assert re.fullmatch(
        rf"{checkpoint} was unreadable \(not an sdd-search trial checkpoint \(no student, "
        rf"optimizer, epoch, history\)\)(; {checkpoint} was unreadable \([^;]*\))*; "
        r"restarted the trial from epoch 1",
        restarted,
    ), restarted
    for trial_id, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["sdd_search.status"] == "completed"
        for metric in ("val_top1", "train_loss"):  # every epoch once, across the fall-backs
            steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
            assert steps == list(range(1, EPOCHS + 1)), (trial_id, metric, steps)

    # The same line reached Tune (with the first epoch reported after the restart).
    for trial_id, tag in ((ahead, fell_back), (behind, restarted)):
        (result_file,) = (tmp_path / "runs" / "tiny" / "search").glob(f"*{trial_id}*/result.json")
        results = [json.loads(line) for line in result_file.read_text().splitlines()]
        assert {r["worker/restore"] for r in results if "worker/restore" in r} == {tag}
