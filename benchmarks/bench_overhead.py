"""Orchestration overhead of a search: trial wall time minus time inside the training loop.

Runs the quickstart spec (digits, CPU, local Ray, MLflow sqlite) at two or more trial lengths in
one go and prints, for each, the median trial wall time, the median time outside the loop
(placement, worker start, teacher fetch, checkpoints, evaluation is inside the loop, logging)
and the overhead as a fraction of all trial time, plus the whole search's wall time.

It also prints the median seconds of each phase outside the loop (Tune actor start, Train
controller and worker start, worker imports, teacher/data/model, checkpoints and reports,
shutdown; see ``sdd_search.overhead.PHASES``) and fits time-outside-the-loop = fixed + per_epoch *
epochs over the lengths run, which extrapolates the fraction to longer trials.

    python benchmarks/bench_overhead.py                       # epochs 2, 8 and 16, 4 trials each
    python benchmarks/bench_overhead.py --epochs 2 8 16 32 --trials 4
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--spec", default=str(ROOT / "search_spaces" / "quickstart.yaml"))
    # The extrapolation: search_spaces/cifar100.yaml trains 240 epochs; one epoch at the GPU
    # target of 15,000 img/s is 50,000 / 15,000 s plus evaluating 10,000 images (~0.3 s).
    parser.add_argument("--long-epochs", type=int, default=240)
    parser.add_argument("--long-epoch-seconds", type=float, default=3.6)
    args = parser.parse_args()

    from sdd_search.ray_compat import apply_ray_env_defaults

    apply_ray_env_defaults()  # run_search's own settings, before this script imports Ray
    import ray

    from sdd_search.search import run_search
    from sdd_search.spec import load_spec

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for epochs in args.epochs:
            spec = load_spec(
                args.spec,
                [
                    f"name=overhead-{epochs}",
                    f"train.epochs={epochs}",
                    f"search.num_trials={args.trials}",
                    f"search.max_concurrent={args.concurrent}",
                    "search.scheduler=none",
                    "search.references=false",
                    "search.top_k=0",
                    f"storage={tmp}/runs",
                    f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                ],
            )
            outcome = run_search(spec, log=lambda line: None)
            ray.shutdown()
            overhead = outcome.overhead
            rows.append((epochs, outcome.wall_seconds, overhead))
            print(
                f"epochs={epochs:<3} trials={args.trials} concurrent={args.concurrent} "
                f"search_wall={outcome.wall_seconds:.1f}s "
                f"median_trial_wall={overhead['median_trial_wall_s']:.1f}s "
                f"median_loop={overhead['median_loop_s']:.1f}s "
                f"median_outside_loop={overhead['median_overhead_s']:.1f}s "
                f"overhead_fraction={overhead['fraction']:.3f}",
                flush=True,
            )
            phases = {k[len("phase/") :]: v for k, v in overhead.items() if k.startswith("phase/")}
            print(
                "#   median seconds per phase: "
                + ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
                + "; checkpoint + report per epoch "
                + f"{overhead.get('report_seconds_per_epoch', float('nan')):.3f}"
            )
    summary = " ".join(f"overhead_at_{e}_epochs={o['fraction']:.3f}" for e, _, o in rows)
    # The time outside the loop = fixed (start-up, shutdown) + per_epoch * epochs. per_epoch is
    # measured directly (the worker times each checkpoint + report); fixed is the rest, median
    # over the lengths run. Then the share for a long trial, e.g. the cifar100 spec's.
    per_epoch = float(np.median([o.get("report_seconds_per_epoch", 0.0) for _, _, o in rows]))
    fixed = float(np.median([o["median_overhead_s"] - per_epoch * e for e, _, o in rows]))
    outside = fixed + per_epoch * args.long_epochs
    loop = args.long_epochs * args.long_epoch_seconds
    print(
        f"# a {args.long_epochs}-epoch trial at {args.long_epoch_seconds:g} s per epoch "
        f"(cifar100 spec at 15,000 img/s): {outside:.0f} s outside a {loop:.0f} s loop"
    )
    summary += (
        f" fixed_s={fixed:.1f} per_epoch_s={per_epoch:.3f}"
        f" overhead_at_{args.long_epochs}_epochs_of_{args.long_epoch_seconds:g}s="
        f"{outside / (outside + loop):.3f}"
    )
    print(f"RESULT {summary}")


if __name__ == "__main__":
    main()
