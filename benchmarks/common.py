"""Shared pieces of the benchmark scripts: device setup, timing, and the fused training step.

Imports only torch, numpy and the Ray-free parts of sdd_search (sdd, models, data, step,
config), so the scripts run on a bare GPU machine with torch + pydantic.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

# The scripts run as `python benchmarks/x.py` from a checkout that may not be pip-installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from sdd_search.config import DistillConfig, TrainConfig  # noqa: E402
from sdd_search.models import create_model  # noqa: E402
from sdd_search.step import SUM_COLUMNS, DistillationStep, StudentWithCells  # noqa: E402

# One process compiles many step variants (modes x batch sizes x methods): keep them all compiled
# instead of falling back to eager after dynamo's default 8 recompiles.
torch._dynamo.config.recompile_limit = 64

TEACHER = "resnet32x4"
STUDENT = "resnet8x4"
NUM_CLASSES = 100
IMAGE_SIZE = 32


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU only)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu = this process's CPU seconds (CPU device only): steadier than wall time on a "
        "machine others are using; with --threads 1 it is the time one idle core would take",
    )
    parser.add_argument("--teacher", default=TEACHER)
    parser.add_argument("--student", default=STUDENT)
    parser.add_argument("--num-classes", type=int, default=NUM_CLASSES)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    return parser


def resolve(args: argparse.Namespace, **defaults_by_device: dict) -> torch.device:
    """Pick the device, fill unset options from ``defaults_by_device[device.type]``, set threads."""
    wants_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if wants_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    device = torch.device("cuda" if wants_cuda else "cpu")
    for name, value in defaults_by_device.get(device.type, {}).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each conv once
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu only makes sense with the CPU device")
    global _now
    _now = time.process_time if args.clock == "cpu" else time.perf_counter
    return device


def describe(args: argparse.Namespace, device: torch.device, script: str) -> None:
    """Print the inputs of this measurement (one line per setting)."""
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = (
            f"CPU, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads, "
            f"load average {os.getloadavg()[0]:.1f} at start (others' work skews the timings)"
        )
    print(f"# {script}: torch {torch.__version__} on {machine}")
    for key, value in sorted(vars(args).items()):
        print(f"#   {key} = {value}")


_now: Callable[[], float] = time.perf_counter  # the benchmark clock (see --clock)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    run: Callable[[], None], *, device: torch.device, repeats: int, warmup: int = 1
) -> float:
    """Median seconds (of the benchmark clock) of ``run()`` over ``repeats`` timed calls, after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    sync(device)
    times = []
    for _ in range(repeats):
        start = _now()
        run()
        sync(device)
        times.append(_now() - start)
    return statistics.median(times)


def interleaved_seconds(
    runs: dict[str, Callable[[], None]], *, device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each ``runs[name]()`` per repeat, the runs taking turns inside a repeat.

    Taking turns (A, B, A, B, ...) keeps a noisy, shared machine's drift out of the ratios: take
    the median of the per-repeat ratios (:func:`median_ratio`).
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = _now()
            run()
            sync(device)
            times[name].append(_now() - start)
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over repeats of numerator[i] / denominator[i] (paired, interleaved timings)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def flag(value: str, device: torch.device) -> bool:
    """auto/on/off -> bool, auto meaning on for CUDA only (as TrainConfig's flags)."""
    return value == "on" or (value == "auto" and device.type == "cuda")


def add_fast_path_flags(parser: argparse.ArgumentParser) -> None:
    """--amp, --channels-last, --compile: auto/on/off each (see :func:`fast_path_flags`)."""
    for name in ("--amp", "--channels-last", "--compile"):
        parser.add_argument(name, choices=["auto", "on", "off"], default="auto")


def fast_path_flags(args: argparse.Namespace, device: torch.device) -> tuple[bool, bool, bool]:
    """(amp, channels_last, compile) from the flags :func:`add_fast_path_flags` added."""
    return flag(args.amp, device), flag(args.channels_last, device), flag(args.compile, device)


@dataclass
class Step:
    """One trial's training step, built as :func:`sdd_search.train.run_trial` builds it."""

    step_fn: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
    optimizer: torch.optim.Optimizer
    student_net: nn.Module
    device: torch.device
    kd_scale: Tensor
    sums: Tensor
    cuda_graphs: bool = False

    def train(self, images: Tensor, labels: Tensor) -> None:
        """The body of run_trial's step loop: fused forward, backward, SGD, device-side sums."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, batch_sums = self.step_fn(images, labels, self.kd_scale)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.sums += batch_sums


def build_step(
    device: torch.device,
    *,
    teacher: str = TEACHER,
    student: str = STUDENT,
    num_classes: int = NUM_CLASSES,
    scales: tuple[int, ...] = (1, 2, 4),
    base: str = "kd",
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    distill: bool = True,
    compile_mode: str | None = None,
) -> Step:
    """Teacher + student + SGD + the fused step, with the product's defaults (DistillConfig,
    TrainConfig) so that compiled graphs match run_trial's and hit the same inductor cache."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    config = DistillConfig(base=base, scales=list(scales), method="sdd" if distill else "none")
    train = TrainConfig()
    teacher_net = None
    if distill:
        teacher_model = create_model(teacher, num_classes=num_classes).to(
            device, memory_format=memory_format
        )
        teacher_net = StudentWithCells(teacher_model.eval(), tuple(scales)).eval()
    student_model = create_model(student, num_classes=num_classes).to(
        device, memory_format=memory_format
    )
    student_net = StudentWithCells(student_model, tuple(scales)).train()
    optimizer = torch.optim.SGD(
        student_model.parameters(),
        lr=train.lr,
        momentum=train.momentum,
        weight_decay=train.weight_decay,
    )
    step = DistillationStep(student_net, teacher_net, config, amp=amp)
    step_fn = torch.compile(step, dynamic=False, mode=compile_mode) if compile else step
    return Step(
        step_fn,
        optimizer,
        student_net,
        device,
        kd_scale=torch.full((), 1.0, device=device),
        sums=torch.zeros(len(SUM_COLUMNS), device=device),
        cuda_graphs=compile and device.type == "cuda" and compile_mode == "reduce-overhead",
    )


