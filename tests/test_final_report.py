"""The final report's statistics and wording (pure functions; the end-to-end check that they
equal a direct computation from MLflow runs is in test_search.py)."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from scipy import stats

from sdd_search.final_report import FinalEntry, format_report, summarise, t_interval


def entries() -> list[FinalEntry]:
    return [
        # Best on test, but second on selection: must not become the champion.
        FinalEntry("finalist-2", "finalist", {"temperature": 2.0}, "t2", 90.0, {0: 80.0, 1: 81.0}),
        FinalEntry("finalist-1", "finalist", {"temperature": 4.0}, "t1", 95.0, {0: 70.0, 1: 73.0}),
        FinalEntry("baseline", "baseline", {}, "", math.nan, {0: 60.0, 1: 61.5}),
        FinalEntry("kd", "kd", {}, "", math.nan, {0: 70.5, 1: 71.0}),
    ]


def test_mean_std_and_paired_difference_match_a_direct_computation():
    report = summarise(entries(), metric="val_top1", mode="max")
    second = report.summary("finalist-2")
    assert second.n == 2
    assert second.mean == pytest.approx(80.5)
    assert second.std == pytest.approx(np.std([80.0, 81.0], ddof=1))
    diffs = np.array([80.0 - 70.5, 81.0 - 71.0])
    half = stats.t.ppf(0.975, 1) * diffs.std(ddof=1) / math.sqrt(2)
    assert second.diff_mean == pytest.approx(diffs.mean())
    assert (second.diff_low, second.diff_high) == pytest.approx(
        (diffs.mean() - half, diffs.mean() + half)
    )
    assert report.summary("kd").diff_n == 0  # KD is the yardstick, not compared with itself


def test_champion_is_chosen_by_selection_never_by_test():
    assert summarise(entries(), metric="val_top1", mode="max").champion == "finalist-1"
    # mode min (e.g. val_loss): the lowest selection score wins.
    assert summarise(entries(), metric="val_loss", mode="min").champion == "finalist-2"


def test_overlapping_intervals_are_reported_as_not_separable():
    text = format_report(summarise(entries(), metric="val_top1", mode="max"))
    # finalist-1 - kd = [-0.5, 2.0]: its interval includes 0.
    assert "finalist-1: cannot be separated from plain KD" in text
    # finalist-2 - kd = [9.5, 10.0]: separable (above KD).
    assert "finalist-2: above plain KD by 9.75 points" in text
    assert "*champion*" in text and "never by test" in text


def test_single_seed_has_no_interval_and_says_so():
    one = [
        FinalEntry("finalist-1", "finalist", {}, "t1", 95.0, {0: 70.0}),
        FinalEntry("kd", "kd", {}, "", math.nan, {0: 71.0}),
    ]
    text = format_report(summarise(one, metric="val_top1", mode="max"))
    assert "cannot separate it from KD" in text
    assert "70.00 ± n/a (1)" in text
    assert "-1.00 (1 seed, no interval)" in text and "[n/a" not in text
    assert t_interval([1.0])[1] != t_interval([1.0])[1]  # NaN bound


def test_differences_with_no_spread_claim_nothing():
    """Two seeds, each one test image (0.28 points of 359) above KD (to float rounding): a
    zero-width interval, not a finding."""
    top1 = {n: 100 * n / 359 for n in (347, 348, 349)}  # as evaluate() computes them
    same = [
        FinalEntry("finalist-1", "finalist", {}, "t1", 95.0, {0: top1[349], 1: top1[348]}),
        FinalEntry("kd", "kd", {}, "", math.nan, {0: top1[348], 1: top1[347]}),
    ]
    report = summarise(same, metric="val_top1", mode="max")
    assert report.summary("finalist-1").separable_from_kd is None
    text = format_report(report)
    assert "above plain KD" not in text
    # The table's cell says so too (it showed the zero-width "+0.28 [0.28, 0.28]")
    assert "+0.28 (no spread, no interval)" in text and "[0.28, 0.28]" not in text
    assert (
        "finalist-1: each of its 2 seeds differs from plain KD by the same +0.28 points; with no "
        "spread there is no interval, so this run cannot separate it from KD" in text
    )


@pytest.mark.parametrize("fmt", ["table", "markdown", "csv", "json"])
def test_every_format_carries_the_same_numbers(fmt):
    report = summarise(entries(), metric="val_top1", mode="max", paper={"kd": 74.07})
    text = format_report(report, fmt)
    if fmt == "json":
        data = json.loads(text)
        assert data["champion"] == "finalist-1"
        means = {r["name"]: r["test_top1_mean"] for r in data["rows"]}
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        means = {r["name"]: float(r["test_top1_mean"]) for r in rows}
        assert rows[3]["paper_top1"] == "74.07"
    else:
        assert "74.07 (published)" in text
        means = {"finalist-2": 80.5 if "80.50 ± 0.71 (2)" in text else None}
        if fmt == "markdown":
            assert text.startswith("| entry |")
    assert means["finalist-2"] == pytest.approx(80.5)


def test_knobs_are_written_as_the_leaderboard_writes_them_and_references_are_explained():
    finalist = FinalEntry(
        "finalist-1",
        "finalist",
        {"temperature": 4.0, "dkd_beta": 8.0, "base": "kd", "scales": [1, 2]},
        "t1",
        95.0,
        {0: 70.0, 1: 73.0},
    )
    report = summarise([finalist, *entries()[2:]], metric="val_top1", mode="max")
    text = format_report(report)
    row = next(line for line in text.splitlines() if line.startswith("finalist-1"))
    # The leaderboard's order, and dkd_beta (a DKD knob) is not shown on a KD entry.
    assert row.endswith("scales=[1, 2], base=kd, temperature=4"), row
    assert "baseline = the student trained on labels alone" in text
    assert "kd = plain KD" in text and "paper = " not in text  # no paper entry here
