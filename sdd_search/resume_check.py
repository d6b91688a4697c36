"""A resumed search keeps the spec it started with.

Tune restores its experiments with the trial count, scheduler and search space they began with,
so a spec edited between a stop and ``--resume`` (more trials, another space, another recipe)
would be ignored in part or mixed with the old one: half the trials of one search, half of
another. The search writes the fields that decide what it trains and ranks to
``<storage>/<name>/spec.json`` when it starts; ``--resume`` compares and refuses a change in
one line, naming the field. What only decides where and how fast it runs may change: resources,
concurrency, the tracking server, the data and teacher locations, the outage bound.
"""

from __future__ import annotations

import json
from typing import Any

from sdd_search.remote import read_text, write_text
from sdd_search.spec import Spec

SPEC_FILE = "spec.json"

# Fields (dotted prefixes) a resume may change: where and how fast, never what is trained.
MAY_CHANGE = (
    "resources",
    "search.max_concurrent",
    "search.optuna_storage",  # a database that moved; the study in it must be there
    "final.max_concurrent",
    "tracking",
    "storage",
    "data.root",
    "data.cache_dir",
    "data.download",
    "teacher.checkpoint",  # its content is pinned by teacher.sha256 where that is set
    "teacher.cache_dir",
    "train.num_threads",
    "teacher.train.num_threads",
)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= _flat(value, f"{prefix}{key}.")
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): tree}


def _identity(spec: Spec) -> dict[str, Any]:
    """The spec's fields that decide what the search trains and ranks, flattened."""
    flat = _flat(spec.model_dump(mode="json"))
    return {
        k: v
        for k, v in flat.items()
        if not any(k == p or k.startswith(p + ".") for p in MAY_CHANGE)
    }


def record(spec: Spec) -> None:
    """At a new search's start: what it trains and ranks, for a later ``--resume``."""
    write_text(f"{spec.experiment_path()}/{SPEC_FILE}", json.dumps(_identity(spec), indent=1))


def changed_field(spec: Spec) -> str | None:
    """One line naming the first field ``spec`` changes from the search it resumes; None if
    none does (or the search predates the record, which is then written)."""
    text = read_text(f"{spec.experiment_path()}/{SPEC_FILE}")
    if text is None:
        record(spec)
        return None
    started, now = json.loads(text), _identity(spec)
    for key in sorted(set(started) | set(now)):
        if started.get(key, "(unset)") != now.get(key, "(unset)"):
            return (
                f"--resume: {key} is {_show(now.get(key))} here but the search started with "
                f"{_show(started.get(key))}; a resumed search keeps its spec (put it back, or "
                f"--set name=... to start another search)"
            )
    return None


def _show(value: Any) -> str:
    return "(unset)" if value is None else json.dumps(value)
