"""One driver per search: a lock file in the search's storage folder.

``<experiment path>/driver.lock`` holds JSON ``{host, pid, started, command, heartbeat, token}``.
:func:`hold` takes it before anything starts (a second ``sdd-search`` on the same name and
storage, ``--resume`` or not, is refused with a :class:`DriverLockError` naming the running
driver) and gives it back on every way out (return, exception, Ctrl-C; ``atexit`` as a last
resort). While held, a daemon thread rewrites ``heartbeat`` every ``heartbeat_seconds``.

A lock whose holder is dead is broken, saying so: on the same host when its pid is gone (or is
a zombie, or is this very process without holding it: a restarted container), on any host when
its heartbeat is older than ``stale_seconds`` (a driver on another machine that stopped, or a
pid reused by another program). Heartbeats compare the holder's clock with ours: hosts are
assumed NTP-synchronised, well within ``stale_seconds``.

Local folders get an atomic exclusive create (``O_CREAT | O_EXCL``). Remote storage
(``s3://...``, any URI pyarrow opens, as Ray's own storage does) has no atomic create-if-absent
through pyarrow: there the lock is best effort (check, write, read back), which catches a second
driver started seconds or more after the first, not two started in the same instant.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["LOCK_FILE", "DriverLock", "DriverLockError", "hold", "stale_reason"]

LOCK_FILE = "driver.lock"
HEARTBEAT_SECONDS = 30.0  # how often the holder rewrites its heartbeat
STALE_SECONDS = 300.0  # a heartbeat this old means the holder is gone
_UNREADABLE_GRACE_SECONDS = 3.0  # a lock file just created may not hold its JSON yet

_HELD_TOKENS: set[str] = set()  # the locks this process holds (its own pid is no proof)


class DriverLockError(RuntimeError):
    """Another live driver holds the search's lock; ``str()`` is the one-line message."""


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stale_reason(holder: dict, *, now: float | None = None, stale_seconds: float = STALE_SECONDS):
    """Why the lock ``holder`` wrote is stale (a short phrase), or None if its driver lives."""
    now = time.time() if now is None else now
    age = now - float(holder.get("heartbeat", 0))
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if pid == os.getpid() and holder.get("token") not in _HELD_TOKENS:
            return f"left by an earlier process with this pid ({pid})"
        if not _pid_alive(pid):
            return f"its driver (pid {pid}) is not running"
    if age > stale_seconds:
        return f"no heartbeat for {age:.0f} s"
    return None


def _describe(holder: dict) -> str:
    started = datetime.fromtimestamp(float(holder.get("started", 0)), UTC)
    command = holder.get("command") or "?"
    return (
        f"driver pid {holder.get('pid')} on host {holder.get('host')} since "
        f"{started:%Y-%m-%d %H:%M:%S} UTC ({command})"
    )


class _LocalStore:
    """The lock as a local file: created atomically, rewritten by rename."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE

    def __str__(self) -> str:
        return str(self.path)

    def create(self, text: str) -> bool:
        self.made_folder = not self.folder.exists()  # removed with the lock if left empty
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def read(self) -> tuple[str, float] | None:
        """(the lock's text, seconds since it was last written), or None if there is none."""
        try:
            return self.path.read_text(), time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def rewrite(self, text: str) -> None:
        temporary = self.path.with_name(f"{LOCK_FILE}.{uuid.uuid4().hex[:8]}.tmp")
        temporary.write_text(text)
        os.replace(temporary, self.path)

    def remove(self, text: str) -> bool:
        """Delete the lock if it still holds ``text``: moved aside first (atomic), so a lock
        another driver took meanwhile is put back, not deleted."""
        aside = self.path.with_name(f"{LOCK_FILE}.{uuid.uuid4().hex[:8]}.old")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        if aside.read_text() == text:
            aside.unlink()
            if getattr(self, "made_folder", False):  # a refused start leaves no empty folder
                with contextlib.suppress(OSError):  # not empty: the search's own files
                    self.folder.rmdir()
            return True
        with contextlib.suppress(FileExistsError):  # not the one judged: put another's back
            os.link(aside, self.path)
        aside.unlink()
        return False


class _RemoteStore:
    """The lock as an object on pyarrow's file system (s3://...): best effort, see above."""

    def __init__(self, folder: str) -> None:
        from pyarrow import fs

        from sdd_search.remote import filesystem, is_object_store

        self.uri = f"{folder.rstrip('/')}/{LOCK_FILE}"
        # The object stores' endpoint settings (AWS_ENDPOINT_URL...) are sdd_search.remote's.
        opened = filesystem(folder) if is_object_store(folder) else fs.FileSystem.from_uri(folder)
        self.filesystem, folder_path = opened
        self.path = f"{folder_path.rstrip('/')}/{LOCK_FILE}"

    def __str__(self) -> str:
        return self.uri

    def read(self) -> tuple[str, float] | None:
        from pyarrow import fs

        info = self.filesystem.get_file_info(self.path)
        if info.type == fs.FileType.NotFound:
            return None
        with self.filesystem.open_input_stream(self.path) as stream:
            text = stream.read().decode()
        age = time.time() - info.mtime.timestamp() if info.mtime else 0.0
        return text, age

    def rewrite(self, text: str) -> None:
        with self.filesystem.open_output_stream(self.path) as stream:
            stream.write(text.encode())

    def create(self, text: str) -> bool:
        if self.read() is not None:  # best effort: check, write, read back
            return False
        self.rewrite(text)
        time.sleep(0.2)  # let a writer that checked in the same instant land its write
        current = self.read()
        return current is not None and current[0] == text

    def remove(self, text: str) -> bool:
        current = self.read()
        if current is None or current[0] != text:
            return False
        self.filesystem.delete_file(self.path)
        return True


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):
        argv[0:1] = ["python", "-m", Path(argv[0]).parent.name]
    elif argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


