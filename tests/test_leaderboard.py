"""The CLI's leaderboard: searched trials ranked, references shown as yardsticks."""

from __future__ import annotations

from sdd_search.search import format_leaderboard


def _row(trial: str, role: str, top1: float, **params) -> dict:
    return {
        "trial": trial,
        "role": role,
        "params": params,
        "epochs": 8,
        "val_top1": top1,
        "best_val_top1": top1,
        "status": "done",
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
    assert [line.split()[:2] for line in lines] == [
        ["1", "aaa"],
        ["2", "bbb"],
        ["-", "[baseline]"],
        ["-", "[kd]"],
    ]
    assert "dkd_beta" not in lines[0] and "dkd_beta=2" in lines[1]  # kd does not use dkd_beta
    assert lines[2].endswith("(spec values)")
