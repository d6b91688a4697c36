"""Checkpoint files: atomic writes, weights-only reads, and the RNG state a resume restores.

Every checkpoint and cache file the package writes goes through :func:`atomic_save`, so a crash
(or a node lost mid-write) never leaves half a file where a reader expects a whole one. Reading
never unpickles arbitrary objects (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.pt"  # a trial checkpoint's file name inside its directory
TRIAL_CHECKPOINT_FORMAT = "sdd-search/trial-v1"

# The RNG states hold numpy arrays and tuples: the only classes a checkpoint may unpickle.
_SAFE_GLOBALS = [
    np.core.multiarray._reconstruct if hasattr(np, "core") else np._core.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically: written to a temporary file in the same folder (same
    file system), then renamed over ``path``. Creates the folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name: two processes saving the same file never write into one another
    # (not mkstemp: its 0600 mode would outlive the rename).
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a trial checkpoint written by :func:`sdd_search.train.run_trial`: its directory or
    the file itself, onto the CPU."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """The torch, numpy, Python (and CUDA, where present) random generators' states."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
