"""Scale Decoupled Distillation: multi-scale cell logits and the SDD losses.

Pure torch: no Ray, no I/O, no device moves. Usable on its own in any training loop::

    from sdd_search.sdd import cell_logits, sdd_loss

    student_cells = cell_logits(student_features, student_head, (1, 2, 4))  # B x 21 x K
    with torch.no_grad():
        teacher_cells = cell_logits(teacher_features, teacher_head, (1, 2, 4))
    loss = sdd_loss(student_cells, teacher_cells, labels, base="kd", temperature=4.0)

Conventions (shared/DESIGN.md, "The method, exactly"):

- A scale set M such as (1, 2, 4) gives N = sum(m * m) cells per image, ordered by scale
  ascending and row-major inside a scale; cell 0 is the 1 x 1 cell, i.e. the ordinary global
  logits of a model with global average pooling.
- The per-cell loss l(b, n) is the base loss (KD, DKD or NKD) computed per cell exactly as the
  base method computes it per sample.
- A cell whose teacher correctness differs from the teacher's global correctness is
  *complementary* and weighted ``complementary_weight``; the others weigh 1.
  L_sdd = sum_{b,n} weight(b, n) * l(b, n) / (B * N).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sdd_search.config import BASE_LOSSES, validate_scales  # noqa: F401  (re-exported)

BaseLoss = Literal["kd", "dkd", "nkd"]
# Added to a target logit to remove it from a softmax (DKD's own constant; exp(-1000) == 0 in fp32).
_MASK_OFFSET = 1000.0


def num_cells(scales: Sequence[int]) -> int:
    """Number of cells N = sum(m * m) for a scale set such as (1, 2, 4)."""
    return sum(int(m) * int(m) for m in scales)


def pool_cells(features: Tensor, scales: Sequence[int]) -> Tensor:
    """Average-pool a feature map B x C x H x W into B x N x C cell vectors.

    Each scale m pools the map to an m x m grid (adaptive average pooling over each cell's
    region, the same regions as ``torch.nn.AdaptiveAvgPool2d``); cells are ordered by scale,
    then row-major.
    """
    pooled = [
        F.adaptive_avg_pool2d(features, m).flatten(2)  # B x C x m*m, row-major
        for m in scales
    ]
    return torch.cat(pooled, dim=2).transpose(1, 2)  # B x N x C


def cell_logits(
    features: Tensor, head: Callable[[Tensor], Tensor], scales: Sequence[int] = (1, 2, 4)
) -> Tensor:
    """Scale-decoupled logits: B x N x K, one row of logits per cell.

    ``features`` is the last feature map (after the final activation, before global pooling),
    ``head`` maps pooled vectors ``(..., C) -> (..., K)`` (a ``torch.nn.Linear``, or a small
    module such as LayerNorm + Linear). Pooling first and projecting after equals projecting a
    class activation map and pooling after when the head is linear; pooling first is cheaper.
    """
    return head(pool_cells(features, scales))


def _per_cell_kd(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)) per row: (..., K) -> (...)."""
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)
    return kl * (temperature**2)


def _per_cell_dkd(
    student: Tensor,
    teacher: Tensor,
    target_mask: Tensor,
    temperature: float,
    alpha: float,
    beta: float,
) -> Tensor:
    """Decoupled KD per row, alpha * TCKD + beta * NCKD, as DKD computes it per sample."""
    p_student = F.softmax(student / temperature, dim=-1)
    p_teacher = F.softmax(teacher / temperature, dim=-1)
    # Binary (target, non-target) distributions.
    student_target = (p_student * target_mask).sum(dim=-1)
    teacher_target = (p_teacher * target_mask).sum(dim=-1)
    student_binary = torch.stack([student_target, 1.0 - student_target], dim=-1)
    teacher_binary = torch.stack([teacher_target, 1.0 - teacher_target], dim=-1)
    # DKD takes log of the (target, other) probabilities as they are; clamp keeps fp32 finite.
    tckd = (
        teacher_binary
        * (torch.log(teacher_binary.clamp_min(1e-30)) - torch.log(student_binary.clamp_min(1e-30)))
    ).sum(dim=-1)
    # Non-target distributions: the target logit is pushed out of the softmax.
    offset = _MASK_OFFSET * target_mask
    log_student_non = F.log_softmax(student / temperature - offset, dim=-1)
    log_teacher_non = F.log_softmax(teacher / temperature - offset, dim=-1)
    nckd = (log_teacher_non.exp() * (log_teacher_non - log_student_non)).sum(dim=-1)
    return (alpha * tckd + beta * nckd) * (temperature**2)


