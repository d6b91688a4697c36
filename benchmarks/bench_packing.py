"""Packing trials on one device: total images/s of k concurrent trials over one trial alone.

k processes (k = 1, 2, 4 by default) each build their own teacher, student, optimiser and fused
step (resnet32x4 -> resnet8x4, SDD (1, 2, 4), 32 px, a fixed batch), as k concurrent search
trials would, wait at a barrier, then train for ``--seconds``; the total is the sum of their
images/s over that shared window (median over ``--repeats`` windows).

On a GPU this is what fractional-GPU trials (Ray's ``resources_per_worker={"GPU": 1/k}``)
buy: small steps leave the GPU idle between kernels, and other trials' kernels fill the gaps.
On a CPU each process gets ``--threads-per-process`` threads (default 1), so packing is
bounded by the cores: beyond one process per core the total cannot grow.

    python benchmarks/bench_packing.py                               # CPU: batch 16
    python benchmarks/bench_packing.py --device cuda --batch-size 64
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time

import torch
from common import (
    add_fast_path_flags,
    base_parser,
    build_step,
    describe,
    fast_path_flags,
    first_call_seconds,
    fixed_batch,
    parse_ints,
    resolve,
    result,
    sync,
)


def _packed_trial(rank: int, options: dict, barrier, results) -> None:
    torch.set_num_threads(options["threads_per_process"])
    device = torch.device(options["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each conv once
    torch.manual_seed(rank)
    step = build_step(
        device,
        teacher=options["teacher"],
        student=options["student"],
        num_classes=options["num_classes"],
        amp=options["amp"],
        channels_last=options["channels_last"],
        compile=options["compile"],
    )
    images, labels = fixed_batch(
        options["batch_size"],
        device,
        image_size=options["image_size"],
        num_classes=options["num_classes"],
        channels_last=options["channels_last"],
    )
    first_call_seconds(step, images, labels)
    for _ in range(options["warmup"]):
        step.train(images, labels)
    sync(device)
    for repeat in range(options["repeats"]):
        barrier.wait()
        start = time.perf_counter()
        steps = 0
        while time.perf_counter() - start < options["seconds"]:
            step.train(images, labels)
            steps += 1
        sync(device)  # the queued GPU work belongs to this window
        results.put((rank, repeat, steps * options["batch_size"], time.perf_counter() - start))


def worker(rank: int, options: dict, barrier, results) -> None:
    """One packed trial: build, warm up, then train for ``seconds`` per repeat, in step."""
    try:
        _packed_trial(rank, options, barrier, results)
    except BaseException as error:  # tell the parent instead of leaving it waiting
        barrier.abort()
        results.put((rank, -1, repr(error), 0.0))
        raise


def packed_rate(k: int, options: dict) -> tuple[float, list[float]]:
    """(median over repeats of the total img/s, each trial's median img/s) for k trials."""
    context = mp.get_context("spawn")  # CUDA cannot be forked
    barrier = context.Barrier(k)
    results = context.Queue()
    processes = [
        context.Process(target=worker, args=(rank, options, barrier, results)) for rank in range(k)
    ]
    for process in processes:
        process.start()
    rows = []
    try:
        while len(rows) < k * options["repeats"]:
            row = results.get(timeout=900)
            if row[1] < 0:
                raise SystemExit(f"packed trial {row[0]} failed: {row[2]}")
            rows.append(row)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()
    rate = {(rank, repeat): images / seconds for rank, repeat, images, seconds in rows}
    totals = [sum(rate[rank, r] for rank in range(k)) for r in range(options["repeats"])]
    per_process = [
        statistics.median(rate[rank, r] for r in range(options["repeats"])) for rank in range(k)
    ]
    return statistics.median(totals), per_process


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--trials", default="1,2,4", help="comma list of k")
    parser.add_argument("--seconds", type=float, default=None, help="timed window per repeat")
    parser.add_argument("--threads-per-process", type=int, default=1)
    add_fast_path_flags(parser)
    args = parser.parse_args()
    device = resolve(
        args,
        cpu={"batch_size": 16, "seconds": 6.0, "repeats": 2, "warmup": 1},
        cuda={"batch_size": 64, "seconds": 6.0, "repeats": 3, "warmup": 10},
    )
    if args.clock != "wall":
        raise SystemExit("bench_packing needs --clock wall: it times a window shared by processes")
    describe(args, device, "bench_packing")
    options = {
        "device": str(device),
        "teacher": args.teacher,
        "student": args.student,
        "num_classes": args.num_classes,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        **dict(
            zip(("amp", "channels_last", "compile"), fast_path_flags(args, device), strict=True)
        ),
        "threads_per_process": args.threads_per_process,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seconds": args.seconds,
    }
    if device.type == "cpu":
        print(
            f"# CPU: {os.cpu_count()} cores, {args.threads_per_process} thread(s) per process: "
            "the total is bounded by the cores"
        )
    values: dict[str, str | float] = {"device": device.type, "batch": args.batch_size}
    alone = None
    for k in parse_ints(args.trials):
        total, per_process = packed_rate(k, options)
        alone = alone if alone is not None else total
        shares = ", ".join(f"{rate:,.1f}" for rate in per_process)
        print(
            f"k={k}: total {total:,.1f} img/s ({total / alone:.2f}x of the first k; per trial {shares})"
        )
        values[f"k{k}_img_per_s"] = f"{total:.1f}"
        values[f"k{k}_over_k{parse_ints(args.trials)[0]}"] = f"{total / alone:.2f}x"
    print()
    result(**values)


if __name__ == "__main__":
    main()
