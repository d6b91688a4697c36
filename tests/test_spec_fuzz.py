"""Bad specs, exhaustively: every field of every ready spec in search_spaces/ made wrong (wrong
type, out of range, unknown key, empty list, wrong nesting) is ``sdd-search FILE --check``
exiting 2 with exactly one line on stderr naming the file and that field, and no traceback.

Each ready spec is loaded as a user would run it here: its data folder and teacher checkpoint
are real stand-ins in a temporary folder (a CIFAR-100 folder to download into, an image folder
with one class, a resnet32x4 checkpoint for 100 classes). One test tries every field with every
applicable mistake once; a property-based one (hypothesis) draws the wrong values themselves.
In-process (``sdd_search.cli.main``), a few milliseconds a spec.
"""

from __future__ import annotations

import copy
import io
import math
import types
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from sdd_search.cli import main
from sdd_search.config import TrialConfig
from sdd_search.space import SEARCHABLE
from sdd_search.spec import Spec

READY = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))
UNKNOWN = "bogus_field"
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
MODEL_FIELDS = {("teacher", "model"), ("student", "model")}
FREE_KEYS = {("resources", "custom")}  # a mapping whose keys are the user's own names


# ----------------------------------------------------------------------------------------------
# The ready specs, loadable here
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ready(tmp_path_factory) -> dict[str, dict]:
    """Spec name -> its YAML tree, with data.root and teacher.checkpoint pointing at real
    stand-ins; each passes ``--check`` as it is."""
    import torch

    from sdd_search.models import create_model

    folder = tmp_path_factory.mktemp("ready")
    (folder / "cifar" / "cifar-100-python").mkdir(parents=True)  # download: true fills it
    for split in ("train", "val"):
        (folder / "images" / split / "n01").mkdir(parents=True)
        (folder / "images" / split / "n01" / "0.jpg").write_bytes(b"\xff\xd8")
    teacher = folder / "resnet32x4.pth"
    torch.save({"model": create_model("resnet32x4", num_classes=100).state_dict()}, teacher)
    trees = {}
    for path in READY:
        tree = yaml.safe_load(path.read_text())
        dataset = tree.get("data", {}).get("dataset", "digits")
        if dataset.startswith("cifar"):
            tree["data"]["root"] = str(folder / "cifar")
        elif dataset == "imagefolder":
            tree["data"]["root"] = str(folder / "images")
        if tree.get("teacher", {}).get("source") == "checkpoint":
            tree["teacher"]["checkpoint"] = str(teacher)
        trees[path.name] = tree
        code, out, err = _check(folder / path.name, tree)
        assert code == 0 and out.rstrip().endswith("spec OK"), err
    return trees


