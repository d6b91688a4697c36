"""A new sqlite MLflow store, made by several processes at the same moment: two searches started
together on one ``mlflow.db`` (a sweep script), or a reader opening it as a search starts.
MLflow's own client migrates a missing store in place, in whichever process opens it first; two
at once clash (``table ... already exists``) and one search dies before its first trial."""

from __future__ import annotations

import multiprocessing
import os
import stat

from mlflow import MlflowClient

from sdd_search.tracking import SearchTracker, create_sqlite_store

STARTERS = 3


def _start_search(uri: str, barrier, index: int, results) -> None:
    """One search's driver opening its tracker, released with the others at one moment."""
    barrier.wait(timeout=120)
    try:
        tracker = SearchTracker(uri, f"sdd-search/together-{index}", f"/tmp/together-{index}")
        results.put((index, "ok", tracker.experiment_id))
    except Exception as error:  # noqa: BLE001 (the outcome is what the test reads)
        results.put((index, f"{type(error).__name__}: {str(error).splitlines()[0]}", None))


def test_searches_started_together_on_a_new_sqlite_store_all_start(tmp_path):
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"  # its folder does not exist yet either
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(STARTERS)
    results = context.Queue()
    starters = [
        context.Process(target=_start_search, args=(uri, barrier, i, results))
        for i in range(STARTERS)
    ]
    for process in starters:
        process.start()
    outcomes = sorted(results.get(timeout=300) for _ in starters)
    for process in starters:
        process.join(timeout=60)
    assert [outcome for _, outcome, _ in outcomes] == ["ok"] * STARTERS, outcomes
    client = MlflowClient(tracking_uri=uri)
    names = sorted(e.name for e in client.search_experiments())
    assert names == ["Default"] + [f"sdd-search/together-{i}" for i in range(STARTERS)]
    assert os.listdir(tmp_path / "store") == ["mlflow.db"]  # nothing half-made left beside it


def test_a_store_is_made_whole_once_and_an_existing_one_is_left_alone(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store = tmp_path / "mlflow.db"
    create_sqlite_store(uri)
    made = store.stat()
    # The permissions MLflow's own store gets (sqlite's 0644 under the umask), not a temp file's.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(made.st_mode) == 0o644 & ~umask
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("kept")
    create_sqlite_store(uri)  # again: the store with its experiment is not replaced
    assert store.stat().st_ino == made.st_ino
    assert client.get_experiment(experiment).name == "kept"
    assert os.listdir(tmp_path) == ["mlflow.db"]
    create_sqlite_store(f"file://{tmp_path}/runs")  # not a sqlite store: nothing is made
    assert os.listdir(tmp_path) == ["mlflow.db"]


def test_a_file_system_without_hard_links_still_gets_a_whole_store(tmp_path, monkeypatch):
    """Some file systems (FAT, some network mounts) refuse hard links (EPERM): the store built
    beside is moved into place instead."""
    import errno

    import sdd_search.tracking as tracking

    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted", str(source))

    monkeypatch.setattr(tracking.os, "link", no_links)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    SearchTracker(uri, "sdd-search/nolinks", str(tmp_path / "runs"))
    assert os.listdir(tmp_path) == ["mlflow.db"]
    names = [e.name for e in MlflowClient(tracking_uri=uri).search_experiments()]
    assert sorted(names) == ["Default", "sdd-search/nolinks"]
