"""One distillation run: build, restore, train, evaluate, report.

No Ray in here. :func:`run_trial` is plain PyTorch; the search hands it a ``report`` callback
that forwards metrics and checkpoints to Ray Train. Under ``torch.distributed`` (Ray Train's
workers, or ``torchrun``) the student is wrapped in DDP, each rank trains on its own shard and
the evaluation counts are summed across ranks.

The teacher is an argument: :func:`sdd_search.teacher.teacher_for` loads (or trains once and
caches) the one a configuration names. The fused step is :mod:`sdd_search.step`, checkpoint
files :mod:`sdd_search.checkpoint`, the loop's extension points :mod:`sdd_search.callbacks`.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sdd_search.callbacks import EPOCH_CALLBACKS, TrialCallback
from sdd_search.checkpoint import (
    CHECKPOINT_FILE,
    TRIAL_CHECKPOINT_FORMAT,
    atomic_save,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from sdd_search.config import DistillConfig, TrainConfig, TrialConfig
from sdd_search.data import build_datasets_and_loaders
from sdd_search.models import create_model
from sdd_search.remote import local_root
from sdd_search.sdd import warmup_factor
from sdd_search.step import (
    SUM_COLUMNS,
    DistillationStep,
    StudentWithCells,
    compiled_or_eager,
    named_sums,
)

__all__ = [  # run_trial and what its callers use, wherever it lives
    "CHECKPOINT_FILE",
    "EPOCH_CALLBACKS",
    "DistillationStep",
    "NonFiniteLossError",
    "StudentWithCells",
    "TrialCallback",
    "TrialResult",
    "compiled_or_eager",
    "evaluate",
    "load_checkpoint",
    "resolve_device",
    "run_trial",
]

# report(metrics, write_checkpoint): write_checkpoint(directory) saves the full training state
# into that directory; it is None on ranks other than 0.
ReportFn = Callable[[dict[str, float], Callable[[Path], None] | None], None]

# The columns of evaluate's sums: summed cross-entropy, top-1 hits, top-5 hits, images.
EVAL_SUM_COLUMNS = ("loss", "top1", "top5", "seen")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run cannot continue."""


@dataclass
class TrialResult:
    """What a finished run returns."""

    model: nn.Module  # the student (unwrapped, on the CPU, eval mode)
    num_classes: int
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics row per epoch
    best: dict[str, float] = field(default_factory=dict)  # val_top1 (percent) and its epoch


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Set-up, in the order run_trial calls it


