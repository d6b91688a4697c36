"""Two Rays on one machine: the end-to-end tests' clean-up stops the Ray a test started and no
other one, and a search keeps its trials when another Ray starts beside its own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from local_ray import RayOwner
from test_live_view import wait_for
from test_mlflow_ui import free_port

pytestmark = pytest.mark.slow

# A driver with a local Ray of its own and one worker process (an actor), as `sdd-search` has.
DRIVER = (
    "import ray, time\n"
    "ray.init(address='local', include_dashboard=False, log_to_driver=False)\n"
    "@ray.remote\n"
    "class Alive:\n"
    "    def pid(self):\n"
    "        import os; return os.getpid()\n"
    "actor = Alive.remote()\n"
    "print(ray.get(actor.pid.remote()), flush=True)\n"
    "time.sleep(600)\n"
)


def start(owner: RayOwner, out: Path) -> tuple[subprocess.Popen, int]:
    """The driver, and the pid of its actor's worker once it is up."""
    with open(out, "w") as handle:
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER],
            env=owner.env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def worker_pid() -> int | None:
        printed = out.read_text().split()
        assert driver.poll() is None, out.read_text()
        return int(printed[-1]) if printed and printed[-1].isdigit() else None

    return driver, wait_for(worker_pid, 60, "the driver's actor", out.read_text)


def test_stop_ends_this_tests_ray_and_leaves_another_running(tmp_path):
    mine, theirs = RayOwner(), RayOwner()
    try:
        driver, worker = start(mine, tmp_path / "mine.log")
        other, other_worker = start(theirs, tmp_path / "theirs.log")
        found = set(mine.processes())
        # The driver, its Ray's daemons (GCS, raylet, ...) and the worker Ray renamed ray::Alive.
        assert {driver.pid, worker} <= found and len(found) >= 4, found
        assert not found & set(theirs.processes())
        mine.stop()
        assert mine.processes() == [] and driver.wait(timeout=10) is not None
        assert other.poll() is None and other_worker in theirs.processes()
    finally:
        mine.stop()
        theirs.stop()


def gcs_server(pid: int) -> bool:
    try:
        return b"gcs_server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_a_search_keeps_its_trial_when_another_ray_starts_beside_it(
    write_spec, teacher_cache, tmp_path, ray_owner
):
    """`ray start --head` on the machine mid-search (a user's own Ray) makes that Ray the one
    Ray's state API finds by default (/tmp/ray/ray_current_cluster). The search's trial, which
    may not fail even once, trains to its end: Ray Train's placement-group cleaner asks the
    search's own Ray whether the trial's controller lives (asking the other one, it finds no
    such controller and removes the trial's placement group)."""
    from test_search import last_logged, logged_epochs, start_driver

    epochs = 12
    spec_path = write_spec(
        {
            "train": {"epochs": epochs},
            "resources": {"max_failures": 0},
            "search": {"num_trials": 1, "top_k": 0, "max_failures": 0},
        }
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    log = tmp_path / "search.log"
    newest = Path("/tmp/ray/ray_current_cluster")
    before = newest.read_text() if newest.exists() else None
    driver = start_driver(spec_path, tmp_path, log, ray_owner.env({"PYTHONUNBUFFERED": "1"}))
    neighbour = RayOwner()
    try:
        # Once the search's own Ray is up (its GCS), before its trial trains: the other Ray
        # starts while the trial's workers do.
        wait_for(
            lambda: any(gcs_server(pid) for pid in ray_owner.processes()) or driver.poll(),
            300,
            "the search's Ray",
            log.read_text,
        )
        assert driver.poll() is None, log.read_text()[-3000:]
        port = free_port()
        started = subprocess.run(
            ["ray", "start", "--head", f"--port={port}", f"--dashboard-port={free_port()}"]
            + ["--include-dashboard=true", "--num-cpus=0", "--disable-usage-stats"],
            env=neighbour.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        assert newest.read_text().strip().endswith(f":{port}")  # the Ray found by default
        training = max(logged_epochs(uri), default=0)
        assert training <= epochs - 4, "the trial ended before the other Ray was up"
        code = driver.wait(timeout=400)
    finally:
        neighbour.stop()
        if before is None:
            newest.unlink(missing_ok=True)
        else:
            newest.write_text(before)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "failed" not in text, text[-3000:]
    # The search says where its own Ray's dashboard is (not Ray's default 8265, which a Ray
    # starting at the same moment could take first).
    (line,) = [t for t in text.splitlines() if t.startswith("ray: a local Ray")]
    assert re.fullmatch(r"ray: a local Ray of this search's own; its dashboard at "
                        r"http://127\.0\.0\.1:\d+", line), line  # fmt: skip
    assert list(last_logged(uri).values()) == [("FINISHED", epochs)], text[-3000:]
