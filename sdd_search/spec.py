"""The search spec: one YAML file says what to distil, what to search and where to keep it.

``load_spec(path, overrides)`` validates everything before any trial starts; every mistake is a
:class:`SpecError` whose message is one line naming the file, the field and what was expected::

    search_spaces/x.yaml: search.num_trials: expected an integer >= 1, got 0
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from sdd_search.config import (
    BASE_LOSSES,
    PRESETS,
    DataConfig,
    DistillConfig,
    StrictModel,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    TrialConfig,
    validate_scales,
)
from sdd_search.remote import RemoteError, file_problem, is_download, is_object_store, root_problem
from sdd_search.space import SEARCHABLE, is_integer_knob, proxy_trial

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's where built: 20x faster


class SpecError(ValueError):
    """A spec mistake; ``str(error)`` is the one-line message for the user."""


class ParamSpace(StrictModel):
    """One searched knob: a range (low/high, optional log and step) or a list of choices."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    type: Literal["float", "int"] = "float"
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> ParamSpace:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices must not be empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("expected low and high (a range) or choices (a list)")
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


class ResourcesConfig(StrictModel):
    """What one trial asks of the cluster (Ray Train's ScalingConfig)."""

    workers: int = Field(1, ge=1, description="data-parallel workers per trial")
    gpus_per_worker: float = Field(0.0, ge=0, description="0 = CPU; a fraction packs trials")
    cpus_per_worker: float = Field(1.0, gt=0)
    custom: dict[str, float] = Field(default_factory=dict, description="e.g. {gpu_1x: 1}")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")


class SearchConfig(StrictModel):
    metric: str = "val_top1"
    mode: Literal["max", "min"] = "max"
    num_trials: int = Field(8, ge=1)
    max_concurrent: int = Field(2, ge=1)
    sampler: Literal["tpe", "random", "cmaes", "gp"] = "tpe"
    seed: int = 0
    baseline_first: bool = Field(True, description="evaluate the spec's own values first")
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs before ASHA may stop a trial")
    reduction_factor: float = Field(3.0, gt=1)
    max_failures: int = Field(1, ge=0, description="Tune retries of a failed trial")
    top_k: int = Field(3, ge=0, description="best students logged and registered in MLflow")
    references: bool = Field(True, description="also train a baseline and a plain-KD student")
    epochs: int | None = Field(
        None,
        ge=1,
        description="search fidelity: search trials (and their references) train this many "
        "epochs, the recipe's milestones and warm-ups scaled to fit, so each completes a whole "
        "short schedule; None = the full recipe (train.epochs)",
    )
    optuna_storage: str | None = Field(
        None,
        description="the Optuna study's storage, a SQLAlchemy URL (sqlite:///path/optuna.db, "
        "postgresql://user@host/db); None = optuna.db in the search's folder",
    )

    @field_validator("optuna_storage")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z][A-Za-z0-9+._-]*://", value):
            raise ValueError(
                "expected a SQLAlchemy URL such as sqlite:///path/optuna.db or "
                "postgresql://user@host/db"
            )
        return value


class FinalConfig(StrictModel):
    """The final stage: the best configurations by the search's selection metric and the
    references, each retrained with the same seeds at the full recipe on all the training
    data (train + selection), each scored once on the test split at its last epoch."""

    top_k: int = Field(3, ge=1, description="configurations taken from the search, best first")
    seeds: int = Field(3, ge=1, description="runs per configuration, seeds train.seed + 0, 1, ...")
    references: bool = Field(
        True, description="also the label-only baseline, plain KD and the spec's own SDD point"
    )
    max_concurrent: int | None = Field(None, ge=1, description="None = search.max_concurrent")


class TrackingConfig(StrictModel):
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI")
    experiment: str | None = Field(None, description="None = sdd-search/<name>")
    registered_model: str | None = Field(None, description="None = <name>-student")
    alias: str = "champion"
    artifact_location: str | None = None
    outage_seconds: float = Field(
        600.0,
        gt=0,
        description="how long a tracking server may stay away mid-search (the trials train on, "
        "their tracking calls wait) before the search stops, resumable",
    )


