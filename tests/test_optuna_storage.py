"""The search's Optuna study on disk (an RDB storage), as optuna-dashboard and Optuna's own
tools open it, and what a resume does to it. Real Optuna studies in sqlite files; the searcher
is driven through the calls Ray Tune makes (suggest, results, save, restore), no cluster."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from sdd_search import tuning
from sdd_search.search import SearchError, run_search
from sdd_search.spec import SpecError, load_spec
from sdd_search.tracking import sqlite_file


def study_of(spec) -> optuna.Study:
    """The study as optuna-dashboard loads it: by name, from the storage URL."""
    return optuna.load_study(study_name=spec.name, storage=tuning.optuna_storage_url(spec))


def by_tune_id(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    return {t.user_attrs["tune_trial_id"]: t for t in study.get_trials()}


def test_the_storage_url_defaults_to_the_searchs_folder(write_spec, tmp_path, monkeypatch):
    spec = load_spec(write_spec())
    assert tuning.optuna_storage_url(spec) == f"sqlite:///{tmp_path}/runs/tiny/optuna.db"
    given = load_spec(write_spec({"search": {"optuna_storage": "postgresql://me@db/optuna"}}))
    assert tuning.optuna_storage_url(given) == "postgresql://me@db/optuna"
    monkeypatch.chdir(tmp_path)  # a remote search keeps its study where the command runs
    remote = load_spec(write_spec({"storage": "s3://bucket/searches"}))
    assert tuning.optuna_storage_url(remote) == f"sqlite:///{tmp_path}/tiny-optuna.db"


def test_a_storage_that_is_not_a_url_is_a_spec_error(write_spec):
    with pytest.raises(SpecError) as error:
        load_spec(write_spec({"search": {"optuna_storage": "optuna.db"}}))
    message = str(error.value)
    assert "spec.yaml: search.optuna_storage: expected a SQLAlchemy URL" in message
    assert "\n" not in message


def test_the_study_survives_a_resume(write_spec):
    """Trials land in the study as Tune reports them; a searcher saved, then restored (as
    Tune resumes a search) keeps writing to the same study, drops what it replays, and fails
    the trial it asked for after its last save."""
    spec = load_spec(write_spec())
    searcher = tuning._searcher(spec)
    first = searcher.suggest("aaaa0001")  # the spec's own point, queued first
    searcher.suggest("bbbb0002")
    assert first["temperature"] == spec.distill.temperature
    searcher.on_trial_result("aaaa0001", {"val_top1": 50.0, "epoch": 1, "training_iteration": 1})
    state = spec.experiment_path() + "/searcher.pkl"
    searcher.save(state)  # Tune's checkpoint of the searcher
    searcher.suggest("cccc0003")  # asked, then the driver dies before the next save
    searcher.on_trial_complete("aaaa0001", {"val_top1": 60.0, "epoch": 2})  # told, then dies

    trials = by_tune_id(study_of(spec))
    assert trials["aaaa0001"].state == TrialState.COMPLETE and trials["aaaa0001"].value == 60.0
    assert trials["bbbb0002"].state == TrialState.RUNNING
    assert study_of(spec).user_attrs["metric"] == "val_top1"

    resumed = tuning._searcher(spec)  # what a resumed search builds; Tune then restores it
    assert not study_of(spec).get_trials(states=(TrialState.WAITING,)), "point queued twice"
    resumed.restore(state)
    assert by_tune_id(study_of(spec))["cccc0003"].state == TrialState.FAIL
    # Tune replays the finished trial from its checkpoint; nothing changes, nothing raises.
    resumed.on_trial_result("aaaa0001", {"val_top1": 50.0, "epoch": 1, "replayed": 1.0})
    resumed.on_trial_result("aaaa0001", {"val_top1": 60.0, "epoch": 2, "training_iteration": 3})
    resumed.on_trial_complete("aaaa0001", {"val_top1": 60.0, "epoch": 2})
    resumed.on_trial_result("bbbb0002", {"val_top1": 40.0, "epoch": 1, "training_iteration": 1})
    resumed.on_trial_complete("bbbb0002", {"val_top1": 45.0, "epoch": 2})
    resumed.suggest("dddd0004")

    trials = by_tune_id(study_of(spec))
    assert {k: (t.state, t.value) for k, t in trials.items()} == {
        "aaaa0001": (TrialState.COMPLETE, 60.0),
        "bbbb0002": (TrialState.COMPLETE, 45.0),
        "cccc0003": (TrialState.FAIL, None),
        "dddd0004": (TrialState.RUNNING, None),
    }
    assert trials["aaaa0001"].intermediate_values == {1: 50.0}
    assert trials["bbbb0002"].intermediate_values == {1: 40.0}
    assert trials["bbbb0002"].user_attrs["epochs"] == 2
    assert set(trials["dddd0004"].params) == set(spec.space)


def test_a_new_search_never_joins_an_old_study(write_spec):
    spec = load_spec(write_spec({"search": {"optuna_storage": None}}))
    url = tuning.optuna_storage_url(spec)
    sqlite_file(url).parent.mkdir(parents=True)
    optuna.create_study(study_name=spec.name, storage=url)
    with pytest.raises(SearchError, match="an Optuna study 'tiny' already exists in sqlite:///"):
        run_search(spec, log=lambda *_: None)


def test_an_unreachable_storage_is_an_error_before_anything_starts(write_spec):
    spec = load_spec(write_spec({"search": {"optuna_storage": "mysql://nobody@127.0.0.1:1/x"}}))
    with pytest.raises(SearchError, match="cannot open the Optuna storage mysql://"):
        run_search(spec, log=lambda *_: None)
