"""The search: Ray Tune + Optuna choose SDD's knobs, Ray Train trains each trial, MLflow records.

Data flow (README, Architecture): spec -> space (knobs, Optuna sampler) -> here: the teacher
once, Ray, two Tune experiments (the references, then the searched trials; :mod:`tuning`) ->
per trial a Ray Train run of :func:`sdd_search.train.run_trial` on every worker
(:mod:`sdd_search.trial`) -> metrics + a checkpoint each epoch -> MLflow
(:mod:`sdd_search.mlflow_callback`) -> :mod:`leaderboard` and :mod:`registration`.

Ray stays at the edges: this module imports Ray only inside :func:`run_search`, after
:func:`sdd_search.ray_compat.apply_ray_env_defaults`, so the library and the CLI start Ray alike.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from sdd_search import (
    driver_lock,
    final_report,
    final_stage,
    leaderboard,
    overhead,
    resume_check,
    tuning,
)
from sdd_search.config import TrialConfig
from sdd_search.figures import make_figures
from sdd_search.plan import resolved_plan
from sdd_search.ray_compat import apply_ray_env_defaults, missing
from sdd_search.registration import register_best, register_finalists
from sdd_search.report import write_record
from sdd_search.space import REFERENCE_NAMES
from sdd_search.spec import Spec
from sdd_search.tracking import TAG_OUTCOME, SearchTracker
from sdd_search.tracking_buffer import (
    TrackingUnavailableError,
    check_reachable,
    failing_fast,
    is_unreachable,
)


class SearchError(RuntimeError):
    """A search that cannot start or continue; the message says what to do."""


class SpecChangedError(SearchError):
    """``--resume`` with a spec that changes what the search trains or ranks (the message names
    the field; the CLI puts the spec file in front of it)."""


@dataclass
class SearchOutcome:
    """What a finished search left: where, its MLflow parent run, the ranked rows (searched
    trials best first, then the references), the registered students and the timings."""

    experiment_path: str
    parent_run_id: str
    leaderboard: list[dict[str, Any]]
    best_student_path: str | None
    registered: list[tuple[str, ...]] = field(default_factory=list)  # (trial_id, version, name)
    tracking_uri: str = ""
    wall_seconds: float = 0.0  # the whole search, seconds
    overhead: dict[str, float] = field(default_factory=dict)  # overhead.summarise's figures
    final_report: str | None = None  # the final stage's report as printed (None: no stage)
    experiment_id: str = ""  # the MLflow experiment's id (the UI's runs page)


def run_search(
    spec: Spec,
    *,
    resume: bool = False,
    address: str | None = None,
    spec_text: str = "",
    log=print,
) -> SearchOutcome:
    """Run (or resume) the whole search described by ``spec``.

    ``resume``: continue the search of this name under the spec's storage; ``address``: a Ray
    cluster to join ("auto", "ray://host:10001"), None = a fresh local Ray; ``spec_text``: the
    YAML as written (an MLflow artifact); ``log``: where progress lines go. One driver per
    search: its lock (:mod:`sdd_search.driver_lock`) is held throughout, before Ray starts.
    """
    with driver_lock.hold(spec.experiment_path(), spec.name, log=log):
        return _run_search(spec, resume=resume, address=address, spec_text=spec_text, log=log)


def _run_search(spec: Spec, *, resume: bool, address: str | None, spec_text: str, log):
    """:func:`run_search` under its driver lock."""
    started = time.time()
    apply_ray_env_defaults()  # before Ray is imported: ray.train reads RAY_TRAIN_V2_ENABLED
    _check_storage(spec, resume)
    check_reachable(spec.tracking.uri)  # a server that does not answer: one line, before Ray
    if not resume:
        resume_check.record(spec)  # what --resume must find unchanged
    log(resolved_plan(spec))
    for name, loss in missing().items():
        log(f"warning: this Ray lacks {name} (sdd_search/ray_compat.py): {loss}")
    info, teacher_state = _prepare_teacher(spec.trial)
    if dashboard := tuning.start_ray(address):
        log(f"ray: a local Ray of this search's own; its dashboard at {dashboard}")
    teacher = tuning.put_teacher(teacher_state)
    tracker, callback = _start_tracking(spec, spec_text)
    head = tuning.head_memory() if address else None
    _log_driver_placement(spec, head, log)
    trainable = tuning.trainable(spec, info.num_classes, teacher, head)

    status = "FAILED"
    try:
        reference_rows = _fit_references(spec, trainable, callback, resume)
        search_rows = _fit_search(spec, trainable, callback, resume)
        final = (
            final_stage.fit(spec, trainable, callback, resume, search_rows) if spec.final else None
        )
        status = "FINISHED"
    except TrackingUnavailableError:
        status = "UNREACHABLE"  # the server is away: no more MLflow calls; --resume sends them
        raise
    except (KeyboardInterrupt, tuning.SearchInterrupted):
        # Nothing is registered and no alias moves: only a search that ran to its end does.
        status = "KILLED"
        with _quick_if_away():  # the parent's mark: one quick try, the stop never waits on it
            tracker.set_tags(tracker.parent_run_id, {TAG_OUTCOME: "interrupted"})
        raise
    finally:
        if status not in ("FINISHED", "UNREACHABLE"):
            with _quick_if_away():
                tracker.finish_parent(status)

    rows = search_rows + reference_rows
    report = _final_report(spec, tracker, final)
    registered, best_path, timing = _finish(
        spec, tracker, rows, search_rows, info, callback, (final, report) if final else None
    )
    _figures(spec, tracker, log)
    wall = time.time() - started
    tracker.client.log_metric(tracker.parent_run_id, "search_wall_seconds", wall)
    tracker.set_tags(tracker.parent_run_id, {TAG_OUTCOME: "finished"})
    tracker.finish_parent("FINISHED")
    return SearchOutcome(
        experiment_path=spec.experiment_path(),
        parent_run_id=tracker.parent_run_id,
        leaderboard=rows,
        best_student_path=best_path,
        registered=registered,
        tracking_uri=tracker.uri,
        wall_seconds=wall,
        overhead=timing,
        final_report=final_report.format_report(report) if report else None,
        experiment_id=tracker.experiment_id,
    )


@contextlib.contextmanager
def _quick_if_away():
    """An MLflow call on the way out of a stopped search: tried once, without MLflow's own
    retries (minutes against a server that is away); if the server does not answer, the
    search still stops at once and the parent run keeps its RUNNING status (the resume or
    `sdd-search report` shows the search as interrupted from its driver lock and Tune state)."""
    with failing_fast():
        try:
            yield
        except Exception as error:  # noqa: BLE001 (only an unreachable server is swallowed)
            if not is_unreachable(error):
                raise


def _check_storage(spec: Spec, resume: bool) -> None:
    """A new search must not exist yet under the spec's storage, a resumed one must.

    Either of its Tune experiments counts: a search stopped during its references has no
    ``search`` experiment yet, and is resumed from its ``references``.
    """
    path = spec.experiment_path()
    exists = any(tuning.can_restore(f"{path}/{name}") for name in ("search", "references"))
    if not resume and exists:
        raise SearchError(
            f"search {spec.name!r} already exists at {path}; run again with --resume to "
            f"continue it, or --set name=... to start another"
        )
    if resume and not exists:
        raise SearchError(
            f"--resume: no search {spec.name!r} at {path} to resume (drop --resume to start it)"
        )
    if resume and (changed := resume_check.changed_field(spec)):
        raise SpecChangedError(changed)
    try:  # the Optuna study: reachable, and a new search's own
        study = bool(spec.space) and tuning.optuna_study_exists(spec)
    except ValueError as error:
        raise SearchError(str(error)) from error
    if resume and not study and spec.space and tuning.can_restore(f"{path}/search"):
        raise SearchError(
            f"--resume: the search's Optuna study is not in {tuning.optuna_storage_url(spec)}; "
            + (
                "a search on object storage keeps its study where it started: run from that "
                "folder, or give search.optuna_storage a database both machines reach"
                if "://" in path and not spec.search.optuna_storage
                else "restore that database, or --set name=... to start another search"
            )
        )
    if study and not resume:
        url = tuning.optuna_storage_url(spec)
        raise SearchError(
            f"an Optuna study {spec.name!r} already exists in {url}; delete it (optuna "
            f"delete-study --study-name {spec.name} --storage {url}) or --set name=... to "
            "start another"
        )


def _start_tracking(spec: Spec, spec_text: str):
    """(the search's MLflow tracker with its parent run started or reopened, the Tune callback
    that records every trial under it)."""
    from sdd_search.mlflow_callback import MlflowTrialCallback  # imports Ray

    tracker = SearchTracker(
        spec.tracking.uri,
        spec.experiment_name,
        spec.experiment_path(),
        spec.tracking.artifact_location,
    )
    tracker.start_parent(spec.name, spec.model_dump(mode="json"), spec_text, resolved_plan(spec))
    write_record(spec, tracker.uri)  # `sdd-search report <folder>` finds the runs from it
    callback = MlflowTrialCallback(
        tracker.uri, spec.experiment_name, spec.experiment_path(), spec.tracking.outage_seconds
    )
    return tracker, callback


def _prepare_teacher(trial: TrialConfig):
    """(the dataset's DatasetInfo, the teacher's weights as numpy arrays).

    Trained once and cached, in this process: every trial reads the weights zero-copy from
    its node's object store (the references and searched trials distil, whatever the spec's
    own distill.method).
    """
    from sdd_search.data import dataset_info
    from sdd_search.teacher import ensure_teacher, load_teacher

    data = trial.data
    info = dataset_info(
        data.dataset,
        data.root,
        data.image_size,
        synthetic_num_classes=data.synthetic_num_classes,
        synthetic_size=data.synthetic_size,
    )
    distilling = trial.model_copy(
        update={"distill": trial.distill.model_copy(update={"method": "sdd"})}
    )
    teacher = load_teacher(distilling.teacher, info.num_classes, ensure_teacher(distilling))
    return info, {k: v.detach().cpu().numpy() for k, v in teacher.state_dict().items()}


def _log_driver_placement(spec: Spec, head: float | None, log) -> None:
    """Say so when the trial drivers cannot all sit on the head (``head``: its memory, bytes)."""
    concurrent = spec.search.max_concurrent
    if head is not None and tuning.HEAD_NODE_RESOURCE not in tuning.driver_resources(
        head, concurrent
    ):
        log(
            f"trial drivers: spread over the cluster ({concurrent} concurrent trials need "
            f"~{concurrent * tuning.DRIVER_SIDE_BYTES / 2**30:.0f} GiB, more than half the "
            f"head's {head / 2**30:.0f} GiB)"
        )


def _fit_references(spec: Spec, trainable, callback, resume: bool) -> list[dict]:
    """The baseline and plain-KD students (unranked rows), if the spec asks for them."""
    if not spec.search.references:
        return []
    experiment = tuning.reference_experiment(spec)
    results = tuning.fit("references", spec, trainable, experiment, callback, resume)
    tuning.require_complete("references", results, len(REFERENCE_NAMES), callback)
    return leaderboard.result_rows(results, spec.search.metric, spec.search.mode)


def _fit_search(spec: Spec, trainable, callback, resume: bool) -> list[dict]:
    """The searched trials' rows, best first by the spec's metric and mode."""
    experiment = tuning.search_experiment(spec)
    results = tuning.fit("search", spec, trainable, experiment, callback, resume)
    tuning.require_complete("search", results, spec.search.num_trials, callback)
    rows = leaderboard.result_rows(results, spec.search.metric, spec.search.mode)
    return leaderboard.ranked(rows, spec.search.mode)


def _final_report(spec: Spec, tracker: SearchTracker, final):
    """The final stage's report from its MLflow runs, logged to the parent run (or None)."""
    if final is None:
        return None
    report = final_stage.report_from_mlflow(spec, tracker)
    if report is not None:
        final_stage.log_report(tracker, report)
    return report


