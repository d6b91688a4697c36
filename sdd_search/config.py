"""Typed configuration of one distillation run: the single source of truth for every default.

These pydantic models are shared by the Python API (:func:`sdd_search.train.run_trial`), the
search spec (:mod:`sdd_search.spec`, which adds the search, tracking and storage sections) and the
YAML files under ``search_spaces/``, which only say what differs from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BASE_LOSSES: tuple[str, ...] = ("kd", "dkd", "nkd")


def validate_scales(scales: Sequence[int]) -> tuple[int, ...]:
    """Return the scale set as a tuple, or raise ValueError saying what a valid one looks like."""
    scale_tuple = tuple(int(m) for m in scales)
    if not scale_tuple or scale_tuple[0] != 1:
        raise ValueError(
            f"scale set {list(scales)} must start with 1 (cell 0 is the global 1x1 cell)"
        )
    if any(b <= a for a, b in zip(scale_tuple, scale_tuple[1:], strict=False)):
        raise ValueError(f"scale set {list(scales)} must be strictly increasing, e.g. [1, 2, 4]")
    return scale_tuple


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(StrictModel):
    """Which dataset, where it lives, how it is loaded."""

    dataset: Literal["digits", "cifar100", "cifar10", "imagefolder", "synthetic"] = "digits"
    root: str | None = Field(
        None,
        description="dataset folder (cifar*/imagefolder), or an object-store URI (s3://, gs://) "
        "each node copies once into cache_dir (sdd_search.remote)",
    )
    cache_dir: str | None = Field(
        None,
        description="where each node keeps its copy of a remote root; None = "
        "$SDD_SEARCH_CACHE/data or ~/.cache/sdd-search/data, read on the node",
    )
    download: bool = Field(False, description="allow torchvision to download CIFAR into root")
    image_size: int | None = Field(None, ge=8, description="pixels; None = the dataset's default")
    num_workers: int = Field(4, ge=0, description="file-reading workers (imagefolder only)")
    synthetic_num_classes: int = Field(10, ge=2)
    synthetic_size: int = Field(256, ge=8)
    selection_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="share of the training data held out as the selection split; None = the "
        "dataset's default (0.1 cifar/imagefolder, 0.2 digits/synthetic)",
    )
    stage: Literal["search", "final"] = Field(
        "search",
        description="search: train on train minus selection, evaluate on selection; final: "
        "train on all training data (train + selection), evaluate on test. Set by sdd-search's "
        "final stage, not by specs",
    )

    @model_validator(mode="after")
    def _root_needed(self) -> DataConfig:
        if self.dataset == "imagefolder" and not self.root:
            raise ValueError(
                "data.root: required for dataset imagefolder (train/ and val/ below it)"
            )
        return self


class TrainConfig(StrictModel):
    """An optimisation recipe (SGD with momentum + a step or cosine schedule)."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1, description="per worker")
    eval_batch_size: int | None = Field(None, ge=1)
    lr: float = Field(0.05, gt=0, description="peak learning rate for batch_size per worker")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] | None = Field(
        None,
        description="epochs where lr is multiplied by lr_decay; None = 62.5/75/87.5 % of epochs",
    )
    lr_decay: float = Field(0.1, gt=0, le=1)
    lr_warmup_epochs: int = Field(0, ge=0, description="linear lr warm-up (large-batch recipes)")
    seed: int = 0
    amp: Literal["auto", "bf16", "off"] = Field("auto", description="auto = bf16 on CUDA only")
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile the fused step; auto = on for CUDA only (on a CPU, gcc "
        "takes about a minute per graph)",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default",
        description="torch.compile mode; reduce-overhead adds CUDA graphs (the train loader's "
        "shapes are static)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads per worker")

    def resolved_milestones(self) -> list[int]:
        if self.milestones is not None:
            return list(self.milestones)
        return [round(self.epochs * f) for f in (0.625, 0.75, 0.875)]


class DistillConfig(StrictModel):
    """The SDD objective: ce_weight * CE + kd_weight * warmup * L_sdd (DESIGN.md step 4)."""

    method: Literal["sdd", "none"] = Field(
        "sdd", description="none = train the student on labels only (the baseline)"
    )
    base: Literal["kd", "dkd", "nkd"] = "kd"
    scales: list[int] = Field(default_factory=lambda: [1, 2, 4])
    temperature: float = Field(4.0, gt=0)
    complementary_weight: float = Field(2.0, ge=0)
    dkd_alpha: float = Field(1.0, ge=0)
    dkd_beta: float = Field(8.0, ge=0)
    nkd_gamma: float = Field(1.5, ge=0)
    ce_weight: float = Field(1.0, ge=0)
    kd_weight: float = Field(1.0, ge=0)
    warmup_epochs: int = Field(0, ge=0, description="linear ramp of kd_weight; 0 = off")

    @field_validator("scales")
    @classmethod
    def _scales(cls, value: list[int]) -> list[int]:
        return list(validate_scales(value))

    @field_validator("base")
    @classmethod
    def _base(cls, value: str) -> str:
        if value not in BASE_LOSSES:
            raise ValueError(f"expected one of {BASE_LOSSES}")
        return value


class TeacherConfig(StrictModel):
    """Where the teacher comes from: a checkpoint, torchvision weights, or trained once here."""

    model: str = "resnet56"
    source: Literal["train", "checkpoint", "torchvision"] = "train"
    checkpoint: str | None = Field(
        None,
        description="for source=checkpoint: a path, or a URL (s3://, gs://, https://; "
        "ARCHIVE.tar#MEMBER for one file inside a tar) downloaded once into cache_dir",
    )
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="optional sha256 of the checkpoint file (of MEMBER for ARCHIVE.tar#MEMBER)",
    )
    weights: str = Field("DEFAULT", description="torchvision weights enum name")
    train: TrainConfig | None = Field(None, description="recipe for source=train; None = trial's")
    cache_dir: str | None = Field(
        None, description="None = $SDD_SEARCH_CACHE or ~/.cache/sdd-search"
    )

    @model_validator(mode="after")
    def _source_fields(self) -> TeacherConfig:
        if self.source == "checkpoint" and not self.checkpoint:
            raise ValueError("teacher.checkpoint: required when teacher.source is checkpoint")
        if self.source == "torchvision" and not self.model.startswith("torchvision/"):
            raise ValueError(
                "teacher.model: teacher.source torchvision needs a torchvision/<name> model, "
                f"got {self.model!r}"
            )
        return self


class StudentConfig(StrictModel):
    model: str = "resnet8"
    pretrained: bool = Field(False, description="torchvision/* students: start from weights")


class TrialConfig(StrictModel):
    """Everything one distillation run needs."""

    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


# The paper's recipes (DESIGN.md); a spec's train section may start from one.
PRESETS: dict[str, dict] = {
    "cifar100": {
        "train": {
            "epochs": 240,
            "batch_size": 64,
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "schedule": "multistep",
            "milestones": [150, 180, 210],
            "lr_decay": 0.1,
        },
        "distill_kd": {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
        "distill_dkd": {"dkd_alpha": 1.0, "dkd_beta": 8.0, "temperature": 4.0, "warmup_epochs": 20},
    },
    "imagenet": {
        "train": {
            "epochs": 100,
            "batch_size": 256,
            "lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "schedule": "multistep",
            "milestones": [30, 60, 90],
            "lr_decay": 0.1,
        },
        "distill_dkd": {"dkd_alpha": 1.0, "dkd_beta": 0.5, "temperature": 1.0},
    },
}
