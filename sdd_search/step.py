"""The training step: teacher + student + CE + SDD fused into one module, and its compilation.

:class:`DistillationStep` is what :func:`sdd_search.train.run_trial` runs on every batch (and
what ``benchmarks/`` time). It returns its running totals as one device tensor whose columns
are :data:`SUM_COLUMNS`, so the loop adds them up without a host sync per step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdd_search.config import DistillConfig
from sdd_search.sdd import cell_logits, sdd_loss

# The columns of a step's running sums, one float32 tensor on the device: loss, ce and kd are
# each batch's mean times its size (so an epoch's sum / seen is its mean), correct counts the
# right global predictions, seen the images.
SUM_COLUMNS = ("loss", "ce", "kd", "correct", "seen")


def named_sums(sums: Tensor, columns: tuple[str, ...] = SUM_COLUMNS) -> dict[str, float]:
    """A sums tensor (summed over batches and, where distributed, all-reduced over ranks) as
    ``{column: value}``; reading it to the host is the one sync."""
    return dict(zip(columns, sums.tolist(), strict=True))


class StudentWithCells(nn.Module):
    """Student forward that returns (global logits, cell logits) so DDP/compile see one module."""

    def __init__(self, model: nn.Module, scales: tuple[int, ...]):
        super().__init__()
        self.model = model
        self.scales = scales

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.model.forward_features(images)
        cells = cell_logits(features, self.model.get_classifier(), self.scales)
        return cells[:, 0], cells  # cell 0 is the global average-pooled logits


class DistillationStep(nn.Module):
    """One training batch's whole forward, fused so ``torch.compile`` sees a single graph.

    Computes the teacher's cell logits (no grad), the student's (logits, cells), the CE, L_sdd
    and the objective ``ce_weight * CE + kd_scale * L_sdd`` (CE alone when ``teacher_net`` is
    None, i.e. method "none"). ``student_net`` is a :class:`StudentWithCells`, DDP-wrapped under
    ``torch.distributed``; ``teacher_net`` a :class:`StudentWithCells` around the frozen teacher.

    ``forward(images, labels, kd_scale)`` takes ``kd_scale`` (kd_weight * warm-up) as a 0-dim
    float32 tensor on the device and returns ``(loss, sums)``: the scalar loss to backpropagate
    and the batch's float32 sums, one per :data:`SUM_COLUMNS` column.
    """

    def __init__(
        self,
        student_net: nn.Module,
        teacher_net: nn.Module | None,
        distill: DistillConfig,
        *,
        amp: bool = False,
    ) -> None:
        super().__init__()
        self.student_net = student_net
        self.teacher_net = teacher_net
        self.amp = amp
        self.ce_weight = float(distill.ce_weight)
        # Plain Python constants (not the pydantic object): the compiled graph bakes them in.
        self.loss_options = {
            "base": distill.base,
            "temperature": float(distill.temperature),
            "complementary_weight": float(distill.complementary_weight),
            "dkd_alpha": float(distill.dkd_alpha),
            "dkd_beta": float(distill.dkd_beta),
            "nkd_gamma": float(distill.nkd_gamma),
        }

    def train(self, mode: bool = True) -> DistillationStep:
        super().train(mode)
        if self.teacher_net is not None:
            self.teacher_net.eval()  # frozen teacher: BN keeps using its running statistics
        return self

    def forward(self, images: Tensor, labels: Tensor, kd_scale: Tensor) -> tuple[Tensor, Tensor]:
        # bf16 keeps fp32's range: no loss scaler needed.
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits, cells = self.student_net(images)
            if self.teacher_net is not None:
                with torch.no_grad():
                    teacher_cells = self.teacher_net(images)[1]
        ce_loss = F.cross_entropy(logits.float(), labels)
        if self.teacher_net is None:
            kd_loss = torch.zeros_like(ce_loss)
            loss = ce_loss
        else:
            kd_loss = sdd_loss(cells, teacher_cells, labels, **self.loss_options)
            loss = self.ce_weight * ce_loss + kd_scale * kd_loss
        batch = labels.shape[0]
        correct = (logits.detach().argmax(1) == labels).sum().float()
        # The batch size is made on the device (a fill, not a host->device copy that would sync).
        seen = torch.full_like(correct, float(batch))
        sums = {
            "loss": loss.detach() * batch,
            "ce": ce_loss.detach() * batch,
            "kd": kd_loss.detach() * batch,
            "correct": correct,
            "seen": seen,
        }
        return loss, torch.stack([sums[column] for column in SUM_COLUMNS])


def compiled_or_eager(step: nn.Module, compile_fn: Callable[[nn.Module], Callable]) -> Callable:
    """``compile_fn(step)``, falling back to the eager ``step`` if the compiler cannot build it.

    A node without a working compiler toolchain (no C compiler for inductor, no Triton) makes
    the first compiled call raise; the trial then trains eagerly, slower but correct, with a
    warning, instead of failing. Errors of the step itself are raised as ever.
    """
    from torch._dynamo.exc import BackendCompilerFailed

    run = compile_fn(step)

    def call(*args):
        nonlocal run
        try:
            return run(*args)
        except BackendCompilerFailed as error:  # never raised by the eager step
            warnings.warn(
                f"torch.compile could not build the training step ({str(error).splitlines()[0]});"
                " training eagerly (set train.compile: off to skip the attempt)",
                RuntimeWarning,
                stacklevel=2,
            )
            run = step
            return step(*args)

    return call
