"""Checkpoint files: atomic writes, weights-only reads, and the RNG state a resume restores.

Every checkpoint and cache file the package writes goes through :func:`atomic_save`, so a crash
(or a node lost mid-write) never leaves half a file where a reader expects a whole one. Reading
never unpickles arbitrary objects (``torch.load(weights_only=True)``); :func:`load_weights_only`
turns a refused, truncated or corrupt file into a one-line :class:`CheckpointError`.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Any

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


class CheckpointError(ValueError):
    """A file weights-only loading refuses or cannot read: ``str()`` is one line, the path and
    what was wrong ("not a weights-only PyTorch checkpoint (it asks to run posix.system)...")."""


def _asked_global(path: Path, error: Exception) -> str | None:
    """The global a refused file asks for: torch's message names it for the archive format;
    otherwise the file's pickles are scanned (nothing unpickled) for one outside torch's own."""
    from sdd_search.data.safe_pickle import first_foreign_global

    named = re.search(r"GLOBAL ([\w.]+)", str(error))
    if named:
        return named.group(1)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
                data = archive.read(pickles[0]) if pickles else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return None
    return first_foreign_global(data, ("torch.", "collections.OrderedDict"))


def _load_problem(path: Path, error: Exception) -> str:
    """What was wrong with ``path``, in words, from the error torch.load raised."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in text:
        asked = _asked_global(path, error)
        unsupported = re.search(r"(Unsupported [^\n.]*)", text)
        reason = f"it asks to run {asked}" if asked else (unsupported or re.search(".*", text))[1]
        return f"not a weights-only PyTorch checkpoint ({reason}); refusing to load it"
    if path.stat().st_size == 0:
        return "empty file (expected a PyTorch checkpoint)"
    if isinstance(error, EOFError) or "EOF" in text or "truncated" in text:
        return "truncated or corrupt file (unexpected end of data)"
    first = text.split(". ")[0].splitlines()[0] if text.strip() else ""
    if isinstance(error, KeyError | TypeError | ValueError) or not first:
        first = f"{type(error).__name__} {first}".strip()  # a bare "101" says nothing
    return f"truncated or corrupt file, or not a PyTorch checkpoint ({first})"


def load_weights_only(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU (``mmap``: memory-mapped, where the
    file is in torch's archive format). A file it refuses or cannot read is a
    :class:`CheckpointError` saying why in one line; a missing one is FileNotFoundError."""
    path = Path(path)
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol warning: not the user's line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (FileNotFoundError, MemoryError):
        raise
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read it ({error.strerror or error})") from None
    except Exception as error:  # refused, truncated, corrupt, or not a torch file at all
        raise CheckpointError(f"{path}: {_load_problem(path, error)}") from None


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
    the file itself, onto the CPU. A missing, truncated or corrupt file, or one that is not a
    trial checkpoint, is a :class:`CheckpointError` saying why in one line."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (expected a trial checkpoint)")
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        state = load_weights_only(path)
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: not an sdd-search trial checkpoint (a {type(state).__name__})"
        )
    found = state.get("format", TRIAL_CHECKPOINT_FORMAT)  # written before the key existed: none
    if found != TRIAL_CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not an sdd-search trial checkpoint (format {found!r}, expected "
            f"{TRIAL_CHECKPOINT_FORMAT!r})"
        )
    missing = [key for key in ("student", "optimizer", "epoch", "history") if key not in state]
    if missing:
        raise CheckpointError(
            f"{path}: not an sdd-search trial checkpoint (no {', '.join(missing)})"
        )
    return state


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
