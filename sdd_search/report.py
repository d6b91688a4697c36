"""``sdd-search report SPEC.yaml``: what a search found, read back from MLflow, without Ray.

For a running, interrupted or finished search: the leaderboard the search printed (rebuilt
from its MLflow trial runs, :func:`sdd_search.leaderboard.rows_from_mlflow`), the final
stage's report (:func:`sdd_search.final_stage.report_from_mlflow`), where the champion is
(its registered model version, alias and ``best_student.pt``) and the link to the runs in
MLflow's UI; ``--format table|markdown|csv|json`` (csv and json are one machine-readable
document each), ``--figures`` to (re)draw the figures (:mod:`sdd_search.figures`).

The search is found by its spec (the same file and ``--set`` overrides it ran with) or by its
folder (``<storage>/<name>``), where the search leaves ``sdd_search.json``: the resolved spec
with its tracking URI.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdd_search import final_report, final_stage, leaderboard
from sdd_search.space import SEARCH_ROLE
from sdd_search.spec import Spec, SpecError, default_spec_path, load_spec
from sdd_search.tracking import (
    TAG_OUTCOME,
    TAG_REGISTERED,
    TAG_ROLE,
    TAG_SEARCH,
    TAG_TRIAL,
    resolve_tracking_uri,
    runs_page,
    sqlite_file,
)

FORMATS = final_report.FORMATS  # table | markdown | csv | json
RECORD_FILE = "sdd_search.json"  # in the search's folder: the resolved spec, for the report
STATUS = {"RUNNING": "running", "FINISHED": "finished"}  # any other parent status: interrupted


class ReportError(RuntimeError):
    """No such search, or nothing to read it from; the message says what to do."""


# -- finding the search -----------------------------------------------------------------------


def write_record(spec: Spec, tracking_uri: str) -> None:
    """Leave the resolved spec (absolute storage, ``tracking_uri``) in the search's folder, so
    ``sdd-search report <folder>`` finds its MLflow runs (local storage only)."""
    folder = Path(spec.experiment_path())
    if "://" in str(spec.experiment_path()):
        return
    tree = spec.model_dump(mode="json")
    tree["storage"] = spec.storage_uri()
    tree["tracking"]["uri"] = tracking_uri
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{RECORD_FILE}.tmp"
    partial.write_text(json.dumps({"spec": tree}, indent=2) + "\n")
    partial.replace(folder / RECORD_FILE)


def spec_of(target: str | None, overrides: list[str]) -> Spec:
    """The spec of ``target``: a spec file (None: the embedded default) with ``overrides``,
    or a search's folder holding :data:`RECORD_FILE`."""
    path = Path(target) if target else default_spec_path()
    if not path.is_dir():
        return load_spec(path, overrides)
    record = path / RECORD_FILE
    if overrides:
        raise SpecError(f"{path}: --set applies to a spec file, not to a search's folder")
    if not record.is_file():
        raise SpecError(
            f"{path}: not a search's folder (no {RECORD_FILE}); pass the search's spec "
            "instead: sdd-search report SPEC.yaml"
        )
    try:
        return Spec.model_validate(json.loads(record.read_text())["spec"])
    except (ValueError, KeyError) as error:
        raise SpecError(f"{record}: not a search record ({type(error).__name__})") from None