def _check(path: Path, tree: Any) -> tuple[int, str, str]:
    """Write ``tree`` to ``path`` and run ``sdd-search path --check``: (exit, stdout, stderr)."""
    path.write_text(yaml.dump(tree, Dumper=_DUMPER, sort_keys=False))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(path), "--check"])
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------------------------
# What each field is (from the pydantic models) and what makes it wrong
# ----------------------------------------------------------------------------------------------


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [arg for arg in get_args(annotation) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def _field(path: tuple[str, ...]):
    """(the pydantic FieldInfo at ``path``, its annotation without None), or (None, None) for a
    key inside a mapping such as space or resources.custom (its annotation only)."""
    info, annotation = None, Spec
    for part in path:
        annotation = _strip_optional(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            info = annotation.model_fields.get(part)
            if info is None:
                return None, None
            annotation = info.annotation
        elif get_origin(annotation) is dict:
            info, annotation = None, get_args(annotation)[1]
        else:
            return None, None
    return info, _strip_optional(annotation)


def _bounds(info) -> dict[str, float]:
    bounds: dict[str, float] = {}
    for item in getattr(info, "metadata", []):
        for name in ("ge", "gt", "le", "lt"):
            if getattr(item, name, None) is not None:
                bounds[name] = getattr(item, name)
    return bounds


def _outside(bounds: dict[str, float], integer: bool) -> list[float]:
    """A value just outside each bound (NaN too for floats: it passes no comparison)."""
    values = []
    if "ge" in bounds:
        values.append(bounds["ge"] - 1 if integer else bounds["ge"] - 0.5)
    if "gt" in bounds:
        values.append(bounds["gt"] - 1 if integer else bounds["gt"])
    if "le" in bounds:
        values.append(bounds["le"] + 1)
    if "lt" in bounds:
        values.append(bounds["lt"] if not integer else bounds["lt"] + 1)
    if values and not integer:
        values.append(math.nan)
    return values


def _knob_bounds(knob: str) -> tuple[dict[str, float], bool]:
    """The bounds a searched knob's own field has (space.<knob>.low/high must keep them)."""
    section = TrialConfig.model_fields[SEARCHABLE[knob]].annotation
    info = section.model_fields[knob]
    return _bounds(info), info.annotation is int


def _out_of_range(path: tuple[str, ...], value: Any) -> list[Any]:
    """Values of the right type that the field must refuse."""
    if path == ("name",):
        return ["has spaces", "-starts-with-a-dash"]
    if path in MODEL_FIELDS:
        return ["resnet33", "torchvision/resnet51"]
    if path == ("search", "metric"):
        return ["accuracy"]
    if path == ("train", "milestones"):
        return [[10**6]]  # beyond train.epochs
    if path[0] == "space" and len(path) == 3 and path[1] in SEARCHABLE:
        knob, part = path[1], path[2]
        if part == "choices":
            if knob == "scales":
                return [[[2, 4]], [[1, 4, 2]], [[]]]
            if knob == "base":
                return [["kd", "crd"]]
            bounds, integer = _knob_bounds(knob)
            return [[bad] for bad in _outside(bounds, integer)]
        if part in ("low", "high"):
            bounds, integer = _knob_bounds(knob)
            return _outside(bounds, integer)
    info, annotation = _field(path)
    if get_origin(annotation) is Literal:
        return ["not-a-choice"]
    if annotation in (int, float) and info is not None:
        return _outside(_bounds(info), annotation is int)
    return []


def _wrong_types(value: Any) -> list[Any]:
    """Values of another type than ``value``'s that no field of its kind accepts."""
    if isinstance(value, dict):
        return [5, "text", [1, 2]]  # a section given as a scalar or a list
    if isinstance(value, bool):
        return ["maybe", 7, {"nested": 1}]
    if isinstance(value, int | float):
        return ["many", [1], {"nested": 1}]
    if isinstance(value, str):
        return [5, [value], {"nested": 1}]
    if isinstance(value, list):
        return ["1, 2", 5, {"nested": 1}]
    return []


@dataclass(frozen=True)
class Mutation:
    spec: str
    path: tuple[str, ...]
    kind: str  # wrong type, out of range, unknown key, empty list
    value: Any

    def apply(self, tree: dict) -> dict:
        tree = copy.deepcopy(tree)
        node = tree
        for part in self.path[:-1]:
            node = node[part]
        if self.kind == "unknown key":
            target = node[self.path[-1]] if self.path else tree
            target[UNKNOWN] = self.value
        else:
            node[self.path[-1]] = self.value
        return tree

    @property
    def field(self) -> str:
        return ".".join((*self.path, UNKNOWN) if self.kind == "unknown key" else self.path)


def _paths(tree: dict, prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        yield (*prefix, key), value
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))


def _unwritten(tree: dict, model: type[BaseModel] = Spec, prefix: tuple[str, ...] = ()):
    """(path, annotation) of every field the models have that ``tree`` leaves out, in every
    section it writes (the knobs of space included): left out is not left untested."""
    for name, info in model.model_fields.items():
        annotation = _strip_optional(info.annotation)
        value = tree.get(name)
        if name not in tree:
            yield (*prefix, name), annotation
        elif isinstance(value, dict) and isinstance(annotation, type):
            if issubclass(annotation, BaseModel):
                yield from _unwritten(value, annotation, (*prefix, name))
        elif isinstance(value, dict) and get_origin(annotation) is dict:
            inner = get_args(annotation)[1]
            for key, entry in value.items():
                if isinstance(entry, dict) and issubclass(inner, BaseModel):
                    yield from _unwritten(entry, inner, (*prefix, name, key))


def _wrong_for(annotation: Any) -> Any:
    """A value no field of this annotation accepts."""
    if annotation in (int, float):
        return "many"
    if annotation is bool:
        return "maybe"
    return 5  # str, Literal, list, mapping, section


def mutations(spec: str, tree: dict) -> list[Mutation]:
    """Every mistake this test makes of ``tree``: each field x each kind that applies, for the
    fields it writes and for those it leaves to the defaults."""
    found = [Mutation(spec, (), "unknown key", 1)]
    for path, annotation in _unwritten(tree):
        found.append(Mutation(spec, path, "wrong type", _wrong_for(annotation)))
        found += [Mutation(spec, path, "out of range", bad) for bad in _out_of_range(path, None)]
    for path, value in _paths(tree):
        found += [Mutation(spec, path, "wrong type", wrong) for wrong in _wrong_types(value)]
        found += [Mutation(spec, path, "out of range", bad) for bad in _out_of_range(path, value)]
        if isinstance(value, dict) and path not in FREE_KEYS:
            unknown = {"low": 1.0, "high": 2.0} if path == ("space",) else 1
            found.append(Mutation(spec, path, "unknown key", unknown))
        if isinstance(value, list) and (path == ("distill", "scales") or path[-1] == "choices"):
            found.append(Mutation(spec, path, "empty list", []))
    return found


def _problem(mutation: Mutation, code: int, out: str, err: str, spec_path: Path) -> str | None:
    """None when the outcome is right: exit 2, one stderr line naming the file and the field
    (or, for a value inside a searched knob, the knob: space.<knob>)."""
    lines = err.strip().splitlines()
    prefix = f"sdd-search: error: {spec_path}: "
    if code != 2 or len(lines) != 1 or not lines[0].startswith(prefix) or "Traceback" in err:
        return f"exit {code}, stderr {err.strip()[-300:]!r}, stdout {out.strip()[-100:]!r}"
    named = lines[0][len(prefix) :].split(": ")[0]
    wanted = mutation.field
    knob = ".".join(mutation.path[:2]) if mutation.path[:1] == ("space",) else None
    if named in (wanted, knob) or named.startswith(f"{wanted}."):
        return None
    return f"names {named!r}, not {wanted!r}: {lines[0]}"


def _run(mutation: Mutation, ready: dict[str, dict], folder: Path) -> str | None:
    spec_path = folder / mutation.spec
    try:
        code, out, err = _check(spec_path, mutation.apply(ready[mutation.spec]))
    except BaseException as error:  # a traceback is the bug this test is for
        return f"raised {type(error).__name__}: {error}"
    return _problem(mutation, code, out, err, spec_path)


# ----------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------


def test_every_field_of_every_ready_spec_made_wrong(ready, tmp_path):
    cases = [m for name, tree in ready.items() for m in mutations(name, tree)]
    kinds = {m.kind for m in cases}
    assert kinds == {"wrong type", "out of range", "unknown key", "empty list"}
    assert len({(m.spec, m.path) for m in cases}) > 200  # every field of five specs
    failures = [
        f"{m.spec} {m.field} = {m.value!r} ({m.kind}): {problem}"
        for m in cases
        if (problem := _run(m, ready, tmp_path))
    ]
    assert not failures, f"{len(failures)} of {len(cases)}:\n" + "\n".join(failures[:40])


_LETTERS = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8).filter(
    lambda text: text not in {"y", "n", "yes", "no", "on", "off", "true", "false", "t", "f"}
)
_SCALARS = st.one_of(st.integers(-(10**6), 10**6), _LETTERS)
_NESTED = st.dictionaries(_LETTERS, _SCALARS, min_size=1, max_size=3)


