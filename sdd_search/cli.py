"""``sdd-search SPEC.yaml``: validate the spec, run (or resume) the search, print the leaderboard."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdd_search.plan import resolved_plan
from sdd_search.spec import SpecError, default_spec_path, load_spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdd-search",
        description="Search Scale Decoupled Distillation's knobs with Ray Tune + Optuna; "
        "train every trial with Ray Train; log everything to MLflow.",
    )
    parser.add_argument(
        "spec",
        nargs="?",
        help="search spec YAML (default: the embedded quickstart: digits, CPU, local Ray)",
    )
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search")
    parser.add_argument(
        "--check", action="store_true", help="validate and print the plan; run nothing"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a spec field, e.g. --set search.num_trials=64 (repeatable)",
    )
    parser.add_argument(
        "--address", help="Ray cluster address (auto, ray://host:10001); default: a local Ray"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec_path = Path(args.spec) if args.spec else default_spec_path()
    try:
        spec = load_spec(spec_path, args.overrides)
    except SpecError as error:
        print(f"sdd-search: error: {error}", file=sys.stderr)
        return 2
    if args.check:
        print(resolved_plan(spec))
        print("spec OK")
        return 0

    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no store-migration chatter
    from sdd_search.leaderboard import format_leaderboard
    from sdd_search.ray_compat import RayCompatError
    from sdd_search.search import SearchError, run_search  # Ray's settings: run_search's own
    from sdd_search.teacher import TeacherError

    try:
        outcome = run_search(
            spec, resume=args.resume, address=args.address, spec_text=spec_path.read_text()
        )
    except (SearchError, TeacherError, RayCompatError) as error:
        print(f"sdd-search: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\nsdd-search: interrupted; continue with: sdd-search {spec_path} --resume",
            file=sys.stderr,
        )
        return 130
    print()
    epochs = spec.search_trial.train.epochs
    print(
        f"Leaderboard ({spec.search.mode} {spec.search.metric} on the selection split, held out "
        f"from training; one seed each, {epochs}-epoch search schedule; "
        "[baseline] = no teacher, [kd] = plain KD):"
    )
    print(format_leaderboard(outcome.leaderboard))
    if outcome.final_report:
        seeds = spec.final.seeds
        print(
            f"\nFinal stage ({spec.train.epochs} epochs on all the training data, {seeds} seeds "
            "each, scored once on the test split at the last epoch):"
        )
        print(outcome.final_report)
    if outcome.best_student_path:
        print(f"\nbest student: {outcome.best_student_path}")
    for trial_id, version in outcome.registered:
        print(f"registered {spec.registered_model_name} v{version} (trial {trial_id})")
    if outcome.registered:
        print(
            f"alias {spec.tracking.alias!r} -> models:/{spec.registered_model_name}@{spec.tracking.alias}"
        )
    if outcome.overhead:
        o = outcome.overhead
        print(
            f"orchestration overhead: {100 * o['fraction']:.1f}% of trial time "
            f"(median {o['median_overhead_s']:.1f}s of {o['median_trial_wall_s']:.1f}s per trial)"
        )
        phases = [(k.removeprefix("phase/"), v) for k, v in o.items() if k.startswith("phase/")]
        if phases:
            print("  median per trial: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases))
        if "report_seconds_per_epoch" in o:
            print(f"  checkpoint + report per epoch: {o['report_seconds_per_epoch']:.3f}s")
    print(f"search wall time: {outcome.wall_seconds:.0f}s; results in {outcome.experiment_path}")
    uri = outcome.tracking_uri
    ui = f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else f"open {uri}"
    print(f"browse every trial: {ui}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