@dataclass
class SearchRecord:
    """One search as MLflow holds it: its parent run and child runs. Has ``client``,
    ``experiment_id`` and ``parent_run_id`` like a SearchTracker, so the final stage's report
    and the figures read it alike."""

    spec: Spec
    client: Any
    uri: str
    experiment_id: str
    parent: Any
    children: list = field(default_factory=list)
    _histories: dict = field(default_factory=dict)

    @property
    def parent_run_id(self) -> str:
        return self.parent.info.run_id

    @property
    def status(self) -> str:
        """running | interrupted | finished: the parent run's outcome; a parent left running
        by a driver that is gone (killed, its machine lost) is interrupted."""
        outcome = self.parent.data.tags.get(TAG_OUTCOME)
        status = STATUS.get(self.parent.info.status, "interrupted")
        if outcome in ("interrupted", "finished") or status != "running":
            return "finished" if "finished" in (outcome, status) else "interrupted"
        return "interrupted" if self.driver_gone() else "running"

    def driver_gone(self) -> str | None:
        """Why no driver runs this search (a phrase), from its lock file; None while one does
        (or where the lock cannot be read: a search kept remotely)."""
        from sdd_search.driver_lock import LOCK_FILE, stale_reason

        if "://" in self.spec.experiment_path():
            return None
        try:
            holder = json.loads((Path(self.spec.experiment_path()) / LOCK_FILE).read_text())
        except FileNotFoundError:
            return "no driver holds its lock"
        except ValueError:
            return None  # a lock being written this instant: its driver is starting
        return stale_reason(holder)

    def history(self, run_id: str, key: str) -> list:
        if (run_id, key) not in self._histories:
            self._histories[(run_id, key)] = self.client.get_metric_history(run_id, key)
        return self._histories[(run_id, key)]

    def last_logged(self) -> float:
        """When the search last wrote to MLflow (seconds since the epoch)."""
        stamps = [self.parent.info.start_time or 0]
        for run in self.children:
            stamps += [run.info.start_time or 0, run.info.end_time or 0]
        stamps += [m.timestamp for values in self._histories.values() for m in values]
        return max(stamps) / 1000.0


def open_search(spec: Spec) -> SearchRecord:
    """The search of ``spec`` in its MLflow store; ReportError when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(spec.tracking.uri)
    store = sqlite_file(uri)
    if store is not None and not store.is_file():  # never create an empty store
        raise ReportError(
            f"no search {spec.name!r}: no MLflow store at {store} (tracking.uri); run it "
            "first: sdd-search SPEC.yaml"
        )
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        experiment = client.get_experiment_by_name(spec.experiment_name)
        parents = (
            client.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.`{TAG_ROLE}` = 'parent' and "
                f"tags.`{TAG_SEARCH}` = '{spec.experiment_path()}'",
                max_results=1,
            )
            if experiment is not None
            else []
        )
        if not parents:
            raise ReportError(
                f"no search {spec.name!r} at {spec.experiment_path()} in MLflow experiment "
                f"{spec.experiment_name!r} ({uri}); run it first: sdd-search SPEC.yaml"
            )
        children = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'",
            max_results=5000,
        )
    except (MlflowException, OSError) as error:
        raise ReportError(f"cannot read MLflow at {uri}: {str(error).splitlines()[0]}") from None
    return SearchRecord(spec, client, uri, experiment.experiment_id, parents[0], children)


def hide_mlflow_chatter() -> None:
    """No store-migration chatter from MLflow ("Creating initial MLflow database tables...")."""
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)


def finished_search(spec: Spec) -> SearchRecord | None:
    """The search of ``spec`` if it ran to its end (its parent run says so), read from MLflow
    without Ray; None when it did not, or when MLflow cannot say at once (the search's own
    start then gives the one-line error)."""
    from sdd_search.tracking_buffer import failing_fast

    try:
        with failing_fast():
            record = open_search(spec)
    except ReportError:  # no record, or none to be had quickly (MLflow's errors become one)
        return None
    return record if record.parent.data.tags.get(TAG_OUTCOME) == "finished" else None


# -- what the report holds --------------------------------------------------------------------


def leaderboard_rows(record: SearchRecord) -> list[dict[str, Any]]:
    """The search's rows as the search printed them: searched trials best first, then the
    references; a trial left running by a search that is no longer running: interrupted."""
    spec = record.spec
    rows = leaderboard.rows_from_mlflow(
        record.children, spec.search.metric, spec.search.mode, record.history
    )
    if record.status != "running":
        for row in rows:
            if row["status"] == "running":
                row["status"] = "interrupted"
    searched = [r for r in rows if r["role"] == SEARCH_ROLE]
    return leaderboard.ranked(searched, spec.search.mode) + [
        r for r in rows if r["role"] != SEARCH_ROLE
    ]


def champion_of(record: SearchRecord) -> dict[str, Any] | None:
    """Where the champion is: its registered model version, the alias, the run it was
    logged in and ``best_student.pt``; None before the search registered any student."""
    from mlflow.exceptions import MlflowException

    spec = record.spec
    registered = json.loads(record.parent.data.tags.get(TAG_REGISTERED) or "[]")
    if not registered:
        return None
    trial_id, version = registered[0][:2]
    name, alias = spec.registered_model_name, spec.tracking.alias
    try:
        alias_version = record.client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        alias_version = None
    run = next((r for r in record.children if r.data.tags.get(TAG_TRIAL) == trial_id), None)
    best = Path(spec.experiment_path()) / "best_student.pt"
    return {
        "registered_model": name,
        "version": str(version),
        "alias": alias,
        "model_uri": f"models:/{name}@{alias}",
        "alias_version": None if alias_version is None else str(alias_version),
        "trial": trial_id,
        "run_name": run.info.run_name if run else None,
        "run_id": run.info.run_id if run else None,
        "best_student": str(best) if best.is_file() else None,
        "registered": [
            {"trial": t, "version": str(v), "run_name": (name or [""])[0]}
            for t, v, *name in registered
        ],
    }


def leaderboard_heading(spec: Spec) -> str:
    """The line above the leaderboard, as the search and the report print it."""
    return (
        f"Leaderboard ({spec.search.mode} {spec.search.metric} on the selection split, held "
        f"out from training; one seed each, {spec.search_trial.train.epochs}-epoch search "
        "schedule; [baseline] = no teacher, [kd] = plain KD):"
    )


def final_heading(spec: Spec) -> str:
    """The line above the final stage's report."""
    return (
        f"Final stage ({spec.train.epochs} epochs on all the training data, {spec.final.seeds} "
        "seeds each, scored once on the test split at the last epoch):"
        if spec.final
        else "Final stage:"
    )


