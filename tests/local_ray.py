"""The Ray processes one test started, found and stopped by a token in their environment.

A driver that starts a local Ray passes its environment to every process of it (GCS, raylet,
dashboard, agents, and the raylet's workers, whose command lines Ray renames to ``ray::...``
but whose environment stays), so a token put there names them all. The end-to-end tests stop
what they started with :func:`stop`, never ``ray stop --force``, which ends every Ray on the
machine: a developer's own cluster, or another test run's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

OWNER = "SDD_TEST_RAY_OWNER"


class RayOwner:
    """One test's token: ``env`` marks a driver's environment, ``stop`` ends its Ray."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self.marker = {OWNER: self.token}

    def env(self, extra: dict | None = None) -> dict:
        """``os.environ`` with ``extra`` and this test's token."""
        return {**os.environ, **(extra or {}), **self.marker}

    def processes(self) -> list[int]:
        """The pids of the live processes whose environment holds this test's token."""
        marker = f"{OWNER}={self.token}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:  # gone meanwhile, or not ours to read
                continue
            if state != "Z" and marker in environ.split(b"\0"):
                found.append(int(entry.name))
        return found

    def stop(self, timeout: float = 30.0) -> None:
        """SIGKILL every process marked with the token until none is left (a process may still
        start a worker while its siblings die); raise if some outlive ``timeout``."""
        deadline = time.monotonic() + timeout
        while pids := self.processes():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray processes of this test alive after {timeout}s: {pids}")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
