"""The leaderboard: one row per trial, ranked by the spec's metric and mode.

Rows are plain dicts built from Tune's results (or, by ``sdd-search report``, from the
search's MLflow runs: the same fields); ranking, the students registration takes and
the printed table are pure functions of them (no Ray import), so they are tested without a
cluster. A row::

    trial         Tune's trial id
    name          the trial's one name (Tune, MLflow, here): trial-<id>, baseline, kd
    role          "search" or the reference's name
    status        done | error | nan (a non-finite loss stopped it); from MLflow also running
    epochs        epochs trained
    val_top1      last epoch's validation top-1 (percent); best_val_top1 the best epoch's
    metric        the spec's search.metric; metric_final its last value, metric_best its best
                  by search.mode
    params        the searched knobs (decoded)
    checkpoint    the last checkpoint's path (the student registration loads)
"""

from __future__ import annotations

import json
import math
from typing import Any

from sdd_search.space import (
    REFERENCE_NAMES,
    SEARCH_ROLE,
    knobs_text,
    role_of,
    searched_params,
    trial_display_name,
)
from sdd_search.tracking import TAG_REASON, TAG_ROLE, TAG_STATUS, TAG_TRIAL

NAN = float("nan")


def result_rows(results, metric: str, mode: str) -> list[dict[str, Any]]:
    """Rows of Tune ``results`` (a ResultGrid, or any iterable of ray.tune.Result), in their
    order; ``metric``/``mode``: the spec's search.metric and search.mode ("max" or "min")."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        config = result.config or {}
        frame = result.metrics_dataframe
        trial_id = metrics.get("trial_id", "")
        rows.append(
            {
                "trial": trial_id,
                "name": trial_display_name(config, trial_id),
                "role": role_of(config),
                "status": "error"
                if result.error
                else ("nan" if metrics.get("nonfinite_loss") else "done"),
                "epochs": int(frame["epoch"].max())
                if frame is not None and "epoch" in frame and frame["epoch"].notna().any()
                else 0,
                "val_top1": float(metrics.get("val_top1", NAN)),
                "best_val_top1": _best(frame, "val_top1", "max"),
                "metric": metric,
                "metric_final": float(metrics.get(metric, NAN)),
                "metric_best": _best(frame, metric, mode),
                "params": searched_params(config),
                "checkpoint": metrics.get("checkpoint_path"),
            }
        )
    return rows


SCHEDULER_STOP = "early-stopped by the scheduler"  # how the MLflow callback words an ASHA stop


def rows_from_mlflow(runs, metric: str, mode: str, history) -> list[dict[str, Any]]:
    """Rows of a search's MLflow trial runs (its ``trial`` and ``reference`` children), as
    :func:`result_rows` builds them from Tune: what ``sdd-search report`` prints. Searched
    trials in the order they started, then the references (baseline, kd); ``checkpoint`` is
    None (MLflow does not hold Tune's checkpoint paths).

    ``history(run_id, key)``: that run's logged values of ``key`` (objects with ``step`` and
    ``value``), e.g. ``MlflowClient.get_metric_history``. A trial still training has status
    ``running``.
    """
    searched = sorted(
        (r for r in runs if r.data.tags.get(TAG_ROLE) == "trial"),
        key=lambda r: r.info.start_time or 0,
    )
    references = sorted(
        (r for r in runs if r.data.tags.get(TAG_ROLE) == "reference"),
        key=lambda r: _reference_order(r.info.run_name),
    )
    return [_mlflow_row(run, metric, mode, history) for run in searched + references]


def _reference_order(name: str) -> int:
    """Tune's order of the references (its grid over REFERENCE_NAMES)."""
    return REFERENCE_NAMES.index(name) if name in REFERENCE_NAMES else len(REFERENCE_NAMES)


def _mlflow_row(run, metric: str, mode: str, history) -> dict[str, Any]:
    tags, latest = run.data.tags, run.data.metrics
    curves = {key: history(run.info.run_id, key) for key in {"val_top1", metric}}
    status = _mlflow_status(run)
    diverged = status == "nan"  # Tune's last result then holds NaN, not an epoch's value
    return {
        "trial": tags.get(TAG_TRIAL, ""),
        "name": run.info.run_name,
        "role": SEARCH_ROLE if tags.get(TAG_ROLE) == "trial" else run.info.run_name,
        "status": status,
        "epochs": max((int(m.step) for m in curves["val_top1"]), default=0),
        "val_top1": NAN if diverged else float(latest.get("val_top1", NAN)),
        "best_val_top1": _best_logged(curves["val_top1"], "max"),
        "metric": metric,
        "metric_final": NAN if diverged else float(latest.get(metric, NAN)),
        "metric_best": _best_logged(curves[metric], mode),
        "params": {
            k.removeprefix("knob."): _decode_param(v)
            for k, v in run.data.params.items()
            if k.startswith("knob.")
        },
        "checkpoint": None,
    }