def fixed_batch(
    batch_size: int,
    device: torch.device,
    *,
    image_size: int = IMAGE_SIZE,
    num_classes: int = NUM_CLASSES,
    channels_last: bool = False,
) -> tuple[Tensor, Tensor]:
    """A pre-made normalised batch on the device (what the loader would yield), seeded."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device, memory_format=memory_format), labels.to(device)


def first_call_seconds(step: Step, images: Tensor, labels: Tensor) -> float:
    """Run one step and return its wall seconds: the compile time when the step is compiled."""
    sync(step.device)
    start = time.perf_counter()  # wall even with --clock cpu: compiling runs in subprocesses
    step.train(images, labels)
    sync(step.device)
    return time.perf_counter() - start


def train_steps(step: Step, images: Tensor, labels: Tensor, steps: int) -> Callable[[], None]:
    """A callable running ``steps`` training steps on one fixed batch (for the timers)."""

    def run() -> None:
        for _ in range(steps):
            step.train(images, labels)

    return run


def result(**values: str | float) -> None:
    """The one greppable line: ``RESULT key=value ...`` (floats with 4 significant digits)."""
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()]
    print("RESULT " + " ".join(parts), flush=True)


def ratio(value: float) -> str:
    return f"{value:.3f}x"


def parse_ints(text: str) -> list[int]:
    return [int(part) for part in str(text).split(",") if part]


def loader_fed_over_fixed(
    step: Step, loader, *, batch: int, repeats: int, warmup: int, target: float
) -> dict[str, str]:
    """Target 1's ratio: epochs of ``step`` fed by ``loader`` against as many steps on one fixed
    real batch (the synthetic-data rate of the same step object), taking turns.

    Prints both rates and the ratio; returns the RESULT fields.
    """
    steps = len(loader)
    epochs = iter(range(1_000_000, 2_000_000))  # epoch numbers no earlier pass used
    images, labels = (tensor.clone() for tensor in next(iter(loader)))
    print(f"first step {first_call_seconds(step, images, labels):.1f} s (compile, allocation)")

    def loader_fed_epoch() -> None:
        loader.set_epoch(next(epochs))
        for batch_images, batch_labels in loader:
            step.train(batch_images, batch_labels)

    times = interleaved_seconds(
        {"loader": loader_fed_epoch, "fixed": train_steps(step, images, labels, steps)},
        device=step.device,
        repeats=repeats,
        warmup=warmup,
    )
    fed_rate = steps * batch / statistics.median(times["loader"])
    fixed_rate = steps * batch / statistics.median(times["fixed"])
    fraction = median_ratio(times["fixed"], times["loader"])  # loader-fed rate / fixed rate
    verdict = "met" if fraction >= target else "MISSED"
    print(f"loader-fed step: {fed_rate:,.1f} img/s   fixed batch: {fixed_rate:,.1f} img/s")
    print(f"loader-fed / fixed: {fraction:.3f} (target >= {target}: {verdict})")
    return {
        "fed_img_per_s": f"{fed_rate:.1f}",
        "fixed_img_per_s": f"{fixed_rate:.1f}",
        "fed_over_fixed": f"{fraction:.3f}x",
    }