@dataclass(frozen=True)
class Runtime:
    """Where and how this process trains."""

    device: torch.device
    distributed: bool  # under torch.distributed (DDP, sums all-reduced over ranks)
    rank: int  # 0 when not distributed
    world_size: int  # processes training this trial together
    amp: bool  # bf16 autocast
    channels_last: bool  # model and batches in channels_last memory format
    compile: bool  # torch.compile the fused step

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> torch.autocast | None:
        """bf16 autocast where amp is on (bf16 keeps fp32's range: no loss scaler), else None."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else None


def _runtime(train: TrainConfig, assigned: torch.device | None) -> Runtime:
    """Set this process up (threads, its GPU, seeds); where and how it trains.

    ``assigned`` is the device a scheduler gave this process (see :func:`resolve_device`).
    """
    if train.num_threads:
        torch.set_num_threads(train.num_threads)
    distributed = dist.is_available() and dist.is_initialized()
    device = resolve_device(train, assigned)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # implicit CUDA work (pinned memory, events) goes there too
    _seed_everything(train.seed)
    return Runtime(
        device=device,
        distributed=distributed,
        rank=dist.get_rank() if distributed else 0,
        world_size=dist.get_world_size() if distributed else 1,
        amp=_flag(train.amp, device),
        channels_last=_flag(train.channels_last, device),
        compile=_flag(train.compile, device),
    )


def _loaders(config: TrialConfig, runtime: Runtime):
    """(dataset info, this rank's shard of the training set, the validation loader); a remote
    data.root is read from this node's copy (made once per node: sdd_search.remote)."""
    data, train = config.data, config.train
    return build_datasets_and_loaders(
        data.dataset,
        root=local_root(data),
        batch_size=train.batch_size,
        eval_batch_size=train.eval_batch_size,
        device=runtime.device,
        seed=train.seed,
        rank=runtime.rank,
        world_size=runtime.world_size,
        download=data.download,
        image_size=data.image_size,
        num_workers=data.num_workers,
        channels_last=runtime.channels_last,
        synthetic_num_classes=data.synthetic_num_classes,
        synthetic_size=data.synthetic_size,
        stage=data.stage,
        selection_fraction=data.selection_fraction,
    )


def _teacher_on_device(
    config: TrialConfig, teacher: nn.Module | None, runtime: Runtime
) -> nn.Module | None:
    """The frozen teacher on this process's device; None when training on labels only."""
    if config.distill.method != "sdd":
        return None
    if teacher is None:
        raise ValueError(
            'distill.method "sdd" needs a teacher: '
            "run_trial(config, teacher=sdd_search.teacher.teacher_for(config))"
        )
    return teacher.to(runtime.device, memory_format=runtime.memory_format).eval()


def _student_and_optimiser(config: TrialConfig, num_classes: int, runtime: Runtime):
    """(student on the device, its SGD optimiser, the lr schedule stepped once per epoch)."""
    train = config.train
    pretrained = {"pretrained": True} if config.student.pretrained else {}
    student = create_model(config.student.model, num_classes=num_classes, **pretrained)
    student = student.to(runtime.device, memory_format=runtime.memory_format)
    optimizer = torch.optim.SGD(
        student.parameters(),
        lr=train.lr,
        momentum=train.momentum,
        weight_decay=train.weight_decay,
        nesterov=train.nesterov and train.momentum > 0,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(train))
    return student, optimizer, scheduler


def _restore(
    resume_from: str | os.PathLike | None, student: nn.Module, optimizer, scheduler
) -> tuple[int, list[dict[str, float]]]:
    """Load a checkpoint's state into the run: (epochs it completed, their metrics rows)."""
    if resume_from is None:
        return 0, []
    state = load_checkpoint(resume_from)
    student.load_state_dict(state["student"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["epoch"]), list(state["history"])


def _compiled_step(
    config: TrialConfig, teacher: nn.Module | None, student: nn.Module, runtime: Runtime
) -> tuple[nn.Module, Callable, bool]:
    """(the student's train-mode net, DDP-wrapped when distributed; the fused step to call on
    each batch, compiled where asked; whether that step runs as CUDA graphs)."""
    distill, train = config.distill, config.train
    scales = tuple(distill.scales)
    teacher_net = StudentWithCells(teacher, scales).eval() if teacher is not None else None
    student_net: nn.Module = StudentWithCells(student, scales)
    if runtime.distributed:  # after the restore: DDP broadcasts rank 0's weights as it wraps
        ddp_kwargs = {"device_ids": [runtime.device.index]} if runtime.device.type == "cuda" else {}
        student_net = nn.parallel.DistributedDataParallel(student_net, **ddp_kwargs)
    # The fused step calls the DDP-wrapped student, so DDP still sees (and all-reduces) it.
    step = DistillationStep(student_net, teacher_net, distill, amp=runtime.amp)
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # training shapes are fixed: autotune convs once
    if not runtime.compile:
        return student_net, step, False
    # One graph for teacher + student + losses; dynamic=False is safe because the train loader
    # drops the last partial batch (static shapes; evaluation, with its partial batch, stays eager).
    step_fn = compiled_or_eager(
        step, lambda m: torch.compile(m, dynamic=False, mode=train.compile_mode)
    )
    cuda_graphs = runtime.device.type == "cuda" and train.compile_mode == "reduce-overhead"
    return student_net, step_fn, cuda_graphs


# --------------------------------------------------------------------------------------------
# The loop


def run_trial(
    config: TrialConfig,
    *,
    teacher: nn.Module | None = None,
    report: ReportFn | None = None,
    resume_from: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    device: torch.device | None = None,
    callbacks: Sequence[TrialCallback] = (),
) -> TrialResult:
    """Train ``config.student`` on ``config.data`` with ce + warmup * SDD, evaluating each epoch;
    return the trained student and the per-epoch metrics.

    Args:
        config: the run. ``distill.method == "none"`` trains on labels only (no teacher).
        teacher: the frozen teacher network, required with method "sdd" (ignored with "none"):
            :func:`sdd_search.teacher.teacher_for` gives the one ``config.teacher`` names.
        report: called after every epoch with the metrics and a checkpoint writer (rank 0).
        resume_from: a checkpoint file or directory; training continues from its epoch exactly
            (model, optimiser, schedule, RNG state and data order).
        checkpoint_dir: without ``report``, save ``checkpoint.pt`` here after every epoch.
        log: one line per epoch (rank 0), e.g. ``print``.
        device: the GPU a scheduler assigned this process, used if ``train.device`` is CUDA.
        callbacks: hooks called at each epoch's start, before those in ``EPOCH_CALLBACKS``.
    """
    train, distill = config.train, config.distill
    runtime = _runtime(train, device)
    info, train_loader, val_loader = _loaders(config, runtime)
    teacher = _teacher_on_device(config, teacher, runtime)
    student, optimizer, scheduler = _student_and_optimiser(config, info.num_classes, runtime)
    start_epoch, history = _restore(resume_from, student, optimizer, scheduler)
    student_net, step_fn, cuda_graphs = _compiled_step(config, teacher, student, runtime)
    save_state = _checkpoint_saver(config, info.num_classes, history, student, optimizer, scheduler)
    autocast = runtime.autocast()  # for evaluation

    for epoch in range(start_epoch + 1, train.epochs + 1):  # 1-based, as reported
        for callback in (*callbacks, *EPOCH_CALLBACKS):
            callback.on_epoch_start(config, epoch)
        started = time.perf_counter()
        student_net.train()
        train_loader.set_epoch(epoch - 1)  # the loader's shuffle counts epochs from 0

        # set the epoch's kd scale
        kd_scale = _kd_scale(distill, epoch, runtime.device)

        # forward backward update; the running sums stay on the device (no host sync per step)
        sums = torch.zeros(len(SUM_COLUMNS), device=runtime.device)
        for images, labels in train_loader:
            if cuda_graphs:  # a new iteration: its graph outputs may reuse the last one's memory
                torch.compiler.cudagraph_mark_step_begin()
            loss, batch_sums = step_fn(images, labels, kd_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += batch_sums
        scheduler.step()
        lr = optimizer.param_groups[0]["lr"]  # the next epoch's, as reported
        totals = _summed_over_ranks(sums, runtime)  # the epoch's one host sync
        train_seconds = time.perf_counter() - started
        _check_finite(totals["loss"], epoch, lr)

        # evaluate (the selection split each epoch; the final stage: the test split, once)
        _share_batchnorm_statistics(student, runtime)
        evaluation = _evaluate_epoch(config, epoch, student, val_loader, runtime, autocast)

        # report and checkpoint
        metrics = _epoch_metrics(
            epoch, totals, evaluation, history, lr, started, train_seconds, runtime.world_size
        )
        history.append(metrics)
        if log is not None and runtime.rank == 0:
            log(_log_line(metrics, train.epochs))
        writer = partial(save_state, epoch=epoch) if runtime.rank == 0 else None
        if report is not None:
            report(dict(metrics), writer)
        elif checkpoint_dir is not None and writer is not None:
            writer(checkpoint_dir)

    return _result(student, info.num_classes, history)


def _kd_scale(distill: DistillConfig, epoch: int, device: torch.device) -> torch.Tensor:
    """kd_weight * warm-up for ``epoch`` (1-based) as a 0-dim tensor on the device: a new
    warm-up value is then new data for the compiled step, not a recompile."""
    return torch.full(
        (), distill.kd_weight * warmup_factor(epoch, distill.warmup_epochs), device=device
    )


def _summed_over_ranks(sums: torch.Tensor, runtime: Runtime) -> dict[str, float]:
    """An epoch's step sums, over every rank, by :data:`SUM_COLUMNS` name."""
    if runtime.distributed:
        dist.all_reduce(sums)
    return named_sums(sums, SUM_COLUMNS)


def _check_finite(loss_sum: float, epoch: int, lr: float) -> None:
    if not math.isfinite(loss_sum):
        raise NonFiniteLossError(
            f"training loss became {loss_sum} at epoch {epoch} "
            f"(lr {lr:.3g}); lower train.lr or distill weights"
        )


def _share_batchnorm_statistics(student: nn.Module, runtime: Runtime) -> None:
    """DDP keeps parameters equal, but each rank's BatchNorm statistics saw only its own last
    batches: evaluate (and checkpoint, from rank 0) one and the same model."""
    if runtime.distributed:
        for buffer in student.buffers():
            dist.broadcast(buffer, src=0)


def _epoch_metrics(
    epoch: int,
    totals: dict[str, float],
    evaluation: dict[str, float],
    history: list[dict[str, float]],
    lr: float,
    started: float,
    train_seconds: float,
    world_size: int,
) -> dict[str, float]:
    """One epoch's row: means per image, accuracies in percent, times in seconds.

    ``totals`` are the step sums by column, ``history`` the rows of the epochs before,
    ``started`` the epoch's :func:`time.perf_counter`, ``train_seconds`` its training time.
    """
    seen = totals["seen"]
    metrics = {
        "epoch": epoch,
        "train_loss": totals["loss"] / seen,
        "train_ce": totals["ce"] / seen,
        "train_kd": totals["kd"] / seen,
        "train_top1": 100.0 * totals["correct"] / seen,
        **evaluation,
        "lr": lr,
        "epoch_seconds": time.perf_counter() - started,  # training and evaluation
        "train_images_per_second": seen / train_seconds,  # all ranks together
        "world_size": world_size,
    }
    if "val_top1" in metrics:  # the final stage has no selection split to score
        previous_best = max((row["val_top1"] for row in history), default=-1.0)
        metrics["best_val_top1"] = max(previous_best, metrics["val_top1"])
    return metrics


def _evaluate_epoch(
    config: TrialConfig, epoch: int, student: nn.Module, loader, runtime: Runtime, autocast
) -> dict[str, float]:
    """The search stage scores the selection split after every epoch (``val_*``); the final
    stage scores the test split once, after its last epoch (``test_*``), and nothing before."""
    if config.data.stage == "final" and epoch < config.train.epochs:
        return {}
    split = "test" if config.data.stage == "final" else "val"
    return evaluate(student, loader, runtime.device, autocast, runtime.distributed, split=split)


def _log_line(metrics: dict[str, float], epochs: int) -> str:
    scores = "".join(
        f" {split} top-1 {metrics[f'{split}_top1']:.2f}%"
        for split in ("val", "test")
        if f"{split}_top1" in metrics
    )
    return (
        f"epoch {metrics['epoch']}/{epochs} loss {metrics['train_loss']:.4f}{scores} "
        f"({metrics['epoch_seconds']:.1f}s)"
    )


def _checkpoint_saver(
    config: TrialConfig,
    num_classes: int,
    history: list[dict[str, float]],
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Callable[..., None]:
    """save(directory, epoch=...): the whole training state after ``epoch`` epochs, read as it
    is called, as ``directory/checkpoint.pt`` (what :func:`load_checkpoint` reads)."""

    def save(directory: str | os.PathLike, *, epoch: int) -> None:
        payload = {
            "format": TRIAL_CHECKPOINT_FORMAT,
            "student": student.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "epoch": epoch,  # epochs completed
            "history": history,  # their metrics rows
            "model_name": config.student.model,
            "num_classes": num_classes,
            "config": config.model_dump(mode="json"),
        }
        atomic_save(payload, Path(directory) / CHECKPOINT_FILE)

    return save


def _result(student: nn.Module, num_classes: int, history: list[dict[str, float]]) -> TrialResult:
    student.eval()
    scored = [row for row in history if "val_top1" in row]
    best_row = max(scored, key=lambda row: row["val_top1"]) if scored else {}
    return TrialResult(
        model=student.cpu(),
        num_classes=num_classes,
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
    split: str = "val",
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy over the whole of ``loader``,
    as ``<split>_top1``, ``<split>_top5`` and ``<split>_loss``.

    ``model(images)`` gives the logits; ``autocast`` is a context to run it in (e.g. bf16);
    ``distributed`` sums the counts over the ranks, each of which saw its own shard.
    """
    model.eval()
    sums = torch.zeros(len(EVAL_SUM_COLUMNS), device=device)
    for images, labels in loader:
        with autocast or nullcontext():
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels.unsqueeze(1)
        batch = {
            "loss": F.cross_entropy(logits, labels, reduction="sum"),
            "top1": hits[:, 0].sum().float(),
            "top5": hits.any(dim=1).sum().float(),
            # A fill on the device, not a host->device copy (which would sync every batch).
            "seen": torch.full((), float(labels.shape[0]), device=device),
        }
        sums += torch.stack([batch[column] for column in EVAL_SUM_COLUMNS])
    if distributed:
        dist.all_reduce(sums)
    totals = named_sums(sums, EVAL_SUM_COLUMNS)
    seen = max(totals["seen"], 1.0)
    return {
        f"{split}_loss": totals["loss"] / seen,
        f"{split}_top1": 100.0 * totals["top1"] / seen,
        f"{split}_top5": 100.0 * totals["top5"] / seen,
    }
