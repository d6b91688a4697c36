"""Does the data path keep the step fed? Loader-fed step throughput over fixed-batch throughput.

resnet32x4 -> resnet8x4, SDD (1, 2, 4), on CIFAR-sized synthetic data (dataset "synthetic",
32 px, 100 classes; nothing downloaded):

1. The loader alone: ResidentLoader epochs (gather + crop + flip + normalise on the device), img/s.
2. Real augmentation: the ResidentLoader feeding the fused training step, a whole epoch, img/s.
3. Synthetic: the same step object (same models, flags, optimiser, compiled graph) on one fixed
   pre-made batch, as many steps as an epoch has.
   2 and 3 take turns within each repeat; the ratio is the median of the per-repeat ratios.
   Target: loader-fed / fixed >= 0.90.
4. For reference, :func:`sdd_search.train.run_trial` itself: its per-epoch
   ``train_images_per_second`` (train loop only, evaluation excluded), median over the epochs
   after the first (which compiles); always wall time; ``--no-run-trial`` skips it.

Flags follow run_trial's: auto = bf16 + channels_last + compile on CUDA, fp32 eager on the CPU.

    python benchmarks/bench_data.py                                # CPU: batch 16, 256 images
    python benchmarks/bench_data.py --device cuda --batch-size 512   # 50,000 images
"""

from __future__ import annotations

import statistics

from common import (
    add_fast_path_flags,
    base_parser,
    build_step,
    describe,
    fast_path_flags,
    loader_fed_over_fixed,
    median_seconds,
    resolve,
    result,
)

from sdd_search.config import TrialConfig
from sdd_search.data import build_datasets_and_loaders
from sdd_search.models import create_model
from sdd_search.train import run_trial

TARGET = 0.90


def run_trial_rate(args, device, batch: int, amp: bool, channels_last: bool, compiled: bool):
    """Median train_images_per_second of run_trial's epochs after the first ``args.warmup``."""
    config = TrialConfig.model_validate(
        {
            "data": {
                "dataset": "synthetic",
                "image_size": args.image_size,
                "synthetic_num_classes": args.num_classes,
                "synthetic_size": args.synthetic_size,
            },
            "teacher": {"model": args.teacher},
            "student": {"model": args.student},
            "distill": {"method": "sdd", "scales": [1, 2, 4]},
            "train": {
                "epochs": args.warmup + args.repeats,
                "batch_size": batch,
                "schedule": "constant",
                "device": device.type,
                "amp": "bf16" if amp else "off",
                "channels_last": "on" if channels_last else "off",
                "compile": "on" if compiled else "off",
                "num_threads": args.threads if device.type == "cpu" else None,
            },
        }
    )
    teacher = create_model(args.teacher, num_classes=args.num_classes)
    history = run_trial(config, teacher=teacher).history
    rates = [row["train_images_per_second"] for row in history]
    print("run_trial epochs, img/s: " + ", ".join(f"{rate:,.1f}" for rate in rates))
    return statistics.median(rates[args.warmup :])


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--synthetic-size", type=int, default=None, help="training images")
    add_fast_path_flags(parser)
    parser.add_argument("--no-run-trial", action="store_true", help="skip measurement 4")
    args = parser.parse_args()
    device = resolve(
        args,
        cpu={"batch_size": 16, "synthetic_size": 256, "repeats": 3, "warmup": 1},
        cuda={"batch_size": 512, "synthetic_size": 50_000, "repeats": 5, "warmup": 1},
    )
    describe(args, device, "bench_data")
    amp, channels_last, compiled = fast_path_flags(args, device)
    batch = args.batch_size

    _, loader, _ = build_datasets_and_loaders(
        "synthetic",
        root=None,
        batch_size=batch,
        device=device,
        image_size=args.image_size,
        channels_last=channels_last,
        synthetic_num_classes=args.num_classes,
        synthetic_size=args.synthetic_size,
        stage="final",  # an epoch over all synthetic_size images (no selection split held out)
    )
    steps = len(loader)
    epochs = iter(range(1_000_000))
    print(
        f"# {steps} batches of {batch} per epoch; amp={amp} channels_last={channels_last} "
        f"compile={compiled}"
    )

    # 1. The loader alone.
    def loader_epoch() -> None:
        loader.set_epoch(next(epochs))
        for _images, _labels in loader:
            pass

    loader_seconds = median_seconds(loader_epoch, device=device, repeats=5 * args.repeats)
    loader_rate = steps * batch / loader_seconds
    print(f"loader alone: {loader_rate:,.0f} img/s")

    # 2 and 3: one step object, fed by the loader or by a fixed batch, taking turns.
    step = build_step(
        device,
        teacher=args.teacher,
        student=args.student,
        num_classes=args.num_classes,
        amp=amp,
        channels_last=channels_last,
        compile=compiled,
    )
    values = {
        "device": device.type,
        "batch": batch,
        "loader_img_per_s": f"{loader_rate:.0f}",
        **loader_fed_over_fixed(
            step, loader, batch=batch, repeats=args.repeats, warmup=args.warmup, target=TARGET
        ),
    }
    fixed_rate = float(values["fixed_img_per_s"])

    # 4. run_trial itself (its own loop, evaluation excluded from the rate).
    if not args.no_run_trial:
        trial_rate = run_trial_rate(args, device, batch, amp, channels_last, compiled)
        print(f"run_trial: {trial_rate:,.1f} img/s ({trial_rate / fixed_rate:.3f} of fixed)")
        values["run_trial_img_per_s"] = f"{trial_rate:.1f}"
        values["run_trial_over_fixed"] = f"{trial_rate / fixed_rate:.3f}x"
    print()
    result(**values)


if __name__ == "__main__":
    main()
