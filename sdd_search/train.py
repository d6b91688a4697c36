"""One distillation run: build, restore, train, evaluate, report.

No Ray in here. :func:`run_trial` is plain PyTorch; the search hands it a ``report`` callback
that forwards metrics and checkpoints to Ray Train. Under ``torch.distributed`` (Ray Train's
workers, or ``torchrun``) the student is wrapped in DDP, each rank trains on its own shard and
the evaluation counts are summed across ranks.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sdd_search.config import DistillConfig, TrainConfig, TrialConfig
from sdd_search.data import build_datasets_and_loaders
from sdd_search.models import create_model
from sdd_search.sdd import cell_logits, sdd_loss, warmup_factor

CHECKPOINT_FILE = "checkpoint.pt"

# report(metrics, write_checkpoint): write_checkpoint(directory) saves the full training state
# into that directory; it is None on ranks other than 0.
ReportFn = Callable[[dict[str, float], Callable[[Path], None] | None], None]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run cannot continue."""


# Fault injection for tests (tests/test_faults.py): SDD_SEARCH_FAIL_AT_EPOCH="EPOCH" makes
# run_trial raise RuntimeError as it starts that epoch (1-based); "EPOCH:FIELD=VALUE" only in runs
# whose TrialConfig field (dotted, e.g. train.lr) has str(value) == VALUE. Unset: no effect.
FAIL_AT_EPOCH_ENV = "SDD_SEARCH_FAIL_AT_EPOCH"


def _injected_failure(config: TrialConfig, epoch: int) -> None:
    rule = os.environ.get(FAIL_AT_EPOCH_ENV, "").strip()
    if not rule:
        return
    at, _, condition = rule.partition(":")
    if int(at) != epoch:
        return
    if condition:
        field_name, _, expected = condition.partition("=")
        value = config.model_dump(mode="json")
        for part in field_name.strip().split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if str(value) != expected.strip():
            return
    raise RuntimeError(f"{FAIL_AT_EPOCH_ENV}={rule}: injected failure at epoch {epoch}")


@dataclass
class TrialResult:
    """What a finished run returns."""

    model: nn.Module  # the student (unwrapped, on the CPU, eval mode)
    num_classes: int
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


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
    and float32 ``[loss * B, ce * B, kd * B, correct, B]`` for the epoch's running totals.
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
        sums = torch.stack(
            [
                loss.detach() * batch,
                ce_loss.detach() * batch,
                kd_loss.detach() * batch,
                correct,
                seen,
            ]
        )
        return loss, sums


def resolve_device(train: TrainConfig, assigned: torch.device | None = None) -> torch.device:
    """The device this process trains on.

    ``assigned`` is the GPU a scheduler gave this process (Ray Train's ``get_device()``: the
    visible index of this worker's own GPU, which need not be its local rank when several
    workers share a node); without one, ``LOCAL_RANK`` (torchrun) picks among the visible GPUs.
    """
    if train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is cuda but torch sees no CUDA device")
        if assigned is not None and assigned.type == "cuda":
            index = torch.cuda.current_device() if assigned.index is None else assigned.index
            return torch.device("cuda", index)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def compiled_or_eager(step: nn.Module, compile_fn: Callable[[nn.Module], Callable]) -> Callable:
    """``compile_fn(step)``, falling back to the eager ``step`` if the compiler cannot build it.

    A node without a working compiler toolchain (no C compiler for inductor, no Triton) makes
    the first compiled call raise; the trial then trains eagerly, slower but correct, with a
    warning, instead of failing. Errors of the step itself are raised as ever.
    """
    import warnings

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


def _flag(value: str, device: torch.device) -> bool:
    """auto/on/off (or auto/bf16/off) -> bool; auto means on for CUDA only."""
    return value in ("on", "bf16") or (value == "auto" and device.type == "cuda")


