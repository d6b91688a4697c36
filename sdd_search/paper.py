"""The SDD paper's published top-1 numbers, for a like-for-like line in the final report.

Single numbers as published (Wei, Luo and Luo, CVPR 2024; shared/DESIGN.md has the corrected
facts): one run each, so they carry no spread. A number is shown beside ours only where the
teacher, the student, the base loss and the recipe (the preset's epochs and schedule) match.
SD-NKD numbers are left out: the authors' NKD never removes the target class (DESIGN.md), ours
follows the NKD paper, so the two are not the same loss.
"""

from __future__ import annotations

from typing import Any

# (dataset, teacher, student) -> {"kd": plain KD, "sdd-kd": SD-KD, "dkd": DKD, "sdd-dkd": SD-DKD}
PUBLISHED_TOP1: dict[tuple[str, str, str], dict[str, float]] = {
    ("cifar100", "resnet32x4", "shufflenetv1"): {
        "kd": 74.07,
        "sdd-kd": 76.30,
        "dkd": 76.45,
        "sdd-dkd": 77.30,
    },
    ("cifar100", "resnet32x4", "shufflenetv2"): {
        "kd": 74.45,
        "sdd-kd": 76.67,
        "dkd": 77.07,
        "sdd-dkd": 78.05,
    },
    ("imagefolder", "torchvision/resnet34", "torchvision/resnet18"): {
        "kd": 70.66,
        "sdd-kd": 71.44,
        "dkd": 71.70,
        "sdd-dkd": 72.02,
    },
    # The paper says "MobileNetV2"; the student is MobileNetV1 (the SDD author, issue #1).
    ("imagefolder", "torchvision/resnet50", "mobilenetv1"): {
        "kd": 70.50,
        "sdd-kd": 72.24,
        "dkd": 72.05,
        "sdd-dkd": 73.08,
    },
}

# The paper's scale set: [1, 2] when teacher and student share a family, [1, 2, 4] otherwise.
_SAME_FAMILY = {("torchvision/resnet34", "torchvision/resnet18")}


def paper_scales(teacher: str, student: str) -> list[int]:
    return [1, 2] if (teacher, student) in _SAME_FAMILY else [1, 2, 4]


def _recipe_matches(spec: Any) -> bool:
    """The spec's training recipe is the paper's for its preset (epochs, schedule, batch)."""
    from sdd_search.config import PRESETS

    if spec.preset not in PRESETS:
        return False
    recipe = PRESETS[spec.preset]["train"]
    train = spec.train
    global_batch = train.batch_size * spec.resources.workers
    return (
        train.epochs == recipe["epochs"]
        and train.schedule == recipe["schedule"]
        and train.resolved_milestones() == recipe["milestones"]
        and global_batch == recipe["batch_size"]
    )


def published_numbers(spec: Any) -> dict[str, float]:
    """Final-report entry name -> the paper's number, for the entries that match like for like.

    ``kd`` (plain KD) matches when the pair and the recipe do; ``paper`` (the spec's own SDD
    point) also needs the paper's scale set and a kd or dkd base.
    """
    table = PUBLISHED_TOP1.get((spec.data.dataset, spec.teacher.model, spec.student.model))
    if table is None or not _recipe_matches(spec):
        return {}
    numbers = {"kd": table["kd"]}
    distill = spec.distill
    key = f"sdd-{distill.base}"
    if key in table and list(distill.scales) == paper_scales(
        spec.teacher.model, spec.student.model
    ):
        numbers["paper"] = table[key]
    return numbers
