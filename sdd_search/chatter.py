"""What ``sdd-search`` keeps out of its output without ``-v``: Ray's, Optuna's and MLflow's
informational logs and MLflow's per-run links, keeping the few warnings a user acts on (each in
one line). The live view (:mod:`sdd_search.live_view`) says what the search is doing instead.
"""

from __future__ import annotations

import logging
import os

# Ray's warnings a user acts on (a trial that cannot be placed), kept when the rest of Ray's
# log is hidden; each shown in one line.
KEPT_RAY_WARNINGS = ("ray.tune.execution.insufficient_resources_manager",)


def hide_chatter() -> None:
    """Hide Ray's, Optuna's and MLflow's informational logs (``sdd-search`` without ``-v``).

    Ray's logger shows errors (Tune's none: the view reports failed trials), and the warnings
    of :data:`KEPT_RAY_WARNINGS` in one line; Optuna's and MLflow's show warnings. Ray's
    import configures its loggers, so Ray Tune is imported first here;
    :func:`sdd_search.tuning.start_ray` keeps the level through ``ray.init``.
    """
    import optuna
    import ray.tune  # noqa: F401 (configures Ray's loggers: their levels are set after)

    logging.getLogger("ray").setLevel(logging.ERROR)
    # Tune logs a failed trial's traceback as an error: the view says it in one line.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    for name in KEPT_RAY_WARNINGS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if not any(isinstance(f, OneLine) for f in logger.filters):
            logger.addFilter(OneLine())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    # Nor the two lines ("View run ... at: URL", "View experiment at: URL") MLflow writes to
    # stdout for every run it ends on a tracking server: the search prints its runs' link once.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)


class OneLine(logging.Filter):
    """Joins a log record's message into one line (the record is still emitted)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = " ".join(record.getMessage().split())
        record.msg, record.args = message, None
        return True