class DriverLock:
    """The lock of the search at ``folder`` (its experiment path: a folder or a URI)."""

    def __init__(
        self,
        folder: str,
        name: str,
        *,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        stale_seconds: float = STALE_SECONDS,
        log: Callable[[str], None] = print,
    ) -> None:
        self.store = _RemoteStore(folder) if "://" in folder else _LocalStore(folder)
        self.name, self.log = name, log
        self.heartbeat_seconds, self.stale_seconds = heartbeat_seconds, stale_seconds
        self.holder: dict | None = None
        self._text = ""
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, breaking a dead driver's; DriverLockError if a live one holds it."""
        now = time.time()
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": now}
        holder |= {"command": _command(), "heartbeat": now, "token": uuid.uuid4().hex}
        self._text = json.dumps(holder)
        for _ in range(5):
            if self.store.create(self._text):
                self.holder = holder
                _HELD_TOKENS.add(holder["token"])
                self._start_heartbeat()
                atexit.register(self.release)
                return
            self._break_if_stale()
        raise DriverLockError(f"search {self.name!r}: could not take its lock {self.store}")

    def _break_if_stale(self) -> None:
        """Break the current lock if its holder is dead; raise DriverLockError if it lives."""
        current = self.store.read()
        if current is None:
            return  # released meanwhile: try again
        text, age = current
        try:
            other = json.loads(text)
            reason = stale_reason(other, stale_seconds=self.stale_seconds)
        except (ValueError, TypeError, AttributeError):  # torn, or not ours
            other = {}
            if age < _UNREADABLE_GRACE_SECONDS:
                time.sleep(1.0)  # another driver is writing it right now: look again
                return
            reason = "its lock file is unreadable"
        if reason is None:
            raise DriverLockError(
                f"search {self.name!r} is already running: {_describe(other)}; lock "
                f"{self.store}. Wait for it to finish or stop it (a dead driver's lock is "
                "broken automatically)"
            )
        if self.store.remove(text):
            self.log(f"driver lock: broke {self.store} ({reason})")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="driver-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            with self._guard:
                if self.holder is None:
                    return
                try:
                    current = self.store.read()
                    if current is None or current[0] != self._text:
                        self.log(f"warning: driver lock {self.store} was taken by another driver")
                        return
                    holder = {**self.holder, "heartbeat": time.time()}
                    self.store.rewrite(json.dumps(holder))
                except OSError as error:  # storage away for a moment: beat again next time
                    self.log(f"warning: driver lock {self.store}: heartbeat not written ({error})")
                    continue
                self.holder, self._text = holder, json.dumps(holder)

    def release(self) -> None:
        """Give the lock back (idempotent): stop the heartbeat, delete the file if still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._guard:
            if self.holder is None:
                return
            try:
                self.store.remove(self._text)
            except OSError as error:  # never hide how the search ended behind this
                self.log(f"warning: driver lock {self.store} not removed ({error})")
            finally:
                _HELD_TOKENS.discard(self.holder["token"])
                self.holder = None
                atexit.unregister(self.release)


@contextlib.contextmanager
def hold(folder: str, name: str, **options) -> Iterator[DriverLock]:
    """Hold the driver lock of the search at ``folder`` for the ``with`` block (options as
    :class:`DriverLock`'s); raises DriverLockError if another live driver holds it."""
    lock = DriverLock(folder, name, **options)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
