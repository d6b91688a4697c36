"""The search's Optuna study on disk: Ray Tune's OptunaSearch writing to an RDB storage.

Tune's OptunaSearch keeps its study in memory by default, pickled into Tune's searcher state,
where optuna-dashboard and Optuna's analysis tools cannot open it. Given an RDB storage (a
SQLAlchemy URL: :func:`sdd_search.tuning.optuna_storage_url`), every trial Tune runs is a
trial of a study named after the search, with its knobs, one intermediate value per reported
epoch and its final value::

    optuna-dashboard sqlite:///<storage>/<name>/optuna.db

A resumed search unpickles the searcher, whose study reconnects to the same URL (Optuna's
RDBStorage pickles its URL, not its connection): the resumed trials land in the same study.
"""

from __future__ import annotations

import contextlib
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from sdd_search import ray_compat


class StudySearch(OptunaSearch):
    """OptunaSearch whose study lives in the RDB storage at ``storage_url`` as ``study_name``
    (created, or loaded if it exists, as the searcher is built).

    Each Optuna trial carries its Tune trial id (user attribute ``tune_trial_id``: the
    leaderboard's and MLflow's ``trial-<id>``) and, once it ends, the epochs it trained
    (``epochs``). After a resume: a result Tune replays for a trial the study already
    finished (the driver stopped after telling Optuna, before Tune saved its state) is
    dropped, and a trial the study holds as running that the restored searcher never asked
    for (the driver stopped after asking Optuna, before Tune saved) is marked failed.
    Other arguments: :class:`ray.tune.search.optuna.OptunaSearch`'s.
    """

    def __init__(self, *, storage_url: str, study_name: str, **kwargs: Any):
        self.storage_url, self.study_name = storage_url, study_name
        storage = optuna.storages.RDBStorage(storage_url)
        super().__init__(storage=storage, study_name=study_name, **kwargs)

    def _optuna_trials(self) -> dict:
        return ray_compat.optuna_search_trials(self)  # private to Ray: fenced there

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.study_name, storage=self.storage_url)

    def suggest(self, trial_id: str):
        known = trial_id in self._optuna_trials()
        config = super().suggest(trial_id)
        if not known and trial_id in self._optuna_trials():
            self._optuna_trials()[trial_id].set_user_attr("tune_trial_id", trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if result.get("replayed"):
            return  # an epoch a resumed trial replays from its checkpoint: reported before
        # A trial the study finished before the driver stopped: Tune replays its last epochs.
        with contextlib.suppress(UpdateFinishedTrialError):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        trial = self._optuna_trials().get(trial_id)
        if trial is not None and result and result.get("epoch"):
            with contextlib.suppress(UpdateFinishedTrialError):
                trial.set_user_attr("epochs", int(result["epoch"]))
        super().on_trial_complete(trial_id, result=result, error=error)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        known = {trial.number for trial in self._optuna_trials().values()}
        study = self.study()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number not in known:
                study.tell(trial.number, state=TrialState.FAIL)
