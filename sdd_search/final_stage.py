"""The final stage: retrain the search's best configurations and the references over seeds at
the full recipe on all the training data, score each once on the test split, report.

    search rows (selection split) --finalists()--> entries (configuration x seed)
        --tuning.final_experiment--> Ray Tune + Ray Train runs (MLflow runs tagged role=final)
        --report_from_mlflow()--> FinalReport (sdd_search.final_report) --> printed, logged

Only the search's selection metric chooses (which configurations go on, which one is the
champion); test numbers are read from the final runs and only summarised. The report is
built from the MLflow runs themselves, so ``sdd-search report`` and a resumed search print
the same numbers the search did.
"""

from __future__ import annotations

import json
import math
from typing import Any

from sdd_search import final_report, paper, tuning
from sdd_search.final_report import FinalEntry, FinalReport
from sdd_search.space import FINAL_KEY, PAPER, REFERENCE_NAMES, final_entries, full_recipe_params
from sdd_search.spec import Spec
from sdd_search.tracking import (
    TAG_FINAL_ENTRY,
    TAG_FINAL_ROLE,
    TAG_ROLE,
    TAG_SEED,
    TAG_SELECTION_SCORE,
    TAG_SOURCE_TRIAL,
    SearchTracker,
)

REPORT_FORMATS = {"table": "txt", "markdown": "md", "csv": "csv", "json": "json"}


def seeds(spec: Spec) -> list[int]:
    """The seeds every final configuration trains with: train.seed, train.seed + 1, ..."""
    return [spec.train.seed + offset for offset in range(spec.final.seeds)]


def finalists(spec: Spec, ranked_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The search's best ``final.top_k`` distinct configurations by the selection metric.

    ``ranked_rows``: the searched trials best first (:func:`sdd_search.leaderboard.ranked`).
    Trials that trained the whole search schedule come first (a value from an early-stopped
    trial is from an earlier epoch, not comparable); knobs are mapped to the full recipe.
    """
    search_epochs = spec.search_trial.train.epochs
    usable = [
        row
        for row in ranked_rows
        if row["status"] == "done" and not math.isnan(row["metric_final"])
    ]
    ordered = [r for r in usable if r["epochs"] >= search_epochs] + [
        r for r in usable if r["epochs"] < search_epochs
    ]
    chosen, seen = [], set()
    for row in ordered:
        key = json.dumps(row["params"], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        chosen.append(
            {
                "trial": row["trial"],
                "selection_score": row["metric_final"],
                "params": full_recipe_params(row["params"], search_epochs, spec.train.epochs),
            }
        )
    return chosen[: spec.final.top_k]


def fit(spec: Spec, trainable, callback, resume: bool, ranked_rows: list[dict]):
    """Run (or resume) the final stage's Tune experiment; its ResultGrid."""
    entries = final_entries(finalists(spec, ranked_rows), spec.final.references, seeds(spec))
    experiment = tuning.final_experiment(spec, entries)
    results = tuning.fit("final", spec, trainable, experiment, callback, resume)
    tuning.require_complete("final", results, len(entries), callback)
    return results


def result_checkpoints(results) -> dict[tuple[str, int], tuple[str, str | None]]:
    """(entry, seed) -> (Tune trial id, last checkpoint path) of the final stage's results."""
    out = {}
    for result in results:
        entry = (result.config or {}).get(FINAL_KEY)
        metrics = result.metrics or {}
        if entry is not None and not result.error:
            out[(entry["entry"], int(entry["seed"]))] = (
                metrics.get("trial_id", ""),
                metrics.get("checkpoint_path"),
            )
    return out


# -- the report, from MLflow ----------------------------------------------------------------


def _order(name: str) -> tuple[int, int]:
    if name.startswith("finalist-"):
        return (0, int(name.removeprefix("finalist-")))
    references = (*REFERENCE_NAMES, PAPER)
    return (1, references.index(name) if name in references else len(references))


def _knob(value: str) -> Any:
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def final_runs(tracker: SearchTracker) -> list:
    """The final stage's MLflow runs of this search (children of its parent run)."""
    return tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}' "
        f"and tags.`{TAG_ROLE}` = 'final'",
        max_results=5000,
    )


def entries_from_runs(runs) -> list[FinalEntry]:
    """One FinalEntry per configuration, with the test top-1 of every run that finished."""
    entries: dict[str, FinalEntry] = {}
    for run in runs:
        tags = run.data.tags
        name = tags[TAG_FINAL_ENTRY]
        score = tags.get(TAG_SELECTION_SCORE) or "nan"
        entry = entries.setdefault(
            name,
            FinalEntry(
                name=name,
                role=tags.get(TAG_FINAL_ROLE, name),
                knobs={
                    k.removeprefix("knob."): _knob(v)
                    for k, v in run.data.params.items()
                    if k.startswith("knob.")
                },
                source_trial=tags.get(TAG_SOURCE_TRIAL, ""),
                selection_score=float(score),
            ),
        )
        test = run.data.metrics.get("test_top1")
        if run.info.status == "FINISHED" and test is not None:
            entry.test_top1[int(tags[TAG_SEED])] = float(test)
    return [entries[name] for name in sorted(entries, key=_order)]


def report_from_mlflow(spec: Spec, tracker: SearchTracker) -> FinalReport | None:
    """The final report of this search from its MLflow runs; None before any final run."""
    entries = entries_from_runs(final_runs(tracker))
    if not entries:
        return None
    return final_report.summarise(
        entries,
        metric=spec.search.metric,
        mode=spec.search.mode,
        paper=paper.published_numbers(spec),
    )


def log_report(tracker: SearchTracker, report: FinalReport) -> None:
    """The report as parent-run artifacts (final_report.txt/.md/.csv/.json) and metrics."""
    run_id = tracker.parent_run_id
    for fmt, suffix in REPORT_FORMATS.items():
        tracker.client.log_text(
            run_id, final_report.format_report(report, fmt), f"final_report.{suffix}"
        )
    for summary in report.summaries:
        names = [summary.entry.name]
        if summary.entry.name == report.champion:
            names.append("champion")
        for name in names:
            for key, value in (
                ("test_top1_mean", summary.mean),
                ("test_top1_std", summary.std),
                ("seeds", float(summary.n)),
                ("diff_vs_kd_mean", summary.diff_mean),
            ):
                if not math.isnan(value):
                    tracker.client.log_metric(run_id, f"final/{name}_{key}", value)