class Spec(BaseModel):
    """A whole search: the trial it starts from, the space around it, and where things go."""

    model_config = {"extra": "forbid"}

    name: str = Field("sdd-search", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    preset: Literal["cifar100", "imagenet"] | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    space: dict[str, ParamSpace] = Field(default_factory=dict)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    final: FinalConfig | None = Field(None, description="the final stage; None = off")
    storage: str = Field("./sdd_runs", description="local folder or s3://bucket/prefix")

    @property
    def trial(self) -> TrialConfig:
        return TrialConfig(
            data=self.data,
            teacher=self.teacher,
            student=self.student,
            distill=self.distill,
            train=self.train,
        )

    @property
    def search_trial(self) -> TrialConfig:
        """The trial search trials start from: the spec's, at the search's fidelity."""
        return proxy_trial(self.trial, self.search.epochs)

    @property
    def final_trial(self) -> TrialConfig:
        """The trial final-stage runs start from: the full recipe, all the training data."""
        trial = self.trial
        return trial.model_copy(update={"data": trial.data.model_copy(update={"stage": "final"})})

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or f"sdd-search/{self.name}"

    @property
    def registered_model_name(self) -> str:
        return self.tracking.registered_model or f"{self.name}-student"

    def storage_uri(self) -> str:
        """Absolute local path or the remote URI as given."""
        if "://" in self.storage:
            return self.storage
        return str(Path(self.storage).expanduser().resolve())

    def experiment_path(self) -> str:
        return f"{self.storage_uri().rstrip('/')}/{self.name}"

    @model_validator(mode="after")
    def _normalise(self) -> Spec:
        """Settle what a spec implies, once, as it is built (the checks never change a spec):
        no more trials at once than trials; a knob whose field is an int samples whole numbers.
        New section objects are assigned, so a section passed in by a caller stays as it was."""
        if self.search.max_concurrent > self.search.num_trials:
            self.search = self.search.model_copy(update={"max_concurrent": self.search.num_trials})
        integer = {
            knob
            for knob, space in self.space.items()
            if knob in SEARCHABLE
            and knob not in ("scales", "base")
            and space.type != "int"
            and is_integer_knob(knob)
        }
        if integer:  # e.g. warmup_epochs: sample whole numbers only
            self.space = {
                knob: space.model_copy(update={"type": "int"}) if knob in integer else space
                for knob, space in self.space.items()
            }
        return self


def _describe_error(error: dict) -> str:
    location = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-"))
    message = error["msg"].removeprefix("Value error, ")
    kind = error["type"]
    field, _, rest = message.partition(": ")
    if location and field.startswith(f"{location}.") and " " not in field:
        return f"{field}: {rest}"  # a section's own check, naming the field it is about
    if kind == "extra_forbidden":
        message = "unknown field (check the spelling; see search_spaces/quickstart.yaml)"
    elif kind == "literal_error":
        message = message.replace("Input should be", "expected")
    elif "input" in error and kind not in ("missing",):
        got = error["input"]
        if not isinstance(got, dict | list) or len(repr(got)) < 60:
            message = f"{message}, got {got!r}"
    return f"{location or '(top level)'}: {message}"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"--set {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``search.num_trials=64`` -> ("search.num_trials", 64); the value is parsed as YAML."""
    if "=" not in text:
        raise SpecError(f"--set {text}: expected FIELD=VALUE, e.g. --set search.num_trials=64")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise SpecError(f"--set {text}: expected FIELD=VALUE, e.g. --set search.num_trials=64")
    try:
        return key, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return key, raw


def _apply_preset(raw: dict) -> dict:
    """Start train/distill from a paper recipe; the file's own values win."""
    preset = raw.get("preset")
    if not isinstance(preset, str) or preset not in PRESETS:
        return raw
    if any(raw.get(section) is not None and not isinstance(raw[section], dict)
           for section in ("train", "distill")):  # fmt: skip
        return raw  # not a mapping: validation names the section
    merged = copy.deepcopy(raw)
    merged["train"] = {**PRESETS[preset]["train"], **(raw.get("train") or {})}
    base = (raw.get("distill") or {}).get("base", "kd")
    merged["distill"] = {**PRESETS[preset].get(f"distill_{base}", {}), **(raw.get("distill") or {})}
    return merged


def spec_from_dict(raw: Any, source: str = "<spec>") -> Spec:
    """Validate a parsed spec; SpecError names ``source`` and the field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(
            f"{source}: expected a mapping of sections (data, teacher, ...), got {type(raw).__name__}"
        )
    preset = raw.get("preset")
    if preset is not None and not (isinstance(preset, str) and preset in PRESETS):
        raise SpecError(
            f"{source}: preset: expected one of {', '.join(PRESETS)}, got {raw['preset']!r}"
        )
    try:
        spec = Spec.model_validate(_apply_preset(raw))
    except ValidationError as error:
        first = error.errors()[0]
        raise SpecError(f"{source}: {_describe_error(first)}") from None
    _check_semantics(spec, source)
    return spec


def load_spec(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    """Read, override (``--set a.b=c``), and validate a spec file. None = the embedded default."""
    if path is None:
        path = default_spec_path()
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{source}: no such spec file") from None
    except IsADirectoryError:
        raise SpecError(f"{source}: is a folder, expected a YAML spec file") from None
    try:
        raw = yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SpecError(f"{source}: {where}not valid YAML ({problem})") from None
    raw = raw if raw is not None else {}
    for override in overrides:
        key, value = parse_override(override)
        if not isinstance(raw, dict):
            break
        _set_dotted(raw, key, value)
    return spec_from_dict(raw, source)


def default_spec_path() -> Path:
    """The embedded default spec (digits, CPU, local Ray, local MLflow)."""
    return Path(__file__).parent / "default_spec.yaml"


def _check_schedule(spec: Spec, fail) -> None:
    """The search's schedule fits the recipe; the data stage is the tool's, not the spec's."""
    search_epochs = spec.search_trial.train.epochs
    if spec.search.epochs is not None and spec.search.epochs > spec.train.epochs:
        fail("search.epochs", f"must be <= train.epochs ({spec.train.epochs})")
    if spec.search.scheduler == "asha" and spec.search.grace_period > search_epochs:
        which = "search.epochs" if spec.search.epochs is not None else "train.epochs"
        fail("search.grace_period", f"must be <= {which} ({search_epochs})")
    if spec.data.stage != "search":
        fail("data.stage", "is set by the final stage; leave it out of specs")


def _check_paths(spec: Spec, fail) -> None:
    """data.root and teacher.checkpoint exist where the trials read them: a local path on this
    disk; an s3:// or gs:// one in the object store's listing (sdd_search.remote), nothing
    downloaded; an https:// teacher when the search starts (it downloads it)."""
    if is_object_store(spec.data.root):  # checked where the trials read it: the object store
        try:
            problem = root_problem(spec.data.dataset, spec.data.root, spec.data.download)
        except RemoteError as error:
            problem = str(error)
        if problem:
            fail("data.root", problem)
    elif spec.data.root and spec.data.dataset in ("cifar100", "cifar10", "imagefolder"):
        root = Path(spec.data.root).expanduser()
        if spec.data.dataset == "imagefolder" and not root.is_dir():
            fail("data.root", f"no folder at {root} (expected train/ and val/ class folders)")
        if not root.exists() and not spec.data.download:
            fail("data.root", f"no folder at {root} (or set data.download: true)")
        if spec.data.dataset == "imagefolder":
            for split in ("train", "val"):
                if not (root / split).is_dir():
                    fail("data.root", f"expected {root / split}/<class>/*.jpg")
    if (
        spec.data.dataset in ("cifar100", "cifar10")
        and not spec.data.root
        and not spec.data.download
    ):
        fail("data.root", f"{spec.data.dataset} needs data.root (or data.download: true)")
    if spec.teacher.source == "checkpoint" and is_download(spec.teacher.checkpoint):
        try:
            problem = file_problem(spec.teacher.checkpoint)
        except RemoteError as error:
            problem = str(error)
        if problem:
            fail("teacher.checkpoint", problem)
    elif spec.teacher.source == "checkpoint":
        checkpoint = Path(spec.teacher.checkpoint).expanduser()
        if not checkpoint.is_file():
            fail("teacher.checkpoint", f"no file at {checkpoint}")


def _check_semantics(spec: Spec, source: str) -> None:
    """Cross-field checks pydantic cannot express; all run before any trial starts.

    Pure: raises SpecError (``source`` names the file) or returns, never changes ``spec``.
    """

    from sdd_search.models import model_name_problem  # here: torch only once a spec is checked

    def fail(field: str, message: str) -> None:
        raise SpecError(f"{source}: {field}: {message}")

    for field, name in (
        ("teacher.model", spec.teacher.model),
        ("student.model", spec.student.model),
    ):
        problem = model_name_problem(name)
        if problem:
            fail(field, problem)
    _check_paths(spec, fail)
    if "://" in spec.storage and "?" in spec.storage:  # the search's name goes after the path
        fail(
            "storage",
            "no query string (?endpoint_override=...): give an S3-compatible server's endpoint "
            "as AWS_ENDPOINT_URL=http://host:port in the environment (README, Storage on S3)",
        )
    if spec.train.milestones and any(m > spec.train.epochs for m in spec.train.milestones):
        fail("train.milestones", f"every milestone must be <= train.epochs ({spec.train.epochs})")
    if spec.search.metric not in METRICS:
        fail(
            "search.metric",
            f"expected one of {', '.join(sorted(METRICS))}, got {spec.search.metric!r}",
        )
    _check_schedule(spec, fail)
    for knob, space in spec.space.items():
        field = f"space.{knob}"
        if knob not in SEARCHABLE:
            fail(field, f"not a searchable knob; expected one of {', '.join(SEARCHABLE)}")
        if knob == "scales":
            if space.choices is None:
                fail(
                    field, "expected choices: a list of scale sets such as [[1], [1, 2], [1, 2, 4]]"
                )
            for choice in space.choices:
                try:
                    if not isinstance(choice, list):
                        raise ValueError("expected a list such as [1, 2]")
                    validate_scales(choice)
                except (ValueError, TypeError) as error:
                    fail(field, f"choice {choice!r}: {error}")
        elif knob == "base":
            bad = [c for c in (space.choices or [None]) if c not in BASE_LOSSES]
            if bad:
                fail(field, f"expected choices among {list(BASE_LOSSES)}, got {bad[0]!r}")
        else:
            section = getattr(spec, SEARCHABLE[knob])
            values = space.choices if space.choices is not None else [space.low, space.high]
            for value in values:
                try:
                    type(section).model_validate({**section.model_dump(), knob: value})
                except ValidationError as error:
                    fail(field, f"{value!r} is not allowed ({error.errors()[0]['msg']})")
    if spec.resources.gpus_per_worker > 1 and spec.resources.gpus_per_worker != int(
        spec.resources.gpus_per_worker
    ):
        fail("resources.gpus_per_worker", "above 1 it must be a whole number")
    _check_files(spec, source)  # last: the only check that opens files


def _check_files(spec: Spec, source: str) -> None:
    """Open what the search reads first, so that a hostile, torn or mismatched file is a spec
    error before anything starts: CIFAR's batches (the restricted unpickler; the test batch only
    with a final stage) and a checkpoint teacher (weights-only, memory-mapped; its classes, keys
    and shapes against the dataset and teacher.model). Imported here, and only when needed."""
    data = spec.data
    if data.dataset in ("cifar100", "cifar10") and not is_object_store(data.root):
        from sdd_search.data import DatasetError
        from sdd_search.data.sources import check_cifar_files

        root = str(Path(data.root).expanduser()) if data.root else None
        roles = ("train", "test") if spec.final else ("train",)
        try:
            check_cifar_files(data.dataset, root, roles, data.download)
        except DatasetError as error:
            raise SpecError(f"{source}: data.root: {error}") from None
    if spec.teacher.source == "checkpoint" and not is_download(spec.teacher.checkpoint):
        from sdd_search.data import DatasetError
        from sdd_search.teacher import TeacherError, check_teacher_checkpoint

        try:
            check_teacher_checkpoint(spec.trial, count_classes=not is_object_store(data.root))
        except DatasetError as error:
            raise SpecError(f"{source}: data.root: {error}") from None
        except TeacherError as error:  # its message starts with the field
            raise SpecError(f"{source}: {error}") from None


METRICS = {
    "val_top1",
    "val_top5",
    "val_loss",
    "best_val_top1",
    "train_loss",
    "train_top1",
}
