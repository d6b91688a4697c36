"""Where a trial's time goes outside its training loop: start-up and wind-down phases.

The workers report wall-clock marks with their first epoch (``sdd_search.trial``), the MLflow
callback adds the driver's own (trial start, last result, end) per trial, and
:func:`summarise` turns them into the search's overhead figures. Pure Python + numpy.
"""

from __future__ import annotations

import math

import numpy as np

# (phase, from, to): consecutive wall-clock marks of one trial, in order. "trial_started" is
# when the trial's Tune actor process was created (or Tune started the trial, if later),
# "last_result" when the search driver got the last epoch, "trial_ended" when Tune ended it.
PHASES: tuple[tuple[str, str, str], ...] = (
    ("trial actor start", "trial_started", "driver_entered"),
    ("train workers start", "driver_entered", "worker_created"),
    ("worker imports", "worker_created", "worker_imported"),  # Ray, Train, torch, sdd_search
    ("teacher, data, model", "worker_imported", "loop_started"),
    ("checkpoints, reports", "loop_started", "last_result"),  # minus the loop itself
    ("shutdown", "last_result", "trial_ended"),
)


def phase_seconds(marks: dict[str, float], loop_seconds: float) -> dict[str, float] | None:
    """Seconds per phase of one trial from its marks (wall-clock seconds since the epoch) and
    the seconds it spent inside the training loop; None if a mark is missing."""
    names = {name for _, start, end in PHASES for name in (start, end)}
    if not names <= marks.keys() or any(not math.isfinite(marks[n]) for n in names):
        return None
    out = {}
    for phase, start, end in PHASES:
        seconds = marks[end] - marks[start]
        if start == "loop_started":
            seconds -= loop_seconds
        out[phase] = max(0.0, seconds)
    return out


def summarise(timings: dict[str, dict[str, float]]) -> dict[str, float]:
    """Trial wall time minus time inside the training loop, over the trials timed in this run.

    ``timings``: trial id -> its marks, ``loop_seconds`` and ``report_seconds_per_epoch``.
    Returns medians in seconds and the overhead ``fraction`` of all trial time; also the median
    seconds of each phase (:data:`PHASES`) over the trials whose workers reported every mark,
    as ``phase/<name>``. Empty if no trial ended with a training loop timed.
    """
    walls, loops, phases, per_epoch = [], [], [], []
    for timing in timings.values():
        if "trial_ended" in timing and timing.get("loop_seconds"):
            walls.append(timing["trial_ended"] - timing["trial_started"])
            loops.append(timing["loop_seconds"])
            split = phase_seconds(timing, timing["loop_seconds"])
            if split is not None:
                phases.append(split)
            if "report_seconds_per_epoch" in timing:
                per_epoch.append(timing["report_seconds_per_epoch"])
    if not walls:
        return {}
    per_trial = [w - ell for w, ell in zip(walls, loops, strict=True)]
    out = {
        "trials_timed": float(len(walls)),
        "median_trial_wall_s": float(np.median(walls)),
        "median_loop_s": float(np.median(loops)),
        "median_overhead_s": float(np.median(per_trial)),
        "fraction": float(sum(per_trial) / sum(walls)),
    }
    for phase, _, _ in PHASES if phases else ():
        out[f"phase/{phase}"] = float(np.median([p[phase] for p in phases]))
    if per_epoch:  # within "checkpoints, reports": what each epoch's report costs the worker
        out["report_seconds_per_epoch"] = float(np.median(per_epoch))
    return out


def overhead_metrics(overhead: dict[str, float]) -> dict[str, float]:
    """The parent run's MLflow metrics for :func:`summarise`'s figures."""
    if not overhead:
        return {}
    metrics = {"orchestration_overhead_fraction": overhead["fraction"]}
    for key, seconds in overhead.items():
        if key.startswith("phase/"):
            name = key.removeprefix("phase/").replace(",", "").replace(" ", "_")
            metrics[f"overhead_s/{name}"] = seconds
    return metrics