def _figures(spec: Spec, tracker: SearchTracker, log) -> None:
    """The figures (sdd_search.figures) into the search's folder and the parent run; a
    figure that fails is a warning line, never a failed search."""
    try:
        made = make_figures(spec, tracker, log=log)
    except Exception as error:
        log(f"warning: figures not made ({type(error).__name__}: {error})")
        return
    if made:
        where = "" if "://" in spec.experiment_path() else f"{spec.experiment_path()}/figures and "
        log(f"figures: {len(made)} in {where}the parent MLflow run (figures/)")


def _finish(spec: Spec, tracker: SearchTracker, rows, search_rows, info, callback, final=None):
    """Log the leaderboard, register the best students (with ``final``, (the final stage's
    results, its report): its finalists), log the overhead figures.

    Returns (registered (trial id, version) pairs, best_student.pt path or None, overhead)."""
    tracker.log_leaderboard(leaderboard.csv_rows(rows), leaderboard.format_leaderboard(rows))
    if final is not None and final[1] is not None:
        results, report = final
        checkpoints = final_stage.result_checkpoints(results)
        registered, best_path = register_finalists(
            spec, tracker, report, checkpoints, info, info.num_classes
        )
    else:
        registered, best_path = register_best(spec, tracker, search_rows, info, info.num_classes)
    timing = overhead.summarise(callback.timings)
    for key, value in overhead.overhead_metrics(timing).items():
        tracker.client.log_metric(tracker.parent_run_id, key, value)
    return registered, best_path, timing


def __getattr__(name: str):
    # Experiment states pickled before these classes moved name them here (a resumed search).
    if name == "MlflowTrialCallback":
        from sdd_search.mlflow_callback import MlflowTrialCallback

        return MlflowTrialCallback
    if name == "SpaceSampler":
        from sdd_search.space import SpaceSampler

        return SpaceSampler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
