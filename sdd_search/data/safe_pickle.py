"""Reading pickles that may come from anyone: only plain data, never code.

A pickle names the functions its loader must call (``os.system``, ``builtins.exec``...), so
``pickle.load`` on a file from the internet runs whatever the file asks for. :func:`load`
unpickles with an allowlist instead: Python's containers, strings, bytes and numbers, and numpy
arrays (exactly the globals numpy's own array pickles name, in numpy 1 and 2 spellings and every
protocol). Anything else is :class:`PickleRefused`, naming what the file asked to run.
:func:`first_foreign_global` names the first such global without unpickling anything, for
messages about files another loader refused (torch's weights-only loader).
"""

from __future__ import annotations

import builtins
import codecs
import io
import os
import pickle
import pickletools
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import numpy as np

try:  # numpy 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

__all__ = ["PickleRefused", "describe_error", "first_foreign_global", "load", "load_path"]


class PickleRefused(pickle.UnpicklingError):
    """A pickle that asks for a global outside the allowlist; ``name`` is ``module.name``."""

    def __init__(self, name: str) -> None:
        super().__init__(f"it asks to run {name}")
        self.name = name


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Protocol 2 writes bytes as ``_codecs.encode(text, "latin1")``; no other codec."""
    if encoding.replace("-", "").lower() != "latin1":
        raise PickleRefused(f"_codecs.encode(..., {encoding!r})")
    return codecs.encode(text, "latin1")


_NUMPY_GLOBALS: dict[str, Callable[..., Any] | type] = {
    "multiarray._reconstruct": _multiarray._reconstruct,  # ndarray, protocols 0-4
    "multiarray.scalar": _multiarray.scalar,  # numpy scalars (np.int64(3))
    "numeric._frombuffer": _numeric._frombuffer,  # ndarray, protocol 5
}
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    **{
        (f"{package}.{name.split('.')[0]}", name.split(".")[1]): value
        for package in ("numpy.core", "numpy._core")
        for name, value in _NUMPY_GLOBALS.items()
    },
    # Containers protocol 2 spells as globals (Python 2's module name, then Python 3's).
    **{
        (module, name): getattr(builtins, name)
        for module in ("__builtin__", "builtins")
        for name in ("set", "frozenset", "bytearray")
    },
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise PickleRefused(f"{module}.{name}") from None


def load(file: BinaryIO, *, encoding: str = "latin1") -> Any:
    """Unpickle ``file`` allowing only plain data and numpy arrays.

    ``encoding``: how Python 2 ``str`` objects decode (latin1 keeps CIFAR's array bytes intact).
    Raises :class:`PickleRefused` for anything else, EOFError or pickle.UnpicklingError for a
    truncated or corrupt stream (and whatever numpy raises for malformed array data).
    """
    return _RestrictedUnpickler(file, encoding=encoding).load()


def load_path(path: str | os.PathLike) -> Any:
    """:func:`load` on the file at ``path``."""
    with open(path, "rb") as handle:
        return load(handle)


def describe_error(error: BaseException) -> str:
    """Why a :func:`load` failed, for a one-line message about the file: "it asks to run
    posix.system" (refused) or "truncated or corrupt file (...)"."""
    if isinstance(error, PickleRefused):
        return str(error)
    if isinstance(error, EOFError) or "truncated" in str(error):
        return "truncated or corrupt file (unexpected end of data)"
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"truncated or corrupt file ({detail})"


def _globals(stream: BinaryIO) -> Iterator[str]:
    """The ``module.name`` of every global one pickle in ``stream`` names, in order; stops
    quietly where the stream ends or is malformed. STACK_GLOBAL takes its two names from the
    strings pushed (or fetched from the memo) just before it."""
    strings: list[str] = []
    memo: dict[int, str] = {}
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                yield str(arg).replace(" ", ".")
            elif name == "STACK_GLOBAL" and len(strings) >= 2:
                yield f"{strings[-2]}.{strings[-1]}"
            elif isinstance(arg, str) and "UNICODE" in name:
                strings.append(arg)
            elif name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[int(arg)] = strings[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                strings.append(memo[int(arg)])
    except (ValueError, EOFError, pickle.UnpicklingError):
        return


def first_foreign_global(
    data: bytes, allowed_prefixes: tuple[str, ...] = (), *, max_pickles: int = 4
) -> str | None:
    """The first global named by the pickles in ``data`` (up to ``max_pickles`` in a row, as
    torch's legacy format writes them) that neither :func:`load` allows nor starts with one of
    ``allowed_prefixes`` (e.g. ``"torch."``); None if there is none. Nothing is unpickled."""
    stream = io.BytesIO(data)
    for _ in range(max_pickles):
        start = stream.tell()
        for name in _globals(stream):
            module, _, attribute = name.rpartition(".")
            if (module, attribute) not in _ALLOWED and not name.startswith(allowed_prefixes):
                return name
        if stream.tell() == start or stream.tell() >= len(data):
            return None
    return None
