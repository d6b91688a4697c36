"""Images/s of the distillation step, plain fp32 eager against the fast path.

resnet32x4 -> resnet8x4 at 32 px, SDD scales (1, 2, 4), the step run_trial runs (fused
teacher + student + CE + SDD, backward, SGD). Modes:

- eager_fp32: the plain step, fp32, contiguous, no compile.
- eager_bf16: bf16 autocast + channels_last, no compile.
- compiled_fp32: torch.compile of the fused step, fp32.
- fast: bf16 autocast + channels_last + torch.compile of the fused step (run_trial's CUDA default).

The plain-KD step (scale 1) is timed in ``--kd-mode`` too, for SDD's cost over KD. GPU targets:
>= 40,000 img/s at batch 512, >= 15,000 at batch 64, SDD step within 3% of plain KD's.

    python benchmarks/bench_step.py                                  # CPU: batch 32
    python benchmarks/bench_step.py --device cuda --batch-sizes 64,512
"""

from __future__ import annotations

import statistics

from common import (
    base_parser,
    build_step,
    describe,
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

MODES = {  # name: (bf16 autocast, channels_last, compile)
    "eager_fp32": (False, False, False),
    "eager_bf16": (True, True, False),
    "compiled_fp32": (False, False, True),
    "fast": (True, True, True),
}
TARGETS = {512: 40_000.0, 64: 15_000.0}  # img/s on one GPU (the targets)
SDD_OVER_KD_TARGET = 1.03


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default=None, help="comma list; CPU 32, CUDA 64,512")
    parser.add_argument("--modes", default=None, help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--kd-mode", default=None, help="mode in which plain KD is also timed")
    parser.add_argument("--steps", type=int, default=None, help="training steps per repeat")
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode for the compiled modes (default: run_trial's, i.e. default); "
        "e.g. reduce-overhead (CUDA graphs) or max-autotune-no-cudagraphs",
    )
    args = parser.parse_args()
    device = resolve(
        args,
        cpu={
            "batch_sizes": "32",
            "modes": "eager_fp32,eager_bf16,compiled_fp32",
            "kd_mode": "eager_fp32",  # one compile only: CPU compiles take about a minute
            "repeats": 5,
            "warmup": 1,
            "steps": 1,
        },
        cuda={
            "batch_sizes": "64,512",
            "modes": "eager_fp32,fast",
            "kd_mode": "fast",
            "repeats": 7,
            "warmup": 2,
            "steps": 30,
        },
    )
    describe(args, device, "bench_step")
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes + [args.kd_mode]) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; expected some of {', '.join(MODES)}")
    if device.type == "cuda":
        print("# GPU targets: >= 40,000 img/s at batch 512, >= 15,000 at batch 64 (fast mode),")
        print("#              SDD step time <= 1.03 x plain KD's")
    values: dict[str, str | float] = {
        "device": device.type,
        "compile_mode": args.compile_mode or "default",
    }

    for batch in parse_ints(args.batch_sizes):
        print(f"\n## batch {batch}, {args.teacher} -> {args.student}, {args.image_size}px")
        runs = {}
        for mode in modes + ([] if args.kd_mode in modes else [args.kd_mode]):
            amp, channels_last, compiled = MODES[mode]
            images, labels = fixed_batch(
                batch,
                device,
                image_size=args.image_size,
                num_classes=args.num_classes,
                channels_last=channels_last,
            )
            methods = [("sdd", (1, 2, 4))] + ([("kd", (1,))] if mode == args.kd_mode else [])
            for method, scales in methods:
                step = build_step(
                    device,
                    teacher=args.teacher,
                    student=args.student,
                    num_classes=args.num_classes,
                    scales=scales,
                    amp=amp,
                    channels_last=channels_last,
                    compile=compiled,
                    compile_mode=args.compile_mode,
                )
                first = first_call_seconds(step, images, labels)
                print(f"{mode} {method}: first step {first:.1f} s (compile, allocation)")
                runs[(mode, method)] = train_steps(step, images, labels, args.steps)
        times = interleaved_seconds(
            {f"{m}/{k}": run for (m, k), run in runs.items()},
            device=device,
            repeats=args.repeats,
            warmup=args.warmup,
        )
        throughput = {}
        for (mode, method), _ in runs.items():
            seconds = statistics.median(times[f"{mode}/{method}"]) / args.steps
            throughput[(mode, method)] = batch / seconds
            print(
                f"{mode:>14} {method:>3}: {seconds * 1e3:9.2f} ms/step {batch / seconds:10.1f} img/s"
            )
            if method == "sdd" and mode in modes:
                values[f"{mode}_b{batch}"] = f"{batch / seconds:.1f}img/s"
        baseline = "eager_fp32"
        if baseline in modes:
            for mode in modes:
                if mode != baseline:
                    speedup = median_ratio(times[f"{baseline}/sdd"], times[f"{mode}/sdd"])
                    print(f"{mode} over {baseline}: {speedup:.2f}x")
                    values[f"{mode}_over_eager_b{batch}"] = ratio(speedup)
        sdd_over_kd = median_ratio(times[f"{args.kd_mode}/sdd"], times[f"{args.kd_mode}/kd"])
        print(f"SDD / KD step time ({args.kd_mode}): {sdd_over_kd:.3f}x")
        values[f"sdd_over_kd_step_b{batch}"] = ratio(sdd_over_kd)
        if device.type == "cuda" and "fast" in modes and batch in TARGETS:
            fast = throughput[("fast", "sdd")]
            verdict = "met" if fast >= TARGETS[batch] else "MISSED"
            print(f"target {TARGETS[batch]:.0f} img/s at batch {batch}: {fast:.0f} -> {verdict}")
            kd_verdict = "met" if sdd_over_kd <= SDD_OVER_KD_TARGET else "MISSED"
            print(f"target SDD/KD <= {SDD_OVER_KD_TARGET}: {sdd_over_kd:.3f} -> {kd_verdict}")

    print()
    result(**values)


if __name__ == "__main__":
    main()
