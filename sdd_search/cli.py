"""``sdd-search SPEC.yaml``: validate the spec, run (or resume) the search, print the leaderboard."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from sdd_search import stopping
from sdd_search.plan import resolved_plan
from sdd_search.spec import SpecError, default_spec_path, load_spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdd-search",
        description="Search Scale Decoupled Distillation's knobs with Ray Tune + Optuna; "
        "train every trial with Ray Train; log everything to MLflow. "
        "`sdd-search report SPEC.yaml` prints what a search found, read from MLflow.",
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
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show Ray's, Optuna's and MLflow's own logs (hidden by default but for "
        "warnings that need you, e.g. a trial that cannot be placed)",
    )
    return parser


def _set_up_output(verbose: bool) -> None:
    """Ray's environment, before Ray is imported (the live view's module imports it); without
    -v, no chatter from Ray, Optuna or MLflow (sdd_search.chatter.hide_chatter)."""
    from sdd_search.ray_compat import apply_ray_env_defaults

    apply_ray_env_defaults()
    if not verbose:
        from sdd_search.chatter import hide_chatter

        hide_chatter()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "report":  # `sdd-search report SPEC.yaml`: its own arguments
        from sdd_search.report import main as report_main

        return report_main(argv[1:])
    return search(argv)


def search(argv: list[str]) -> int:
    """``sdd-search SPEC.yaml [--check] [--resume] ...``: check, run or resume a search."""
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

    if args.resume and (finished := _finished_already(spec, spec_path, args.verbose)) is not None:
        return finished
    _set_up_output(args.verbose)
    from sdd_search.driver_lock import DriverLockError
    from sdd_search.ray_compat import RayCompatError
    from sdd_search.search import (  # Ray's settings: run_search's own
        SearchError,
        SpecChangedError,
        run_search,
    )
    from sdd_search.teacher import TeacherError
    from sdd_search.tracking_buffer import TrackingUnavailableError
    from sdd_search.tuning import SearchInterrupted

    stopping.install()  # SIGTERM stops the search as Ctrl-C does
    try:
        outcome = run_search(
            spec, resume=args.resume, address=args.address, spec_text=spec_path.read_text()
        )
    except SpecChangedError as error:
        return _spec_changed(spec_path, str(error))
    except (SearchError, TeacherError, RayCompatError, DriverLockError) as error:
        print(f"sdd-search: error: {error}", file=sys.stderr)
        return 2
    except TrackingUnavailableError as error:
        if not error.resumable:  # at the start: nothing ran; the field is the spec's
            print(f"sdd-search: error: {spec_path}: {error}", file=sys.stderr)
            return 2
        again = [*([args.spec] if args.spec else []), *(f"--set={o}" for o in args.overrides)]
        command = shlex.join(["sdd-search", *again, "--resume"])
        print(f"sdd-search: error: {error}; nothing registered; then: {command}", file=sys.stderr)
        return 75  # EX_TEMPFAIL: try again later
    except (KeyboardInterrupt, SearchInterrupted):
        again = [*([args.spec] if args.spec else []), *(f"--set={o}" for o in args.overrides)]
        command = shlex.join(["sdd-search", *again, "--resume"])
        how = " (SIGTERM)" if stopping.terminated() else ""
        print(
            f"\nsdd-search: interrupted{how}; nothing registered; continue with: {command}",
            file=sys.stderr,
        )
        return 143 if stopping.terminated() else 130
    _print_outcome(spec, args, outcome)
    return 0


def _finished_already(spec, spec_path: Path, verbose: bool) -> int | None:
    """``--resume`` of a search that ran to its end: nothing to train, so no Ray (not even
    imported); its report (as ``sdd-search report`` prints it) and exit 0, or 2 for a spec
    changed since. None when the search did not finish: the resume goes on."""
    from sdd_search import report, resume_check

    if not verbose:
        report.hide_mlflow_chatter()
    record = report.finished_search(spec)
    if record is None:
        return None
    if changed := resume_check.changed_field(spec):
        return _spec_changed(spec_path, changed)
    print(f"sdd-search: search {spec.name!r} ran to its end already; nothing to resume.\n")
    print(report.render(record))
    return 0


def _spec_changed(spec_path: Path, line: str) -> int:
    """A resume refused for a changed spec: its one line, naming the spec file; exit 2."""
    print(f"sdd-search: error: {spec_path}: {line}", file=sys.stderr)
    return 2


def _print_outcome(spec, args, outcome) -> None:
    """What a finished search prints: the leaderboard, the final report, what was registered,
    the overhead, and where to look next."""
    from sdd_search.leaderboard import format_leaderboard, registered_as
    from sdd_search.report import final_heading, leaderboard_heading
    from sdd_search.tracking import runs_page

    print()
    print(leaderboard_heading(spec))  # the report prints the same lines (sdd_search.report)
    print(format_leaderboard(outcome.leaderboard))
    if outcome.final_report:
        print(f"\n{final_heading(spec)}")
        print(outcome.final_report)
    if outcome.best_student_path:
        print(f"\nbest student: {outcome.best_student_path}")
    for trial_id, version, *name in outcome.registered:
        print(
            f"registered {spec.registered_model_name} v{version} ({registered_as(trial_id, name)})"
        )
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
    print(f"browse every trial: {runs_page(outcome.tracking_uri, outcome.experiment_id)}")
    again = [*([args.spec] if args.spec else []), *(f"--set={o}" for o in args.overrides)]
    print(f"again, without Ray: {shlex.join(['sdd-search', 'report', *again])} [--format csv]")


if __name__ == "__main__":
    sys.exit(main())
