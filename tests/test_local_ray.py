"""The end-to-end tests' Ray clean-up stops the Ray a test started and no other one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from local_ray import RayOwner
from test_live_view import wait_for

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
