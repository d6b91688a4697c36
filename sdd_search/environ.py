"""Environment variables set for one block and put back after (no Ray, no MLflow here)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def overridden(settings: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``settings`` in this block; each variable as it was after it (unset
    again where it was unset)."""
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