def _wrong_type_strategy(value: Any) -> st.SearchStrategy:
    """Random values of another type than ``value``'s (no str/number coercion can rescue)."""
    if isinstance(value, dict):
        return st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3))
    if isinstance(value, bool):
        return st.one_of(_LETTERS, st.integers(2, 10**6), _NESTED)
    if isinstance(value, int | float):
        return st.one_of(_LETTERS, st.lists(_SCALARS, min_size=1, max_size=3), _NESTED)
    if isinstance(value, str):
        return st.one_of(
            st.integers(), st.floats(allow_nan=False), st.lists(_SCALARS, max_size=3), _NESTED
        )
    return st.one_of(_LETTERS, st.integers(), _NESTED)  # a list


@st.composite
def random_mutations(draw, ready: dict[str, dict]) -> Mutation:
    name = draw(st.sampled_from(sorted(ready)))
    tree = ready[name]
    path, value = draw(st.sampled_from(list(_paths(tree))))
    kind = draw(st.sampled_from(["wrong type", "out of range", "unknown key"]))
    if kind == "out of range":
        bad = _out_of_range(path, value)
        if bad:
            return Mutation(name, path, kind, draw(st.sampled_from(bad)))
        kind = "wrong type"
    if kind == "unknown key" and isinstance(value, dict) and path not in FREE_KEYS:
        extra = {"low": 1.0, "high": 2.0} if path == ("space",) else draw(_SCALARS)
        return Mutation(name, path, kind, extra)
    return Mutation(name, path, "wrong type", draw(_wrong_type_strategy(value)))


def test_random_wrong_values_are_one_line_errors(ready, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(random_mutations(ready))
    def check(mutation: Mutation) -> None:
        problem = _run(mutation, ready, folder)
        assert problem is None, f"{mutation.spec} {mutation.field} = {mutation.value!r}: {problem}"

    check()


def test_the_mutations_cover_every_kind_on_every_spec(ready):
    """The exhaustive test above is only as good as its list: each spec gets each kind."""
    for name, tree in ready.items():
        kinds = {m.kind for m in mutations(name, tree)}
        assert {"wrong type", "out of range", "unknown key", "empty list"} <= kinds, name
        fields = {m.path for m in mutations(name, tree)}
        assert fields >= {path for path, _ in _paths(tree)}, name  # no field left out
        assert fields >= {path for path, _ in _unwritten(tree)}, name
        assert ("data", "selection_fraction") in fields and ("tracking", "alias") in fields
