"""The final stage's report: test top-1 over seeds, paired differences to plain KD, the champion.

Pure Python + numpy/scipy, no Ray or MLflow: it takes what the final stage measured (one test
score per configuration and seed, each read once at the last epoch) and says what a researcher
may report. The champion is chosen by the search's selection metric (held-out training data),
never by a test number; test numbers are only summarised.

Statistics: the mean and the sample standard deviation (ddof=1) over seeds; for each entry, the
paired difference to plain KD (same seed against same seed) with a two-sided 95% Student-t
interval over the pairs. An interval that contains 0 means the run cannot separate the two.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdd_search.space import knobs_text

CONFIDENCE = 0.95
KD = "kd"  # the entry every other one is compared with, seed by seed
REFERENCE_ROLES = ("baseline", "kd", "paper")  # label-only, plain KD, the spec's own SDD point
FORMATS = ("table", "markdown", "csv", "json")


@dataclass
class FinalEntry:
    """One configuration of the final stage and its test top-1 (percent) per seed."""

    name: str  # "finalist-1" ... or a reference role
    role: str  # "finalist" | "baseline" | "kd" | "paper"
    knobs: dict[str, Any] = field(default_factory=dict)
    source_trial: str = ""  # the search trial it came from ("" for references)
    selection_score: float = math.nan  # that trial's search metric on the selection split
    test_top1: dict[int, float] = field(default_factory=dict)  # seed -> percent

    @property
    def seeds(self) -> list[int]:
        return sorted(self.test_top1)


@dataclass
class Summary:
    entry: FinalEntry
    n: int
    mean: float
    std: float  # sample standard deviation over seeds; NaN for n < 2
    diff_mean: float = math.nan  # paired difference to plain KD, percentage points
    diff_low: float = math.nan  # its 95% interval
    diff_high: float = math.nan
    diff_n: int = 0
    paper_top1: float | None = None  # the paper's published number, where pair and recipe match

    @property
    def no_spread(self) -> bool:
        """Every paired seed differs from plain KD by the same amount (a small test split moves
        in steps of one image): the t-interval has zero width and says nothing."""
        return self.diff_n >= 2 and math.isclose(self.diff_low, self.diff_high, abs_tol=1e-9)

    @property
    def separable_from_kd(self) -> bool | None:
        """True/False when the interval excludes/includes 0; None without an interval (fewer
        than 2 paired seeds, or differences with no spread)."""
        if self.diff_n < 2 or math.isnan(self.diff_low) or self.no_spread:
            return None
        return not (self.diff_low <= 0.0 <= self.diff_high)


@dataclass
class FinalReport:
    summaries: list[Summary]
    champion: str | None  # entry name, chosen by selection score
    metric: str  # the search metric the champion was chosen by
    mode: str

    def summary(self, name: str) -> Summary:
        return next(s for s in self.summaries if s.entry.name == name)


def t_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high) of a two-sided Student-t interval; NaN bounds for fewer than 2 values."""
    from scipy import stats

    array = np.asarray(values, dtype=float)
    mean = float(array.mean()) if len(array) else math.nan
    if len(array) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(array) - 1)) * float(
        array.std(ddof=1) / math.sqrt(len(array))
    )
    return mean, mean - half, mean + half


def choose_champion(entries: list[FinalEntry], mode: str) -> str | None:
    """The finalist whose search trial scored best on the selection split (never by test)."""
    finalists = [e for e in entries if e.role == "finalist" and not math.isnan(e.selection_score)]
    if not finalists:
        return None
    sign = -1.0 if mode == "max" else 1.0
    return min(finalists, key=lambda e: sign * e.selection_score).name


def summarise(
    entries: list[FinalEntry],
    *,
    metric: str,
    mode: str,
    paper: dict[str, float] | None = None,
) -> FinalReport:
    """Mean +- std per entry, the paired difference to plain KD, and the champion."""
    paper = paper or {}
    kd = next((e for e in entries if e.role == KD), None)
    summaries = []
    for entry in entries:
        scores = [entry.test_top1[s] for s in entry.seeds]
        summary = Summary(
            entry=entry,
            n=len(scores),
            mean=float(np.mean(scores)) if scores else math.nan,
            std=float(np.std(scores, ddof=1)) if len(scores) > 1 else math.nan,
            paper_top1=paper.get(entry.name),
        )
        if kd is not None and entry is not kd:
            shared = [s for s in entry.seeds if s in kd.test_top1]
            diffs = [entry.test_top1[s] - kd.test_top1[s] for s in shared]
            summary.diff_mean, summary.diff_low, summary.diff_high = t_interval(diffs)
            summary.diff_n = len(diffs)
        summaries.append(summary)
    return FinalReport(summaries, choose_champion(entries, mode), metric, mode)


# -- presentation -------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


REFERENCE_LEGEND = {
    "baseline": "the student trained on labels alone",
    "kd": "plain KD (global logits only, the spec's temperature)",
    "paper": "SDD at the spec's own distill: point, unsearched",
}


def _notes(report: FinalReport, names: list[str]) -> list[str]:
    """Below the table: what the numbers are, what the references are, a verdict per entry."""
    lines = [
        "test top-1: the dataset's test split, read once per run at its last epoch; "
        "std over seeds (ddof=1); the champion is chosen by "
        f"{report.mode} {report.metric} on the selection split, never by test."
    ]
    legend = [f"{name} = {REFERENCE_LEGEND[name]}" for name in names if name in REFERENCE_LEGEND]
    if legend:
        lines.append("; ".join(legend) + ".")
    return lines + verdicts(report)


