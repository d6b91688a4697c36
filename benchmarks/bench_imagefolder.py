"""ImageNet-style folders: do JPEG decoding and random-resized-crop keep the step fed?

Writes ``--files`` real JPEGs of ImageNet-like sizes (sides 280-500 px, smooth content, quality
90; nothing downloaded) into a temporary ``train/<class>/`` + ``val/<class>/`` folder, then:

1. Decode: ``torchvision.io.decode_jpeg`` one file at a time on the CPU, one thread (what one
   DataLoader worker of a CPU-decoding pipeline delivers) against the loader's batched decode on
   the device (nvjpeg on CUDA; a loop on the CPU), img/s on the same bytes.
2. Resize: the train augmentation (random-resized-crop + flip) of decoded batches, image by image
   (``torchvision`` ``resized_crop`` per image: the CPU's path) against batched
   (``sdd_search.data.gpu_resize.resize_regions``: the CUDA path), taking turns: img/s, and the aten ops
   and kernel launches dispatched per batch (profiler counts: the Python and driver work that
   keeps a GPU waiting when it grows with the batch).
3. The loader alone: ``ImageFolderLoader`` epochs (workers read bytes; decode, augment and
   normalise on the device), img/s.
4. The loader feeding the fused training step over the same step on a fixed pre-made batch,
   taking turns, one epoch each. Target: loader-fed / fixed >= 0.90. Measured with the loader's
   default (a background thread making batches ahead: on for CUDA, off on the CPU), then with
   the other setting (RESULT keys suffixed ``_prefetch_on`` / ``_prefetch_off``).

    python benchmarks/bench_imagefolder.py       # CPU: 128 files, 48 px, resnet32x4 -> resnet8x4
    python benchmarks/bench_imagefolder.py --device cuda    # 2,048 files, 224 px, resnet34 -> 18
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import (
    add_fast_path_flags,
    base_parser,
    build_step,
    describe,
    fast_path_flags,
    interleaved_seconds,
    loader_fed_over_fixed,
    median_ratio,
    median_seconds,
    resolve,
    result,
)
from PIL import Image

from sdd_search.data import build_datasets_and_loaders

TARGET = 0.90
CLASSES = 10


def _write_some(root: str, jobs: list[tuple[str, int, int]]) -> None:
    for split, index, seed in jobs:
        rng = np.random.default_rng(seed)
        folder = Path(root) / split / f"class{index % CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        height, width = int(rng.integers(280, 501)), int(rng.integers(330, 501))
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        # Smooth colour fields plus grain: JPEGs of photo-like size (tens of kB).
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        grain = rng.integers(-12, 13, (height, width, 3))
        pixels = np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:06d}.jpg", quality=90)


def write_jpegs(root: Path, files: int, seed: int = 0) -> None:
    """``files`` training JPEGs (and a tenth as many for val) in CLASSES class folders, written
    by one process per core."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [
        (split, index, seed * 1_000_003 + offset + index)
        for split, count, offset in (("train", files, 0), ("val", max(CLASSES, files // 10), files))
        for index in range(count)
    ]
    processes = max(1, min(os.cpu_count() or 1, 16))
    shares = [jobs[i::processes] for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_write_some, [str(root)] * processes, shares))


def op_counts(run, device: torch.device) -> tuple[int, int]:
    """(aten ops, kernel launches) that one ``run()`` dispatches (launches: CUDA only)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as profile:
        run()
    names = [event.name for event in profile.events()]
    aten = sum(name.startswith("aten::") for name in names)
    launches = sum("LaunchKernel" in name for name in names) if device.type == "cuda" else 0
    return aten, launches


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=None, help="training JPEGs to write")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="file-reading workers")
    add_fast_path_flags(parser)
    parser.add_argument("--no-step", action="store_true", help="skip measurement 4")
    parser.set_defaults(teacher=None, student=None, image_size=None, num_classes=CLASSES)
    args = parser.parse_args()
    device = resolve(
        args,
        cpu={
            "files": 128,
            "batch_size": 32,
            "workers": 1,
            "image_size": 48,
            "teacher": "resnet32x4",
            "student": "resnet8x4",
            "repeats": 2,
            "warmup": 1,
        },
        cuda={
            "files": 2048,
            "batch_size": 256,
            "workers": 8,
            "image_size": 224,
            "teacher": "torchvision/resnet34",
            "student": "torchvision/resnet18",
            "repeats": 4,
            "warmup": 1,
        },
    )
    describe(args, device, "bench_imagefolder")
    amp, channels_last, compiled = fast_path_flags(args, device)
    batch = args.batch_size

    with tempfile.TemporaryDirectory(prefix="sdd-bench-jpegs-") as folder:
        root = Path(folder)
        write_jpegs(root, args.files)
        paths = sorted((root / "train").rglob("*.jpg"))
        sizes = [path.stat().st_size for path in paths]
        print(f"# {len(paths)} JPEGs, median {statistics.median(sizes) / 1024:.0f} kB")
        _, loader, _ = build_datasets_and_loaders(
            "imagefolder",
            root=str(root),
            batch_size=batch,
            device=device,
            image_size=args.image_size,
            num_workers=args.workers,
            channels_last=channels_last,
            stage="final",  # an epoch over every train/ file (no selection split held out)
        )
        steps = len(loader)
        epochs = iter(range(1_000_000))
        print(f"# {steps} batches of {batch} per epoch; amp={amp} channels_last={channels_last} "
              f"compile={compiled}")  # fmt: skip

        # 1. Decode, on one batch's bytes.
        from torchvision.io import ImageReadMode, decode_jpeg

        encoded = [torch.from_numpy(np.fromfile(path, dtype=np.uint8)) for path in paths[:batch]]
        indices = torch.arange(len(encoded))
        torch.set_num_threads(1)  # one worker's rate
        cpu_decode = median_seconds(
            lambda: [decode_jpeg(data, mode=ImageReadMode.RGB) for data in encoded],
            device=torch.device("cpu"),
            repeats=args.repeats,
        )
        torch.set_num_threads(args.threads)
        loader_decode = median_seconds(
            lambda: loader._decode(encoded, indices), device=device, repeats=3 * args.repeats
        )
        cpu_decode_rate, loader_decode_rate = (
            len(encoded) / cpu_decode,
            len(encoded) / loader_decode,
        )
        print(f"decode: CPU one file at a time, 1 thread {cpu_decode_rate:,.0f} img/s; "
              f"the loader's batched decode on {device.type} {loader_decode_rate:,.0f} img/s")  # fmt: skip

        # 2. Resize: per image against batched, on the same decoded batch and draws.
        decoded = loader._decode(encoded, indices)

        def augment(batched: bool, images=decoded):
            def run() -> None:
                loader.batched_resize = batched
                loader._augment(images, torch.Generator().manual_seed(0))

            return run

        default_batched = loader.batched_resize
        resize_times = interleaved_seconds(
            {"per_image": augment(False), "batched": augment(True)},
            device=device,
            repeats=3 * args.repeats,
        )
        # Ops per batch, and per image: the growth from half a batch to a whole one.
        half = decoded[: batch // 2]
        counts = {
            name: (op_counts(augment(batched), device), op_counts(augment(batched, half), device))
            for name, batched in (("per_image", False), ("batched", True))
        }
        loader.batched_resize = default_batched
        rates = {name: batch / statistics.median(times) for name, times in resize_times.items()}
        resize_speedup = median_ratio(resize_times["per_image"], resize_times["batched"])
        per_image_added = {}
        for name, ((ops, launches), (half_ops, half_launches)) in counts.items():
            added = batch - len(half)
            per_image_added[name] = ((ops - half_ops) / added, (launches - half_launches) / added)
            print(f"resize + flip, {name.replace('_', ' ')}: {rates[name]:,.0f} img/s; per batch "
                  f"{ops} aten ops, {launches} kernel launches; per image "
                  f"{per_image_added[name][0]:.1f} ops, {per_image_added[name][1]:.1f} launches")  # fmt: skip
        print(f"batched / per image rate: {resize_speedup:.2f}x; the loader uses "
              f"{'batched' if default_batched else 'per image'} on {device.type}")  # fmt: skip

        # 3. The loader alone.
        def loader_epoch() -> None:
            loader.set_epoch(next(epochs))
            for _images, _labels in loader:
                pass

        loader_seconds = median_seconds(loader_epoch, device=device, repeats=args.repeats)
        loader_rate = steps * batch / loader_seconds
        print(f"loader alone ({args.workers} workers): {loader_rate:,.0f} img/s")
        values = {
            "device": device.type,
            "batch": batch,
            "cpu_decode_1thread_img_per_s": f"{cpu_decode_rate:.0f}",
            "loader_decode_img_per_s": f"{loader_decode_rate:.0f}",
            "resize_per_image_img_per_s": f"{rates['per_image']:.0f}",
            "resize_batched_img_per_s": f"{rates['batched']:.0f}",
            "resize_batched_over_per_image": f"{resize_speedup:.3f}x",
            "ops_per_image_per_image_path": f"{per_image_added['per_image'][0]:.1f}",
            "ops_per_image_batched": f"{per_image_added['batched'][0]:.1f}",
            "launches_per_image_per_image_path": f"{per_image_added['per_image'][1]:.1f}",
            "launches_per_image_batched": f"{per_image_added['batched'][1]:.1f}",
            "loader_img_per_s": f"{loader_rate:.0f}",
        }

        # 4. Loader-fed step against the same step on a fixed batch.
        if not args.no_step:
            step = build_step(
                device,
                teacher=args.teacher,
                student=args.student,
                num_classes=CLASSES,
                scales=(1, 2),
                amp=amp,
                channels_last=channels_last,
                compile=compiled,
            )
            # The loader's own setting first (the target), then the other prefetch setting.
            default_prefetch = loader.prefetch
            for prefetch in (default_prefetch, not default_prefetch):
                loader.prefetch = prefetch
                print(f"## prefetch thread {'on' if prefetch else 'off'}"
                      f"{' (the default here)' if prefetch == default_prefetch else ''}")  # fmt: skip
                fields = loader_fed_over_fixed(
                    step,
                    loader,
                    batch=batch,
                    repeats=args.repeats,
                    warmup=args.warmup,
                    target=TARGET,
                )
                suffix = (
                    ""
                    if prefetch == default_prefetch
                    else f"_prefetch_{'on' if prefetch else 'off'}"
                )
                values.update({f"{key}{suffix}": value for key, value in fields.items()})
            loader.prefetch = default_prefetch
    print()
    result(**values)


if __name__ == "__main__":
    main()