def _lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    milestones = train.resolved_milestones()

    def factor(epoch: int) -> float:  # epoch = number of epochs completed
        if epoch < train.lr_warmup_epochs:
            return (epoch + 1) / train.lr_warmup_epochs
        if train.schedule == "multistep":
            return train.lr_decay ** sum(epoch >= m for m in milestones)
        if train.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * epoch / train.epochs))
        return 1.0

    return factor


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`run_trial` (a directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    # The RNG states hold numpy arrays and tuples; still no arbitrary classes are unpickled.
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


_SAFE_GLOBALS = [
    np.core.multiarray._reconstruct if hasattr(np, "core") else np._core.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


def run_trial(
    config: TrialConfig,
    *,
    teacher: nn.Module | None = None,
    report: ReportFn | None = None,
    resume_from: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    device: torch.device | None = None,
) -> TrialResult:
    """Train ``config.student`` on ``config.data`` with ce + warmup * SDD, evaluating each epoch.

    Args:
        config: the run. ``distill.method == "none"`` trains on labels only (no teacher).
        teacher: the teacher network (eval mode, frozen). None with method "sdd" loads it via
            :mod:`sdd_search.teacher` (training and caching it first if its source is "train").
        report: called after every epoch with the metrics and a checkpoint writer (rank 0).
        resume_from: a checkpoint file or directory; training continues from its epoch exactly
            (model, optimiser, schedule, RNG state and data order).
        checkpoint_dir: without ``report``, save ``checkpoint.pt`` here after every epoch.
        log: one line per epoch (rank 0), e.g. ``print``.
        device: the GPU a scheduler assigned this process (see :func:`resolve_device`); used
            when ``train.device`` resolves to CUDA.

    Returns the trained student and the per-epoch metrics.
    """
    train = config.train
    if train.num_threads:
        torch.set_num_threads(train.num_threads)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    device = resolve_device(train, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # implicit CUDA work (pinned memory, events) goes there too
    use_amp = _flag(train.amp, device)
    channels_last = _flag(train.channels_last, device)
    use_compile = _flag(train.compile, device)
    _seed_everything(train.seed)

    info, train_loader, val_loader = build_datasets_and_loaders(
        config.data.dataset,
        root=config.data.root,
        batch_size=train.batch_size,
        eval_batch_size=train.eval_batch_size,
        device=device,
        seed=train.seed,
        rank=rank,
        world_size=world_size,
        download=config.data.download,
        image_size=config.data.image_size,
        num_workers=config.data.num_workers,
        channels_last=channels_last,
        synthetic_num_classes=config.data.synthetic_num_classes,
        synthetic_size=config.data.synthetic_size,
    )
    distill = config.distill
    distilling = distill.method == "sdd"
    if distilling and teacher is None:
        from sdd_search.teacher import ensure_teacher, load_teacher

        teacher = load_teacher(config.teacher, info.num_classes, ensure_teacher(config))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if distilling:
        teacher = teacher.to(device, memory_format=memory_format).eval()
        teacher_cells_net = StudentWithCells(teacher, tuple(distill.scales)).eval()

    pretrained = {"pretrained": True} if config.student.pretrained else {}
    student = create_model(config.student.model, num_classes=info.num_classes, **pretrained)
    student = student.to(device, memory_format=memory_format)
    student_net: nn.Module = StudentWithCells(student, tuple(distill.scales))
    optimizer = torch.optim.SGD(
        student.parameters(),
        lr=train.lr,
        momentum=train.momentum,
        weight_decay=train.weight_decay,
        nesterov=train.nesterov and train.momentum > 0,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(train))

    history: list[dict[str, float]] = []
    start_epoch = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_epoch = int(state["epoch"])
        history = list(state["history"])

    if distributed:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        student_net = nn.parallel.DistributedDataParallel(student_net, **ddp_kwargs)
    # The fused step calls the DDP-wrapped student, so DDP still sees (and all-reduces) it.
    step = DistillationStep(
        student_net, teacher_cells_net if distilling else None, distill, amp=use_amp
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # training shapes are fixed: autotune convs once
    # One graph for teacher + student + losses; dynamic=False is safe because the train loader
    # drops the last partial batch (static shapes; evaluation, with its partial batch, stays eager).
    step_fn = (
        compiled_or_eager(step, lambda m: torch.compile(m, dynamic=False, mode=train.compile_mode))
        if use_compile
        else step
    )
    cuda_graphs = use_compile and device.type == "cuda" and train.compile_mode == "reduce-overhead"
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if use_amp else nullcontext()
    )  # for evaluation; bf16 keeps fp32's range: no loss scaler needed

    def write_checkpoint(directory: Path, epoch: int) -> None:
        payload = {
            "format": "sdd-search/trial-v1",
            "student": student.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "epoch": epoch,
            "history": history,
            "model_name": config.student.model,
            "num_classes": info.num_classes,
            "config": config.model_dump(mode="json"),
        }
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (CHECKPOINT_FILE + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, directory / CHECKPOINT_FILE)

    for epoch in range(start_epoch, train.epochs):
        _injected_failure(config, epoch + 1)
        epoch_start = time.perf_counter()
        student_net.train()
        train_loader.set_epoch(epoch)
        # A 0-dim tensor, not a float: a new warm-up value is new data, not a recompile.
        kd_scale = torch.full(
            (), distill.kd_weight * warmup_factor(epoch + 1, distill.warmup_epochs), device=device
        )
        # Running sums stay on the device: no host sync inside the step loop.
        sums = torch.zeros(5, device=device)  # loss, ce, kd, correct, seen
        for images, labels in train_loader:
            if cuda_graphs:
                # Each step is a new iteration: its graph outputs may reuse the last one's memory.
                torch.compiler.cudagraph_mark_step_begin()
            loss, batch_sums = step_fn(images, labels, kd_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += batch_sums
        scheduler.step()
        if distributed:
            dist.all_reduce(sums)
        loss_sum, ce_sum, kd_sum, correct, seen = sums.tolist()
        train_seconds = time.perf_counter() - epoch_start
        if not math.isfinite(loss_sum):
            raise NonFiniteLossError(
                f"training loss became {loss_sum} at epoch {epoch + 1} "
                f"(lr {optimizer.param_groups[0]['lr']:.3g}); lower train.lr or distill weights"
            )
        if distributed:
            # DDP keeps parameters equal, but each rank's BatchNorm statistics saw only its own
            # last batches: evaluate (and checkpoint, from rank 0) one and the same model.
            for buffer in student.buffers():
                dist.broadcast(buffer, src=0)
        evaluation = evaluate(student, val_loader, device, autocast, distributed)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_ce": ce_sum / seen,
            "train_kd": kd_sum / seen,
            "train_top1": 100.0 * correct / seen,
            **evaluation,
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - epoch_start,
            "train_images_per_second": seen / train_seconds,
            "world_size": world_size,
        }
        previous_best = max((h["val_top1"] for h in history), default=-1.0)
        metrics["best_val_top1"] = max(previous_best, metrics["val_top1"])
        history.append(metrics)
        if log is not None and rank == 0:
            log(
                f"epoch {epoch + 1}/{train.epochs} loss {metrics['train_loss']:.4f} "
                f"val top-1 {metrics['val_top1']:.2f}% ({metrics['epoch_seconds']:.1f}s)"
            )
        completed = epoch + 1
        if report is not None:
            writer = (
                (lambda directory, e=completed: write_checkpoint(Path(directory), e))
                if rank == 0
                else None
            )
            report(dict(metrics), writer)
        elif checkpoint_dir is not None and rank == 0:
            write_checkpoint(Path(checkpoint_dir), completed)

    student.eval()
    best_row = max(history, key=lambda h: h["val_top1"]) if history else {}
    return TrialResult(
        model=student.cpu(),
        num_classes=info.num_classes,
        history=history,
        best={
            "val_top1": best_row.get("val_top1", float("nan")),
            "epoch": best_row.get("epoch", 0),
        },
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    autocast=None,
    distributed: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy over the whole validation set."""
    model.eval()
    sums = torch.zeros(4, device=device)  # loss, top1, top5, seen
    for images, labels in loader:
        with autocast or nullcontext():
            logits = model(images)[0]
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels.unsqueeze(1)
        sums += torch.stack(
            [
                F.cross_entropy(logits, labels, reduction="sum"),
                hits[:, 0].sum().float(),
                hits.any(dim=1).sum().float(),
                # A fill on the device, not a host->device copy (which would sync every batch).
                torch.full((), float(labels.shape[0]), device=device),
            ]
        )
    if distributed:
        dist.all_reduce(sums)
    loss, top1, top5, seen = sums.tolist()
    seen = max(seen, 1.0)
    return {
        "val_loss": loss / seen,
        "val_top1": 100.0 * top1 / seen,
        "val_top5": 100.0 * top5 / seen,
    }


def train_locally(
    config: TrialConfig, *, checkpoint_dir: str | os.PathLike | None = None, log=print
) -> TrialResult:
    """Convenience for scripts: run one trial in this process, resuming from checkpoint_dir if it
    holds a checkpoint."""
    checkpoint_dir = (
        Path(checkpoint_dir) if checkpoint_dir else Path(tempfile.mkdtemp(prefix="sdd-"))
    )
    resume = checkpoint_dir / CHECKPOINT_FILE
    return run_trial(
        config,
        checkpoint_dir=checkpoint_dir,
        resume_from=resume if resume.is_file() else None,
        log=log,
    )
