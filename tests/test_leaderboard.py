"""The CLI's leaderboard: searched trials ranked, references shown as yardsticks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd

from sdd_search.leaderboard import (
    format_leaderboard,
    ranked,
    registration_candidates,
    result_rows,
)
from sdd_search.space import ROLE_KEY, TRIAL_KEY, trial_display_name


def _row(trial: str, role: str, top1: float, **params) -> dict:
    return {
        "trial": trial,
        "name": trial_display_name({ROLE_KEY: role}, trial),
        "role": role,
        "params": params,
        "epochs": 8,
        "val_top1": top1,
        "best_val_top1": top1,
        "metric": "val_top1",
        "metric_final": top1,
        "metric_best": top1,
        "status": "done",
        "checkpoint": f"/runs/{trial}",
    }


def test_references_are_listed_unranked_with_only_the_knobs_a_trial_used():
    text = format_leaderboard(
        [
            _row("aaa", "search", 97.5, base="kd", dkd_beta=8.0, temperature=4.0),
            _row("bbb", "search", 96.0, base="dkd", dkd_beta=2.0),
            _row("x", "baseline", 97.0),
            _row("y", "kd", 98.0),
        ]
    )
    lines = text.splitlines()[2:]
    # A searched trial shows the name Tune and MLflow give it (trial-<id>), a reference its own.
    assert [line.split()[:2] for line in lines] == [
        ["1", "trial-aaa"],
        ["2", "trial-bbb"],
        ["-", "[baseline]"],
        ["-", "[kd]"],
    ]
    assert "dkd_beta" not in lines[0] and "dkd_beta=2" in lines[1]  # kd does not use dkd_beta
    assert lines[2].endswith("(spec values)")


def _result(trial_id: str, role: str, val_loss: list[float], val_top1: list[float], **knobs):
    """A Tune Result as leaderboard.result_rows reads it (metrics, config, history, error)."""
    frame = pd.DataFrame(
        {"epoch": range(1, len(val_loss) + 1), "val_loss": val_loss, "val_top1": val_top1}
    )
    return SimpleNamespace(
        metrics={
            "trial_id": trial_id,
            "val_loss": val_loss[-1],
            "val_top1": val_top1[-1],
            "checkpoint_path": f"/runs/{trial_id}",
        },
        config={TRIAL_KEY: {}, ROLE_KEY: role, **knobs},
        metrics_dataframe=frame,
        error=None,
    )


def test_a_min_metric_ranks_and_registers_the_lowest_first():
    # The spec searches val_loss, mode min: the lowest loss is the best student, whatever its
    # top-1 (here the student with the best loss has the worst top-1).
    results = [
        _result("worst", "search", [2.0, 1.5], [70.0, 80.0], temperature=2.0),
        _result("best", "search", [1.0, 0.5, 0.4], [50.0, 55.0, 60.0], temperature=4.0),
        _result("middle", "search", [1.2, 0.9], [60.0, 65.0], temperature=8.0),
        _result("diverged", "search", [math.nan], [math.nan], temperature=1.0),
    ]
    rows = ranked(result_rows(results, "val_loss", "min"), "min")
    assert [row["trial"] for row in rows] == ["best", "middle", "worst", "diverged"]
    best = rows[0]
    assert best["metric"] == "val_loss" and best["metric_final"] == 0.4
    assert best["metric_best"] == 0.4 and best["best_val_top1"] == 60.0
    assert rows[2]["metric_best"] == 1.5  # the lowest loss of that trial, not the highest
    # Registration takes the top by the same metric: "best" becomes the champion.
    assert [row["trial"] for row in registration_candidates(rows, top_k=2)] == ["best", "middle"]
    assert "diverged" not in [r["trial"] for r in registration_candidates(rows, top_k=9)]
    # The printed table is in that order and shows the metric it ranks by.
    lines = format_leaderboard(rows).splitlines()
    assert "val_loss" in lines[0]
    assert [line.split()[1] for line in lines[2:]] == [
        "trial-best",
        "trial-middle",
        "trial-worst",
        "trial-diverged",
    ]
    # A max metric ranks the other way round.
    by_top1 = ranked(result_rows(results, "val_top1", "max"), "max")
    assert [row["trial"] for row in by_top1] == ["worst", "middle", "best", "diverged"]
    assert "val_loss" not in format_leaderboard(by_top1).splitlines()[0]


def test_one_name_per_trial_in_tune_mlflow_and_the_leaderboard():
    from sdd_search.config import TrialConfig
    from sdd_search.mlflow_callback import MlflowTrialCallback
    from sdd_search.tuning import _trial_name

    class Tracker:  # records the run names the callback asks MLflow for
        def __init__(self):
            self.names: dict[str, str] = {}

        def trial_run(self, trial_id, name, role, params, tags=None):
            self.names[trial_id] = name
            return f"run-{trial_id}"

    base = TrialConfig().model_dump(mode="json")
    callback = MlflowTrialCallback("sqlite:///unused.db", "e", "/search")
    callback._tracker = tracker = Tracker()
    for trial_id, role in (("abc_00000", "baseline"), ("abc_00001", "kd"), ("1f2e3d4c", "search")):
        config = {TRIAL_KEY: base, ROLE_KEY: role}
        trial = SimpleNamespace(trial_id=trial_id, config=config)
        callback._run(trial)
        (row,) = result_rows([_result(trial_id, role, [1.0], [50.0])], "val_top1", "max")
        names = {_trial_name(trial), tracker.names[trial_id], row["name"]}
        assert names == {"trial-1f2e3d4c" if role == "search" else role}, names