def _knobs(knobs: dict[str, Any]) -> str:
    """As the leaderboard writes them: the knob table's order, a knob of another base loss
    than the entry's (dkd_beta on a kd entry) left out; "" when none was searched."""
    return knobs_text(knobs) if knobs else ""


def report_rows(report: FinalReport) -> list[dict[str, Any]]:
    """One plain dict per entry: what the csv/json formats write and the table shows."""
    rows = []
    for s in report.summaries:
        rows.append(
            {
                "name": s.entry.name,
                "role": s.entry.role,
                "champion": s.entry.name == report.champion,
                "source_trial": s.entry.source_trial,
                f"selection_{report.metric}": s.entry.selection_score,
                "seeds": s.n,
                "test_top1_mean": s.mean,
                "test_top1_std": s.std,
                "diff_vs_kd_mean": s.diff_mean,
                "diff_vs_kd_low95": s.diff_low,
                "diff_vs_kd_high95": s.diff_high,
                "paper_top1": s.paper_top1,
                "test_top1_per_seed": {str(k): v for k, v in sorted(s.entry.test_top1.items())},
                "knobs": s.entry.knobs,
            }
        )
    return rows


def verdicts(report: FinalReport) -> list[str]:
    """Plain sentences: which differences to plain KD this run can and cannot separate."""
    lines = []
    for s in report.summaries:
        if s.entry.role == KD:
            continue
        separable = s.separable_from_kd
        if s.no_spread:
            lines.append(
                f"{s.entry.name}: each of its {s.diff_n} seeds differs from plain KD by the same "
                f"{s.diff_mean:+.2f} points; with no spread there is no interval, so this run "
                "cannot separate it from KD (more seeds, or a larger test split)"
            )
        elif separable is None:
            lines.append(
                f"{s.entry.name}: fewer than 2 paired seeds with plain KD; no interval, "
                "so this run cannot separate it from KD"
            )
        elif separable:
            side = "above" if s.diff_mean > 0 else "below"
            lines.append(
                f"{s.entry.name}: {side} plain KD by {_fmt(abs(s.diff_mean))} points "
                f"(95% interval {_fmt(s.diff_low)} to {_fmt(s.diff_high)}, {s.diff_n} seeds)"
            )
        else:
            lines.append(
                f"{s.entry.name}: cannot be separated from plain KD by this run (95% interval "
                f"of the paired difference {_fmt(s.diff_low)} to {_fmt(s.diff_high)} includes 0, "
                f"{s.diff_n} seeds)"
            )
    return lines


def _difference(s: Summary) -> str:
    """The table's paired difference to plain KD: its mean and 95% interval, or why there is no
    interval (one paired seed; every seed the same difference, a zero-width interval)."""
    if math.isnan(s.diff_mean):
        return "n/a"
    if s.no_spread:
        return f"{s.diff_mean:+.2f} (no spread, no interval)"
    if s.diff_n < 2 or math.isnan(s.diff_low):
        return f"{s.diff_mean:+.2f} ({s.diff_n} seed, no interval)"
    return f"{s.diff_mean:+.2f} [{_fmt(s.diff_low)}, {_fmt(s.diff_high)}]"


def format_report(report: FinalReport, fmt: str = "table") -> str:
    """The report as an aligned text table, a markdown table, csv or json."""
    rows = report_rows(report)
    if fmt == "json":
        return json.dumps(
            {
                "champion": report.champion,
                "chosen_by": f"{report.mode} {report.metric} on the selection split",
                "rows": rows,
                "verdicts": verdicts(report),
            },
            indent=2,
            default=lambda v: None,
        )
    if fmt == "csv":
        import csv
        import io

        out = io.StringIO()
        flat = [
            {
                **r,
                "test_top1_per_seed": json.dumps(r["test_top1_per_seed"]),
                "knobs": _knobs(r["knobs"]),
            }
            for r in rows
        ]
        writer = csv.DictWriter(out, fieldnames=list(flat[0]) if flat else ["name"])
        writer.writeheader()
        writer.writerows(flat)
        return out.getvalue()
    header = [
        "entry",
        f"selection {report.metric}",
        "test top-1 mean ± std (n)",
        "vs plain KD: mean [95% CI]",
        "published",
        "knobs",
    ]
    body = []
    for r, s in zip(rows, report.summaries, strict=True):
        name = r["name"] + (" *champion*" if r["champion"] else "")
        body.append(
            [
                name,
                _fmt(r[f"selection_{report.metric}"]),
                f"{_fmt(s.mean)} ± {_fmt(s.std)} ({s.n})",
                "(reference)" if r["role"] == KD else _difference(s),
                "n/a" if s.paper_top1 is None else f"{s.paper_top1:.2f} (published)",
                _knobs(r["knobs"]) or "(spec values)",
            ]
        )
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
    elif fmt == "table":
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
        lines.append("-" * len(lines[0]))
        lines += [
            "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
            for cells in body
        ]
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    lines += ["", *_notes(report, [r["name"] for r in rows])]
    return "\n".join(lines)