def _mlflow_status(run) -> str:
    """result_rows' status of a trial from its MLflow run: done | error | nan | running."""
    tagged = run.data.tags.get(TAG_STATUS, "")
    reason = run.data.tags.get(TAG_REASON, "")
    if run.info.status == "FAILED" or tagged == "failed":
        return "error"
    if tagged == "stopped" and not reason.startswith(SCHEDULER_STOP):
        return "nan"  # a non-finite loss ended it (the callback's reason is the loss error)
    if tagged in ("completed", "stopped"):
        return "done"
    return "running"


def _best_logged(values, mode: str) -> float:
    numbers = [float(m.value) for m in values if not math.isnan(float(m.value))]
    if not numbers:
        return NAN
    return max(numbers) if mode == "max" else min(numbers)


def _decode_param(text: str) -> Any:
    """A knob as MLflow holds it (str() of a scalar, JSON of a list) back to its value."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def _best(frame, column: str, mode: str) -> float:
    """The best value of ``column`` over a trial's results (a pandas frame), NaN without one."""
    if frame is None or column not in frame:
        return NAN
    value = frame[column].max() if mode == "max" else frame[column].min()
    return float(value)


def ranked(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """``rows`` best first by their final metric value (``mode``: "max" or "min"); rows
    without a value (NaN) last, in their order."""

    def key(row: dict[str, Any]) -> float:
        value = row["metric_final"]
        if math.isnan(value):
            return math.inf
        return -value if mode == "max" else value

    return sorted(rows, key=key)


def registration_candidates(ranked_rows: list[dict[str, Any]], top_k: int) -> list[dict]:
    """The students to register, best first: the first ``top_k`` of ``ranked_rows`` (from
    :func:`ranked`) that finished with a checkpoint and a value of the metric."""
    candidates = [
        row
        for row in ranked_rows
        if row["checkpoint"] and row["status"] == "done" and not math.isnan(row["metric_final"])
    ]
    return candidates[:top_k]


def format_leaderboard(rows: list[dict[str, Any]]) -> str:
    """The table the CLI prints: searched trials ranked in ``rows``' order, references after
    them as unranked yardsticks (``[baseline]``, ``[kd]``), each with the knobs it used.
    When the spec's metric is not val_top1, a column shows its final value too."""
    metric = next((row.get("metric") for row in rows), None) or "val_top1"
    extra = metric != "val_top1"
    header = (
        f"{'rank':>4}  {'trial':<18} {'epochs':>6} {'final top-1':>11} {'best top-1':>10}"
        + (f" {metric:>12}" if extra else "")
        + "  knobs"
    )
    lines = [header, "-" * len(header)]
    rank = 0
    for row in rows:
        searched = row["role"] == SEARCH_ROLE
        rank += searched
        knobs = knobs_text(row["params"])
        name = row["name"] if searched else f"[{row['name']}]"
        place = str(rank) if searched else "-"  # references are yardsticks, not ranked
        value = f" {_short(row['metric_final']):>12}" if extra else ""
        lines.append(
            f"{place:>4}  {name:<18} {row['epochs']:>6} {row['val_top1']:>10.2f}% "
            f"{row['best_val_top1']:>9.2f}%{value}  "
            f"{knobs}{'' if row['status'] == 'done' else '  (' + row['status'] + ')'}"
        )
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def csv_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` for the leaderboard.csv artifact: the knobs as one text column."""
    return [
        {k: v for k, v in r.items() if k != "params"} | {"params": str(r["params"])} for r in rows
    ]


def registered_as(trial_id: str, name: list[str]) -> str:
    """``run finalist-1-seed0``: the MLflow run as every table names it (``trial <Tune id>``
    for a search registered before run names were kept)."""
    return f"run {name[0]}" if name and name[0] else f"trial {trial_id}"
