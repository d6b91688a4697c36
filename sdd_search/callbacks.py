"""Extension points of a trial's training loop: callbacks :func:`sdd_search.train.run_trial` calls.

Pass callbacks to ``run_trial(..., callbacks=[...])``, or append them to :data:`EPOCH_CALLBACKS`
to reach every trial a process runs, e.g. from a Ray ``worker_process_setup_hook`` (runtime_env)
in the worker processes of a search, where no caller of run_trial is yours::

    # mymodule.py, importable on every node
    from sdd_search.callbacks import EPOCH_CALLBACKS, TrialCallback

    class StopAtEpoch(TrialCallback):
        def on_epoch_start(self, config, epoch):
            if epoch > 10 and config.distill.base == "nkd":
                raise RuntimeError("no nkd past epoch 10 today")

    def install():
        EPOCH_CALLBACKS.append(StopAtEpoch())

    ray.init(runtime_env={"worker_process_setup_hook": "mymodule.install"})

Imports nothing heavy (no torch): a setup hook that runs in every Ray worker stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdd_search.config import TrialConfig


class TrialCallback:
    """Hooks into :func:`sdd_search.train.run_trial`; subclass and override what you need.

    Called on every rank of a data-parallel trial. An exception raised by a hook propagates out
    of run_trial and ends the trial with that error (under Ray Tune: the trial FAILED, with the
    exception as its reason).
    """

    def on_epoch_start(self, config: TrialConfig, epoch: int) -> None:
        """Before epoch ``epoch`` (1-based, as in the reported metrics) trains, resumed runs
        included; ``config`` is the trial's whole configuration."""


# Process-wide callbacks, called by every run_trial in this process after its own ``callbacks``.
EPOCH_CALLBACKS: list[TrialCallback] = []
