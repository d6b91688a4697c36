"""Orchestration overhead of a search: trial wall time minus time inside the training loop.

Runs the quickstart spec (digits, CPU, local Ray, MLflow sqlite) at two or more trial lengths in
one go and prints, for each, the median trial wall time, the median time outside the loop
(placement, worker start, teacher fetch, checkpoints, evaluation is inside the loop, logging)
and the overhead as a fraction of all trial time, plus the whole search's wall time.

It also prints the median seconds of each phase outside the loop (Tune actor start, Train
controller and worker start, worker imports, teacher/data/model, checkpoints and reports,
shutdown; see ``sdd_search.trial.PHASES``) and fits time-outside-the-loop = fixed + per_epoch *
epochs over the lengths run, which extrapolates the fraction to longer trials.

    python benchmarks/bench_overhead.py                       # epochs 2, 8 and 16, 4 trials each
    python benchmarks/bench_overhead.py --epochs 2 8 16 32 --trials 4
"""

from __future__ import annotations

import argparse
import os
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
    args = parser.parse_args()

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
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
    # The fixed part (start-up, shutdown) and the per-epoch part (report, checkpoint) of the time
    # outside the loop, from a straight line through (epochs, median outside-loop seconds).
    if len(rows) >= 2:
        xs = [e for e, _, _ in rows]
        ys = [o["median_overhead_s"] for _, _, o in rows]
        per_epoch, fixed = np.polyfit(xs, ys, 1)
        summary += f" fixed_s={fixed:.1f} per_epoch_s={per_epoch:.3f}"
    print(f"RESULT {summary} median_outside_loop_s={rows[-1][2]['median_overhead_s']:.1f}")


if __name__ == "__main__":
    main()
