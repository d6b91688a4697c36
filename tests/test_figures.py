"""The search's figures, from a real Optuna study on sqlite and a real MLflow store: PNG files
in the search's folder and artifacts of its parent run; a figure that cannot be made is a
one-line note, never an error."""

from __future__ import annotations

import struct
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from test_report import log_search

from sdd_search import figures
from sdd_search.tuning import optuna_storage_url

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def optuna_study(spec, trials: int):
    """The search's study where the search keeps it, with ``trials`` completed trials over
    the spec's knobs (named as in the spec, scale sets encoded as Tune's Optuna sees them)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=spec.name,
        storage=optuna_storage_url(spec),
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )

    def objective(trial):
        scales = trial.suggest_categorical("scales", ["1", "1,2"])
        temperature = trial.suggest_float("temperature", 1.0, 8.0)
        weight = trial.suggest_float("complementary_weight", 1.0, 4.0)
        return 90.0 - (temperature - 4.0) ** 2 + 2.0 * (scales == "1,2") + 0.5 * weight

    study.optimize(objective, n_trials=trials)
    return study


def test_figures_from_a_study_and_a_search_with_a_final_stage(tmp_path):
    logged = log_search(tmp_path, final=True)
    logged.finish(registered=[["f00", "1"]])
    spec = logged.spec
    optuna_study(spec, trials=6)
    notes: list[str] = []
    made = figures.make_figures(spec, logged.tracker, log=notes.append)
    assert notes == []
    folder = Path(spec.experiment_path()) / "figures"
    expected = [folder / f"{name}.png" for name in figures.FIGURES]
    assert [Path(p) for p in made] == expected
    for path in expected:
        width, height = png_size(path)
        assert width >= 500 and height >= 300, (path.name, width, height)
        assert path.stat().st_size > 15_000, path.name  # drawn, not an empty canvas
    client = MlflowClient(tracking_uri=logged.tracker.uri)
    logged_names = [
        Path(a.path).name for a in client.list_artifacts(logged.tracker.parent_run_id, "figures")
    ]
    assert sorted(logged_names) == sorted(p.name for p in expected)


def test_a_figure_that_cannot_be_made_is_a_note(tmp_path):
    logged = log_search(tmp_path)  # no final stage, no Optuna study on disk
    logged.finish()
    spec = logged.spec
    notes: list[str] = []
    made = figures.make_figures(spec, logged.tracker, log=notes.append)
    assert [Path(p).name for p in made] == ["learning_curves.png"]
    assert notes[0].startswith("figures from Optuna: skipped (no study at sqlite:///")
    assert not Path(spec.experiment_path(), "optuna.db").exists()  # none created
    assert notes[1:] == ["figure final_test_top1: skipped (the spec has no final stage)"]
    assert all("\n" not in note for note in notes)

    study = optuna_study(spec, trials=1)
    sources = figures.Sources(spec, study, [], None)
    with pytest.raises(figures.FigureSkipped, match="needs 2 or more completed trials"):
        figures.param_importances(sources)
