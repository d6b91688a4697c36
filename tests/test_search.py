"""End to end, as a user runs it: `sdd-search SPEC`, real local Ray, Optuna, MLflow (sqlite)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from sdd_search.tracking import create_sqlite_store

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


def start_driver(
    spec_path: Path, cwd: Path, log_path: Path, env: dict | None = None
) -> subprocess.Popen:
    """`sdd-search SPEC` in its own process group (signals reach it as a terminal's would),
    stdout and stderr to ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "sdd_search", str(spec_path)],
            cwd=cwd,
            env=env or {**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def assert_resume_refused(spec_path: Path, cwd: Path, field: str, here, started) -> None:
    """`--resume --set field=here` on a search that started with ``started``: exit 2 and one
    line naming the spec file and the field, before Ray starts."""
    changed = run_cli([str(spec_path), "--resume", "--set", f"{field}={here}"], cwd=cwd)
    assert changed.returncode == 2 and changed.stderr.strip().splitlines() == [
        f"sdd-search: error: {spec_path}: --resume: {field} is {here} here but the search "
        f"started with {started}; a resumed search keeps its spec (put it back, or --set "
        "name=... to start another search)"
    ], changed.stderr


def child_runs(client: MlflowClient, experiment: str) -> tuple[object, list]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sdd_search.role") == "parent"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


def store_client(uri: str) -> MlflowClient:
    """A client of the store a running driver may be creating at the same moment (MLflow's own
    client creates a missing sqlite store in place: two processes doing it at once clash)."""
    create_sqlite_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def last_logged(uri: str, role: str = "trial", metric: str = "val_top1") -> dict:
    """Each run of one role, as the driver logs them: trial id -> (its MLflow status, the last
    epoch MLflow holds of ``metric``)."""
    client = store_client(uri)
    experiment = client.get_experiment_by_name("sdd-search/tiny")
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], f"tags.`sdd_search.role` = '{role}'")
    return {
        r.data.tags["sdd_search.trial_id"]: (
            r.info.status,
            max((m.step for m in client.get_metric_history(r.info.run_id, metric)), default=0),
        )
        for r in runs
    }


def logged_epochs(uri: str, role: str = "trial") -> list[int]:
    """The last epoch MLflow holds for each run of one role (sorted), as the driver logs them."""
    return sorted(epoch for _, epoch in last_logged(uri, role).values())


def test_spec_yaml_in_repo_matches_embedded_default():
    root = Path(__file__).resolve().parents[1]
    embedded = root / "sdd_search" / "default_spec.yaml"
    assert (root / "search_spaces" / "quickstart.yaml").read_text() == embedded.read_text()
    assert yaml.safe_load(embedded.read_text())["data"]["dataset"] == "digits"


