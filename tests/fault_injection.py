"""A trial that fails for real in a Ray worker, through run_trial's public extension point.

tests/test_faults.py connects to its cluster with :data:`RUNTIME_ENV`: Ray ships this file to
every node (``py_modules``) and runs :func:`install` in each worker process of the job as it
starts (``worker_process_setup_hook``), before it runs any task or actor. install() registers
:class:`FailAtEpoch` in :data:`sdd_search.callbacks.EPOCH_CALLBACKS`, so the trial with lr
:data:`FAILING_LR` raises as it starts epoch :data:`FAIL_EPOCH`, in whichever Train worker (on
whichever node) it trains; every other trial trains normally.
"""

from __future__ import annotations

import sys

from sdd_search.callbacks import EPOCH_CALLBACKS, TrialCallback

FAILING_LR = 0.05
FAIL_EPOCH = 2  # 1-based: epoch 1 is trained and reported first


class FailAtEpoch(TrialCallback):
    def on_epoch_start(self, config, epoch: int) -> None:
        if epoch == FAIL_EPOCH and config.train.lr == FAILING_LR:
            raise RuntimeError(f"lr {FAILING_LR}: injected failure at epoch {epoch}")


def install() -> None:
    EPOCH_CALLBACKS.append(FailAtEpoch())


# Ray's documented runtime_env fields; the module travels by value, so no node needs tests/.
RUNTIME_ENV = {
    "py_modules": [sys.modules[__name__]],
    "worker_process_setup_hook": f"{__name__}.install",
}