def _per_cell_nkd(
    student: Tensor, teacher: Tensor, target_mask: Tensor, temperature: float, gamma: float
) -> Tensor:
    """Normalized KD per row: -t_y log s_y - gamma T^2 sum_{k != y} t~_k log s~_k."""
    log_p_student = F.log_softmax(student, dim=-1)
    p_teacher = F.softmax(teacher, dim=-1)
    target_term = -(p_teacher * target_mask).sum(-1) * (log_p_student * target_mask).sum(-1)
    offset = _MASK_OFFSET * target_mask
    log_student_non = F.log_softmax(student / temperature - offset, dim=-1)
    p_teacher_non = F.softmax(teacher / temperature - offset, dim=-1)
    # The target column has p_teacher_non == 0 exactly, so it adds nothing.
    non_target_term = -(p_teacher_non * log_student_non).sum(dim=-1)
    return target_term + gamma * (temperature**2) * non_target_term


def per_cell_loss(
    student_cells: Tensor,
    teacher_cells: Tensor,
    target: Tensor,
    *,
    base: BaseLoss = "kd",
    temperature: float = 4.0,
    dkd_alpha: float = 1.0,
    dkd_beta: float = 8.0,
    nkd_gamma: float = 1.5,
) -> Tensor:
    """Unweighted base loss l(b, n) for every cell: B x N, float32."""
    student = student_cells.float()
    teacher = teacher_cells.detach().float()
    if base == "kd":
        return _per_cell_kd(student, teacher, temperature)
    num_classes = student.shape[-1]
    target_mask = F.one_hot(target, num_classes).to(student.dtype).unsqueeze(1)  # B x 1 x K
    if base == "dkd":
        return _per_cell_dkd(student, teacher, target_mask, temperature, dkd_alpha, dkd_beta)
    if base == "nkd":
        return _per_cell_nkd(student, teacher, target_mask, temperature, nkd_gamma)
    raise ValueError(f"base loss {base!r} is not one of {', '.join(BASE_LOSSES)}")


def complementary_mask(teacher_cells: Tensor, target: Tensor) -> Tensor:
    """B x N bool: True where the teacher's cell correctness differs from its global correctness."""
    correct = teacher_cells.argmax(dim=-1) == target.unsqueeze(1)  # B x N
    return correct != correct[:, :1]


def sdd_loss(
    student_cells: Tensor,
    teacher_cells: Tensor,
    target: Tensor,
    *,
    base: BaseLoss = "kd",
    temperature: float = 4.0,
    complementary_weight: float = 2.0,
    dkd_alpha: float = 1.0,
    dkd_beta: float = 8.0,
    nkd_gamma: float = 1.5,
) -> Tensor:
    """The SDD distillation loss L_sdd (a float32 scalar).

    Args:
        student_cells: B x N x K student cell logits (see :func:`cell_logits`).
        teacher_cells: B x N x K teacher cell logits; no gradient flows into them.
        target: B integer class labels.
        base: per-cell base loss, ``"kd"``, ``"dkd"`` or ``"nkd"``.
        temperature: softmax temperature T of the base loss.
        complementary_weight: weight of cells whose teacher correctness differs from the
            teacher's global correctness (consistent cells weigh 1).
        dkd_alpha, dkd_beta: DKD's target-class and non-target-class weights.
        nkd_gamma: NKD's non-target weight.

    With N = 1 (scale set [1]) this is exactly the plain base loss on global logits, averaged
    over the batch.
    """
    if student_cells.shape != teacher_cells.shape or student_cells.dim() != 3:
        raise ValueError(
            f"student and teacher cells must both be B x N x K, got {tuple(student_cells.shape)} "
            f"and {tuple(teacher_cells.shape)}"
        )
    losses = per_cell_loss(
        student_cells,
        teacher_cells,
        target,
        base=base,
        temperature=temperature,
        dkd_alpha=dkd_alpha,
        dkd_beta=dkd_beta,
        nkd_gamma=nkd_gamma,
    )
    weights = 1.0 + (complementary_weight - 1.0) * complementary_mask(teacher_cells, target).float()
    return (weights * losses).sum() / losses.numel()


def warmup_factor(epoch: float, warmup_epochs: float) -> float:
    """Linear ramp of the distillation weight from 0 to 1 over ``warmup_epochs`` (0 = off).

    ``epoch`` counts from 0 and may be fractional (progress inside an epoch).
    """
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, max(0.0, epoch / warmup_epochs))
