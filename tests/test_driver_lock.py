"""One driver per search: the lock in the search's storage folder, on real files and real
processes (a sleeping ``python`` is a live holder, a finished one's pid a dead one), on an
S3-compatible server (moto, on 127.0.0.1), and through the real CLI. The end-to-end case (a
second driver while a real search runs, the lock of a killed one broken by ``--resume``) rides
on the final-stage kill test in tests/test_search.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdd_search.driver_lock import LOCK_FILE, DriverLock, DriverLockError, hold, stale_reason


@pytest.fixture
def sleeper():
    """A live process that is not this one: (pid), killed at the end."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    yield process
    process.kill()
    process.wait()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: the pid is free
    return process.pid


def _write_lock(folder: Path, **holder) -> Path:
    now = time.time()
    content = {"host": socket.gethostname(), "pid": os.getpid(), "started": now - 60}
    content |= {"command": "sdd-search x.yaml", "heartbeat": now, "token": "theirs"} | holder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps(content))
    return folder / LOCK_FILE


def test_held_refused_with_the_holder_named_then_released(tmp_path):
    folder = tmp_path / "runs" / "tiny"
    with hold(str(folder), "tiny") as lock:
        written = json.loads((folder / LOCK_FILE).read_text())
        assert written["pid"] == os.getpid() and written["host"] == socket.gethostname()
        assert {"started", "command", "heartbeat", "token"} <= set(written)
        with pytest.raises(DriverLockError) as refused:
            DriverLock(str(folder), "tiny").acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith("search 'tiny' is already running: ")
        assert f"driver pid {os.getpid()} on host {socket.gethostname()} since " in message
        assert f"lock {folder / LOCK_FILE}" in message
        assert lock.holder is not None
    assert not (folder / LOCK_FILE).exists()
    with hold(str(folder), "tiny"):  # free again
        pass


@pytest.mark.parametrize("exit_with", [RuntimeError, KeyboardInterrupt])
def test_released_on_an_exception_and_on_ctrl_c(tmp_path, exit_with):
    with pytest.raises(exit_with), hold(str(tmp_path), "tiny"):
        raise exit_with()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_holder_is_refused_until_it_dies(tmp_path, sleeper):
    _write_lock(tmp_path, pid=sleeper.pid)
    with pytest.raises(DriverLockError, match=f"driver pid {sleeper.pid} on host "):
        DriverLock(str(tmp_path), "tiny").acquire()
    sleeper.kill()
    sleeper.wait()
    lines: list[str] = []
    with hold(str(tmp_path), "tiny", log=lines.append):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert lines == [f"driver lock: broke {tmp_path / LOCK_FILE} (its driver (pid "
                     f"{sleeper.pid}) is not running)"]  # fmt: skip


def test_a_dead_pid_on_this_host_is_broken(tmp_path):
    pid = _dead_pid()
    _write_lock(tmp_path, pid=pid)
    lines: list[str] = []
    with hold(str(tmp_path), "tiny", log=lines.append):
        pass
    assert len(lines) == 1 and f"(pid {pid}) is not running" in lines[0]


def test_this_pid_without_the_lock_is_an_earlier_process(tmp_path):
    """A restarted container: the same host name and pid, but this process never took it."""
    _write_lock(tmp_path, pid=os.getpid())
    lines: list[str] = []
    with hold(str(tmp_path), "tiny", log=lines.append):
        pass
    assert "left by an earlier process with this pid" in lines[0]


def test_another_hosts_lock_is_stale_only_without_a_heartbeat(tmp_path, sleeper):
    _write_lock(tmp_path, host="elsewhere", pid=sleeper.pid, heartbeat=time.time() - 10)
    with pytest.raises(DriverLockError, match="on host elsewhere"):
        DriverLock(str(tmp_path), "tiny", stale_seconds=300).acquire()
    _write_lock(tmp_path, host="elsewhere", pid=sleeper.pid, heartbeat=time.time() - 301)
    lines: list[str] = []
    with hold(str(tmp_path), "tiny", stale_seconds=300, log=lines.append):
        pass
    assert "no heartbeat for 30" in lines[0]
    # On this host, a live pid whose heartbeat stopped (a reused pid, a hung driver) too.
    here = {"host": socket.gethostname(), "pid": sleeper.pid, "heartbeat": time.time() - 301}
    assert stale_reason(here).startswith("no heartbeat for 30")


