"""What SDD costs over plain distillation: the loss alone, and one whole training step.

1. Loss forward+backward: ``sdd_loss`` on B x 21 x K cells (scales 1, 2, 4) over the same base
   loss on B x 1 x K global logits, for each base (kd, dkd, nkd).
2. One distillation step (teacher forward, student forward+backward, SGD) with SDD (scales
   1, 2, 4) over one with plain KD (scale 1): resnet32x4 -> resnet8x4 at 32 px, same batch.
   The step uses the product's flags: auto = bf16 + channels_last + compile on CUDA, plain fp32
   eager on the CPU.

    python benchmarks/bench_loss.py                               # CPU: batch 32
    python benchmarks/bench_loss.py --device cuda --batch-sizes 64,512
"""

from __future__ import annotations

import statistics

import torch
from common import (
    add_fast_path_flags,
    base_parser,
    build_step,
    describe,
    fast_path_flags,
    first_call_seconds,
    fixed_batch,
    interleaved_seconds,
    median_ratio,
    parse_ints,
    ratio,
    resolve,
    result,
    train_steps,
)

from sdd_search.sdd import num_cells, sdd_loss

BASES = ("kd", "dkd", "nkd")


def loss_call(base: str, cells: int, batch: int, num_classes: int, device, iters: int):
    """A callable running ``iters`` sdd_loss forward+backward passes on B x cells x K."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(batch, cells, num_classes, generator=generator).to(device)
    teacher = torch.randn(batch, cells, num_classes, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    student.requires_grad_(True)

    def run() -> None:
        for _ in range(iters):
            sdd_loss(student, teacher, labels, base=base).backward()

    return run


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default=None, help="comma list; CPU 32, CUDA 64,512")
    parser.add_argument("--loss-iters", type=int, default=None, help="loss calls per repeat")
    parser.add_argument("--steps", type=int, default=None, help="training steps per repeat")
    add_fast_path_flags(parser)
    args = parser.parse_args()
    device = resolve(
        args,
        cpu={"batch_sizes": "32", "repeats": 7, "warmup": 1, "loss_iters": 50, "steps": 1},
        cuda={"batch_sizes": "64,512", "repeats": 9, "warmup": 3, "loss_iters": 200, "steps": 20},
    )
    describe(args, device, "bench_loss")
    amp, channels_last, compiled = fast_path_flags(args, device)
    sdd_cells = num_cells((1, 2, 4))
    values: dict[str, str | float] = {"device": device.type}

    for batch in parse_ints(args.batch_sizes):
        print(f"\n## loss forward+backward, B={batch}, K={args.num_classes} (medians)")
        for base in BASES:
            runs = {
                cells: loss_call(base, cells, batch, args.num_classes, device, args.loss_iters)
                for cells in (1, sdd_cells)
            }
            times = interleaved_seconds(runs, device=device, repeats=args.repeats, warmup=1)
            plain, sdd = (statistics.median(times[c]) / args.loss_iters for c in (1, sdd_cells))
            loss_ratio = median_ratio(times[sdd_cells], times[1])
            print(
                f"{base}: plain (B x 1 x K) {plain * 1e6:9.1f} us   SDD (B x {sdd_cells} x K) "
                f"{sdd * 1e6:9.1f} us   SDD / plain {loss_ratio:.2f}x"
            )
            values[f"sdd_over_{base}_loss_b{batch}"] = ratio(loss_ratio)

        print(
            f"\n## one distillation step {args.teacher} -> {args.student}, B={batch}, "
            f"{args.image_size}px, amp={amp} channels_last={channels_last} compile={compiled}"
        )
        images, labels = fixed_batch(
            batch,
            device,
            image_size=args.image_size,
            num_classes=args.num_classes,
            channels_last=channels_last,
        )
        runs = {}
        for name, scales in (("kd", (1,)), ("sdd", (1, 2, 4))):
            step = build_step(
                device,
                teacher=args.teacher,
                student=args.student,
                num_classes=args.num_classes,
                scales=scales,
                amp=amp,
                channels_last=channels_last,
                compile=compiled,
            )
            first = first_call_seconds(step, images, labels)
            print(f"{name} scales {list(scales)}: first step {first:.1f} s (compile, allocation)")
            runs[name] = train_steps(step, images, labels, args.steps)
        times = interleaved_seconds(runs, device=device, repeats=args.repeats, warmup=args.warmup)
        for name in runs:
            seconds = statistics.median(times[name]) / args.steps
            print(f"{name}: {seconds * 1e3:9.2f} ms/step  {batch / seconds:10.1f} img/s")
        step_ratio = median_ratio(times["sdd"], times["kd"])
        print(f"SDD step / KD step time: {step_ratio:.3f}x")
        values[f"sdd_over_kd_step_b{batch}"] = ratio(step_ratio)

    print()
    result(**values)


if __name__ == "__main__":
    main()