def _write_colour_cifar10(root: Path, per_class: int = 80, test: int = 100) -> None:
    """A CIFAR-10 in its on-disk layout whose classes are easy (one colour each, plus noise)
    and whose TEST labels are scrambled: a model can only score chance on test."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    corners = [[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)]  # far apart in RGB
    palette = np.array([*corners, [0.5, 0.5, 0.5], [0.5, 0, 0]]) * 255

    def images(labels: np.ndarray) -> np.ndarray:
        pixels = palette[labels][:, :, None] + rng.normal(0, 12, (len(labels), 3, 1024))
        return np.clip(pixels, 0, 255).astype(np.uint8).reshape(len(labels), 3072)

    train_labels = rng.permutation(np.repeat(np.arange(10), per_class))
    test_labels = rng.permutation(np.repeat(np.arange(10), test // 10))
    batches = np.array_split(np.arange(len(train_labels)), 5)
    for number, index in enumerate(batches, start=1):
        entry = {"data": images(train_labels[index]), "labels": train_labels[index].tolist()}
        with open(folder / f"data_batch_{number}", "wb") as handle:
            pickle.dump(entry, handle, protocol=2)
    scrambled = rng.permutation(test_labels)  # the images are of test_labels; the file lies
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": images(test_labels), "labels": scrambled.tolist()}, handle, protocol=2)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, handle, protocol=2)


def _final_runs(uri: str, experiment: str = "sdd-search/tiny") -> list:
    client = store_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`sdd_search.role` = 'final'")


def _assert_torn_runs_said_what_they_did(
    runs: Path, final: list, ahead: str, behind: str, printed: str
):
    """The run ahead fell back to its previous checkpoint, the one behind restarted, each in
    one line on its MLflow run, in the results Tune got (with its first epoch after) and in
    what the resumed search printed."""
    by_trial = {r.data.tags["sdd_search.trial_id"]: r for r in final}
    checkpoint = r"checkpoint_[\d_.-]+"
    fell_back = by_trial[ahead].data.tags.get("sdd_search.restore", "")
    assert re.fullmatch(
        rf"{checkpoint} was unreadable \(truncated or corrupt file[^;]*\); "
        rf"resumed from {checkpoint}, epoch (\d)",
        fell_back,
    ), fell_back
    restarted = by_trial[behind].data.tags.get("sdd_search.restore", "")
    assert re.fullmatch(
        rf"{checkpoint} was unreadable \(not an sdd-search trial checkpoint \(no student, "
        rf"optimizer, epoch, history\)\)(; {checkpoint} was unreadable \([^;]*\))*; "
        r"restarted the trial from epoch 1",
        restarted,
    ), restarted
    untouched = [r for t, r in by_trial.items() if t not in (ahead, behind)]
    assert all("sdd_search.restore" not in r.data.tags for r in untouched)
    for trial_id, tag in ((ahead, fell_back), (behind, restarted)):
        name = by_trial[trial_id].info.run_name
        result_file = runs / "tiny" / "final" / name / "result.json"
        results = [json.loads(line) for line in result_file.read_text().splitlines()]
        assert {r["worker/restore"] for r in results if "worker/restore" in r} == {tag}
        assert f"\n[final] {name} {tag}\n" in printed, printed[-3000:]


_REPORT_ROW = re.compile(
    r"^(?P<name>[\w-]+)(?: \*champion\*)?\s+(?P<selection>[\d.]+|n/a)\s+(?P<mean>[\d.]+) ± "
    r"(?P<std>[\d.]+|n/a) \((?P<n>\d+)\)\s+(?P<diff>\(reference\)|[+-][\d.]+ (?:\[[-\d., na/]+\]|\([\w ,]+, no interval\)))"
)


# Final runs: 8 epochs (the search 2), so that a kill can land with two final runs in flight,
# the one ahead past its second epoch (Train keeps the last two checkpoints: one to fall back
# to) and the one behind (started up to ~10 s later on a busy machine) past its first.
FINAL_EPOCHS = 8


def _checkpoint_files(runs: Path, trial_id: str) -> list[Path]:
    """The trial's checkpoint files in its Train run folder, oldest first (Train names each
    folder checkpoint_<date and time>)."""
    (folder,) = (runs / "tiny" / "train").glob(f"tiny-{trial_id}")
    return sorted(folder.glob("checkpoint_*/checkpoint.pt"))


def _kill_window(runs: dict[str, tuple[str, int]]) -> tuple[str, str] | None:
    """(ahead, behind): two final runs in flight, ahead at epoch 2 or later and before its last,
    behind at 1 or later, with at least two final runs finished; None until then."""
    finished = sum(status == "FINISHED" for status, _ in runs.values())
    flying = sorted(
        ((epoch, trial) for trial, (status, epoch) in runs.items() if status == "RUNNING"),
        reverse=True,
    )
    if finished < 2 or len(flying) != 2:
        return None
    (ahead_epoch, ahead), (behind_epoch, behind) = flying
    if 2 <= ahead_epoch < FINAL_EPOCHS and behind_epoch >= 1:
        return ahead, behind
    return None


def test_final_stage_reads_test_once_and_survives_a_kill(
    write_spec, teacher_cache, tmp_path, ray_owner
):
    """Selection never reads the test split (test labels scrambled: the search still scores
    high on selection, the final stage scores chance on test); every finalist and reference
    has one run per seed; a driver killed in the final stage and resumed ends with exactly
    (top_k + 3) x seeds final runs; the printed report equals a direct computation.

    Torn checkpoints: after the kill, one in-flight run's newest checkpoint files are truncated
    (it falls back to the previous one) and every checkpoint of the other is replaced by a
    PyTorch file that is not a trial checkpoint (it restarts from epoch 1); each says so in one
    line, and every epoch of every run is logged once."""
    _write_colour_cifar10(tmp_path / "data")
    spec_path = write_spec(
        {
            "data": {"dataset": "cifar10", "root": str(tmp_path / "data"), "image_size": 8},
            "teacher": {"train": {"batch_size": 32}},
            "train": {"batch_size": 32, "epochs": FINAL_EPOCHS},
            "search": {"num_trials": 2, "max_concurrent": 2, "references": False, "epochs": 2},
            "final": {"top_k": 1, "seeds": 2},
        }
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = store_client(uri)
    driver = start_driver(
        spec_path, tmp_path, tmp_path / "first.log", ray_owner.env({"PYTHONUNBUFFERED": "1"})
    )

    def finished() -> int:
        return sum(r.info.status == "FINISHED" for r in _final_runs(uri))

    # One driver per search: a second one while this one runs is refused, naming it.
    lock = tmp_path / "runs" / "tiny" / "driver.lock"
    while not lock.exists():
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.25)
    second = run_cli([str(spec_path)], cwd=tmp_path)
    (refused,) = second.stderr.strip().splitlines()
    assert second.returncode == 2 and f"running: driver pid {driver.pid} " in refused, refused
    deadline = time.time() + 600
    while time.time() < deadline and _kill_window(last_logged(uri, "final", "train_loss")) is None:
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    ray_owner.stop()  # its Ray: no trial process writes a checkpoint from here on
    assert 2 <= finished() < 8, finished()
    window = _kill_window(last_logged(uri, "final", "train_loss"))
    assert window is not None, last_logged(uri, "final", "train_loss")
    ahead, behind = window

    # The run ahead: every checkpoint but its oldest truncated (the newest is the one Train
    # restores; a newer folder the kill left half-written is torn too).
    torn = _checkpoint_files(tmp_path / "runs", ahead)
    assert len(torn) >= 2, torn
    for path in torn[1:]:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    # The run behind: every checkpoint a PyTorch file of someone else's.
    for path in _checkpoint_files(tmp_path / "runs", behind):
        torch.save({"weights": torch.zeros(3)}, path)

    result = run_cli([str(spec_path), "--resume"], cwd=tmp_path, env_extra=ray_owner.marker)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "driver lock: broke" in result.stdout and not lock.exists()  # the killed driver's
    _, children = child_runs(client, "sdd-search/tiny")

    # (a) selection is high, test is chance: nothing that chose read the test labels.
    searched = [r for r in children if r.data.tags["sdd_search.role"] == "trial"]
    assert len(searched) == 2
    assert all(r.data.metrics["val_top1"] > 60.0 for r in searched), [
        r.data.metrics["val_top1"] for r in searched
    ]
    assert all("test_top1" not in r.data.metrics for r in searched)
    final = [r for r in children if r.data.tags["sdd_search.role"] == "final"]
    _assert_torn_runs_said_what_they_did(tmp_path / "runs", final, ahead, behind, result.stdout)
    # (b, c) exactly one run per (configuration, seed), each with its test score
    pairs = sorted(
        (r.data.tags["sdd_search.final_entry"], r.data.tags["sdd_search.seed"]) for r in final
    )
    entries = ["baseline", "finalist-1", "kd", "paper"]
    assert pairs == [(e, s) for e in entries for s in ("0", "1")]
    for run in final:
        assert run.info.status == "FINISHED"
        assert run.data.params["data.stage"] == "final"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert steps == list(range(1, FINAL_EPOCHS + 1))  # every epoch once, across the kill
        test_steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_top1")]
        assert test_steps == [FINAL_EPOCHS]  # read once, at the last epoch
        assert "val_top1" not in run.data.metrics
    distilled = [r for r in final if r.data.tags["sdd_search.final_entry"] != "baseline"]
    assert max(r.data.metrics["test_top1"] for r in distilled) < 35.0  # chance is 10 %
    finalist_sources = {
        r.data.tags["sdd_search.source_trial"]
        for r in final
        if r.data.tags["sdd_search.final_entry"] == "finalist-1"
    }
    assert len(finalist_sources) == 1
    assert finalist_sources <= {r.data.tags["sdd_search.trial_id"] for r in searched}

    # (d) the printed report is a direct computation from the MLflow runs
    by_entry: dict[str, dict[int, float]] = {}
    for run in final:
        tags = run.data.tags
        by_entry.setdefault(tags["sdd_search.final_entry"], {})[int(tags["sdd_search.seed"])] = (
            run.data.metrics["test_top1"]
        )
    printed = {m["name"]: m for m in map(_REPORT_ROW.match, result.stdout.splitlines()) if m}
    assert set(printed) == set(entries), result.stdout[-3000:]
    from scipy import stats

    for name, scores in by_entry.items():
        values = np.array([scores[s] for s in sorted(scores)])
        row = printed[name]
        assert float(row["mean"]) == pytest.approx(values.mean(), abs=0.006)
        assert float(row["std"]) == pytest.approx(values.std(ddof=1), abs=0.006)
        assert int(row["n"]) == 2
        if name == "kd":
            continue
        kd = np.array([by_entry["kd"][s] for s in sorted(scores)])
        diffs = values - kd
        half = stats.t.ppf(0.975, 1) * diffs.std(ddof=1) / np.sqrt(2)
        expected = f"{diffs.mean():+.2f} [{diffs.mean() - half:.2f}, {diffs.mean() + half:.2f}]"
        if half < 1e-9:  # every seed the same difference (at chance on test: all of them 0)
            expected = f"{diffs.mean():+.2f} (no spread, no interval)"
        assert row["diff"] == expected
    assert "*champion*" in result.stdout and "never by test" in result.stdout
    champion = client.get_model_version_by_alias("tiny-student", "champion")
    assert champion.tags["test_seeds"] == "2"
    assert float(champion.tags["test_top1_mean"]) == pytest.approx(
        np.mean(list(by_entry["finalist-1"].values())), abs=1e-3
    )
    parent, _ = child_runs(client, "sdd-search/tiny")
    assert "final/champion_test_top1_mean" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"final_report.txt", "final_report.csv", "final_report.json"} <= artifacts

    # Resuming the finished search starts no Ray, runs nothing and prints the report again;
    # with a changed spec, it is refused naming the file and the field.
    again = run_cli([str(spec_path), "--resume"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.startswith("sdd-search: search 'tiny' ran to its end already; nothing")
    assert "Search 'tiny': finished" in again.stdout and "[search]" not in again.stdout
    assert_resume_refused(spec_path, tmp_path, "final.seeds", 3, 2)
    assert len(_final_runs(uri)) == 8
    reprinted = {
        m["name"]: m.group(0) for m in map(_REPORT_ROW.match, again.stdout.splitlines()) if m
    }
    assert reprinted == {name: m.group(0) for name, m in printed.items()}
    assert len(client.search_model_versions("name='tiny-student'")) == 1
