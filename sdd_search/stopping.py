"""SIGTERM stops a search as Ctrl-C does (a scheduler's stop, ``kill``, Kubernetes' pod stop).

The first SIGTERM becomes a SIGINT: Tune's handler stops the experiment cleanly (its state and
the running trials' checkpoints saved; nothing registered); a second one reaches Python's own
SIGINT handler, a KeyboardInterrupt, and the search exits at once, still resumable.
``ray.init`` sets its own SIGTERM handler (``sys.exit``, then its core worker's stack dump), so
:func:`sdd_search.tuning.start_ray` installs this one again once Ray is up. No Ray import here.
"""

from __future__ import annotations

import signal
import threading

_received: list[int] = []
_installed = False


def _stop(signum, frame) -> None:
    _received.append(signum)
    signal.raise_signal(signal.SIGINT)  # Tune's handler, then Python's KeyboardInterrupt


def install() -> None:
    """Handle SIGTERM from now on (main thread only; elsewhere a no-op)."""
    global _installed
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
        _installed = True


def reinstall() -> None:
    """Put the handler back after a library replaced it (``ray.init``), if it was installed."""
    if _installed:
        install()


def terminated() -> bool:
    """Whether a SIGTERM stopped this search."""
    return bool(_received)