# -- the four formats -------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """``value`` with NaN as None, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _ranked_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows, each with its rank first (None for a reference: a yardstick, unranked)."""
    out, rank = [], 0
    for row in rows:
        searched = row["role"] == SEARCH_ROLE
        rank += searched
        out.append({"rank": rank if searched else None, **row})
    return out


def _search_facts(record: SearchRecord) -> dict[str, Any]:
    return {
        "name": record.spec.name,
        "status": record.status,
        "experiment_path": record.spec.experiment_path(),
        "tracking_uri": record.uri,
        "experiment": record.spec.experiment_name,
        "experiment_id": record.experiment_id,
        "parent_run_id": record.parent_run_id,
        "last_logged": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.last_logged())),
        "browse": runs_page(record.uri, record.experiment_id),
    }


def as_json(record: SearchRecord, rows, report, champion) -> str:
    final = json.loads(final_report.format_report(report, "json")) if report else None
    document = {
        "search": _search_facts(record),
        "leaderboard": _ranked_rows(rows),
        "final": final,
        "champion": champion,
    }
    return json.dumps(_plain(document), indent=2, allow_nan=False)


def as_csv(record: SearchRecord, rows, report, champion) -> str:
    """One csv: a ``section`` column (leaderboard | final | champion) and the union of the
    sections' columns (knobs and per-seed scores as JSON text)."""
    records = [
        {"section": "leaderboard", **r, "params": json.dumps(r["params"])}
        for r in _ranked_rows(rows)
    ]
    for r in final_report.report_rows(report) if report else []:
        records.append(
            {
                "section": "final",
                **r,
                "test_top1_per_seed": json.dumps(r["test_top1_per_seed"]),
                "knobs": json.dumps(r["knobs"]),
            }
        )
    if champion:
        facts = {k: v for k, v in champion.items() if k != "registered"}
        records.append({"section": "champion", **facts})
    columns: list[str] = []
    for r in records:
        columns += [k for k in r if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(_plain(records))
    return out.getvalue()


def _markdown_leaderboard(rows: list[dict[str, Any]]) -> str:
    metric = next((r["metric"] for r in rows), "val_top1")
    extra = metric != "val_top1"
    header = ["rank", "trial", "epochs", "final top-1 (%)", "best top-1 (%)"]
    header += [metric] if extra else []
    header += ["knobs", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in _ranked_rows(rows):
        searched = row["rank"] is not None
        cells = [
            str(row["rank"]) if searched else "-",
            row["name"] if searched else f"[{row['name']}]",
            str(row["epochs"]),
            f"{row['val_top1']:.2f}",
            f"{row['best_val_top1']:.2f}",
            *([_short(row["metric_final"])] if extra else []),
            leaderboard.knobs_text(row["params"]),
            row["status"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _champion_lines(record: SearchRecord, champion) -> list[str]:
    if champion is None:
        when = "when it ends" if record.status == "running" else "once it has finished"
        return [f"champion: none registered yet (the search registers its best students {when})"]
    lines = []
    if champion["best_student"]:
        lines.append(f"best student: {champion['best_student']}")
    for pick in champion["registered"]:
        lines.append(
            f"registered {champion['registered_model']} v{pick['version']} "
            f"({leaderboard.registered_as(pick['trial'], [pick['run_name']])})"
        )
    moved = champion["alias_version"] not in (None, champion["version"])
    where = f"v{champion['version']}" + (
        f", run {champion['run_name']}" if champion["run_name"] else ""
    )
    lines.append(
        f"alias {champion['alias']!r} -> {champion['model_uri']} ({where})"
        + (
            f"; the alias now names v{champion['alias_version']}, set by another search"
            if moved
            else ""
        )
    )
    return lines


def as_text(record: SearchRecord, rows, report, champion, fmt: str) -> str:
    """The table or markdown report: the search, its leaderboard, the final stage, champion."""
    spec, status = record.spec, record.status
    ago = time.time() - record.last_logged()
    state = f"{status}, last logged {_duration(ago)} ago" if status == "running" else status
    gone = record.driver_gone() if status == "interrupted" else None
    state += f" ({gone}; continue with --resume)" if gone else ""
    markdown = fmt == "markdown"
    board = _markdown_leaderboard(rows) if markdown else leaderboard.format_leaderboard(rows)
    lines = [
        f"{'# ' if markdown else ''}Search {spec.name!r}: {state}",
        "",
        f"MLflow experiment {spec.experiment_name!r} (id {record.experiment_id}), parent run "
        f"{record.parent_run_id}; results in {spec.experiment_path()}",
        "",
        leaderboard_heading(spec),
        board,
    ]
    if report is not None:
        lines += ["", final_heading(spec), final_report.format_report(report, fmt)]
    elif spec.final:
        lines += ["", "Final stage: no final run has finished yet."]
    lines += ["", *_champion_lines(record, champion)]
    lines.append(f"browse every trial: {runs_page(record.uri, record.experiment_id)}")
    if markdown:
        lines = [f"- {line}" if _is_fact(line) else line for line in lines]
    return "\n".join(lines)


def _is_fact(line: str) -> bool:
    return line.startswith(("best student", "registered", "alias", "champion", "browse"))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render(record: SearchRecord, fmt: str = "table") -> str:
    """The whole report of ``record`` in ``fmt`` (one of :data:`FORMATS`)."""
    rows = leaderboard_rows(record)
    report = final_stage.report_from_mlflow(record.spec, record)
    champion = champion_of(record)
    if fmt == "json":
        return as_json(record, rows, report, champion)
    if fmt == "csv":
        return as_csv(record, rows, report, champion)
    return as_text(record, rows, report, champion, fmt)


# -- the command ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdd-search report",
        description="Print what a search found (running, interrupted or finished), read from "
        "MLflow; no Ray is started.",
    )
    parser.add_argument(
        "search",
        nargs="?",
        help="the search's spec YAML (as it ran, with the same --set) or its folder "
        "(<storage>/<name>); default: the embedded quickstart",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="the overrides the search ran with, e.g. --set search.num_trials=64",
    )
    parser.add_argument("--format", choices=FORMATS, default="table", help="default: table")
    parser.add_argument(
        "--figures",
        action="store_true",
        help="(re)draw the figures into <experiment path>/figures and the parent MLflow run",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a server that is down: fail
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    hide_mlflow_chatter()
    try:
        record = open_search(spec_of(args.search, args.overrides))
    except (SpecError, ReportError) as error:
        print(f"sdd-search: error: {error}", file=sys.stderr)
        return 2
    print(render(record, args.format))
    if args.figures:
        from sdd_search.figures import make_figures

        notes = sys.stderr if args.format in ("csv", "json") else sys.stdout  # keep one document
        made = make_figures(record.spec, record, log=lambda line: print(line, file=notes))
        for path in made:
            print(f"figure: {path}", file=notes)
    return 0