def test_the_holder_keeps_its_heartbeat_fresh(tmp_path):
    """Another host sees a live lock as long as the holder beats, a stale one once it stops."""
    with hold(str(tmp_path), "tiny", heartbeat_seconds=0.2) as lock:
        first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
        time.sleep(1.5)
        beating = json.loads((tmp_path / LOCK_FILE).read_text())
        assert beating["heartbeat"] > first + 0.5
        assert beating["token"] == lock.holder["token"]
        seen_elsewhere = {**beating, "host": "elsewhere"}
        assert stale_reason(seen_elsewhere, stale_seconds=1.0) is None
        assert stale_reason(seen_elsewhere, now=time.time() + 2, stale_seconds=1.0)


def test_an_unreadable_lock_is_broken_once_it_is_old(tmp_path):
    lock = tmp_path / LOCK_FILE
    lock.write_text("{torn")
    old = time.time() - 60
    os.utime(lock, (old, old))
    lines: list[str] = []
    with hold(str(tmp_path), "tiny", log=lines.append):
        pass
    assert "unreadable" in lines[0]


def test_a_lock_on_s3_storage(tmp_path, monkeypatch):
    """The best-effort remote lock, on pyarrow's S3 file system against moto's server."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        }.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket="searches")
        folder = "s3://searches/sdd-search/tiny"
        with hold(folder, "tiny", heartbeat_seconds=0.2):
            body = boto3.client("s3").get_object(
                Bucket="searches", Key="sdd-search/tiny/driver.lock"
            )
            assert json.loads(body["Body"].read())["pid"] == os.getpid()
            with pytest.raises(DriverLockError, match=f"lock {folder}/driver.lock"):
                DriverLock(folder, "tiny").acquire()
        listed = boto3.client("s3").list_objects_v2(Bucket="searches", Prefix="sdd-search/tiny/")
        keys = [entry["Key"] for entry in listed.get("Contents", [])]
        assert "sdd-search/tiny/driver.lock" not in keys, keys  # released
    finally:
        server.stop()


def _resume(spec: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`sdd-search SPEC --resume`, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "sdd_search", str(spec), "--resume"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_second_sdd_search_is_refused_naming_the_running_driver(write_spec, tmp_path, sleeper):
    """Through the CLI, before anything starts: exit 2, one line naming the live driver."""
    spec = write_spec()
    lock = _write_lock(tmp_path / "runs" / "tiny", pid=sleeper.pid, command="sdd-search spec.yaml")
    result = _resume(spec, tmp_path)  # --resume takes the lock too (test_search.py: without)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("sdd-search: error: search 'tiny' is already running: "), line
    assert f"driver pid {sleeper.pid} on host {socket.gethostname()} since " in line
    assert "(sdd-search spec.yaml)" in line and "teacher" not in result.stdout
    assert json.loads(lock.read_text())["pid"] == sleeper.pid  # left alone


def test_a_refused_start_leaves_no_folder_behind(write_spec, tmp_path):
    """`--resume` of a search that does not exist: refused in one line, and the lock's folder
    it made for the check is gone with the lock (no empty runs/tiny/ to confuse a later run)."""
    spec = write_spec()
    result = _resume(spec, tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("sdd-search: error: --resume: no search 'tiny' at "), line
    assert not (tmp_path / "runs" / "tiny").exists()
    # A folder that was there before (the search's own files) is kept, lock gone.
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    with hold(str(tmp_path / "runs" / "tiny"), "tiny"):
        pass
    assert (tmp_path / "runs" / "tiny").is_dir()
    assert not (tmp_path / "runs" / "tiny" / LOCK_FILE).exists()
