"""The best students into MLflow's model registry: logged, registered, the best one aliased.

Which students: without a final stage, the top ``top_k`` searched trials by the spec's metric
and mode on the selection split (:func:`sdd_search.leaderboard.registration_candidates`);
with one, the finalists retrained on all the training data, the champion (by selection
score, never by test) first, with their test figures over seeds in the version's tags and
description. Each is loaded from its trial's last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sdd_search.leaderboard import registration_candidates
from sdd_search.spec import Spec
from sdd_search.tracking import TAG_REGISTERED, SearchTracker


def load_student(checkpoint_path: str):
    """The student (eval mode) and the whole checkpoint dict from a Ray Train checkpoint
    (a local folder or a remote URI)."""
    import ray.train

    from sdd_search.models import create_model
    from sdd_search.train import load_checkpoint

    with ray.train.Checkpoint(checkpoint_path).as_directory() as directory:
        state = load_checkpoint(directory)
    model = create_model(state["model_name"], num_classes=state["num_classes"])
    model.load_state_dict(state["student"])
    return model.eval(), state


def _checkpoint_uri(spec: Spec, path: str) -> str:
    """A trial's checkpoint as Ray opens it: Train names a checkpoint in a bucket by its path
    there (``bucket/prefix/...``), without the storage's scheme (``s3://``)."""
    storage = spec.storage_uri()
    if "://" in storage and "://" not in path:
        return f"{storage.split('://', 1)[0]}://{path}"
    return path


def register_best(
    spec: Spec, tracker: SearchTracker, ranked_rows: list[dict], info, num_classes: int
) -> tuple[list[tuple[str, str]], str | None]:
    """Without a final stage: register the top-k searched students of ``ranked_rows`` (best
    first by the selection metric), each from its trial's last checkpoint.

    ``info``: the dataset's DatasetInfo (image size and channels of the example input);
    ``num_classes``: the student's classes. Returns ((trial id, version) per registered
    student, the best_student.pt path or None).
    """
    picks = [
        {"trial": row["trial"], "checkpoint": row["checkpoint"], "tags": {}, "description": ""}
        for row in registration_candidates(ranked_rows, spec.search.top_k)
    ]
    return register(spec, tracker, picks, info, num_classes)


def register_finalists(
    spec: Spec, tracker: SearchTracker, report, checkpoints: dict, info, num_classes: int
) -> tuple[list[tuple[str, str]], str | None]:
    """With a final stage: register each finalist's first-seed student (trained at the full
    recipe on all the training data), the champion first, with its test figures over seeds
    in the version's tags and description. ``report``: the FinalReport; ``checkpoints``:
    (entry, seed) -> (trial id, checkpoint) from :func:`sdd_search.final_stage.result_checkpoints`.
    """
    summaries = [s for s in report.summaries if s.entry.role == "finalist"]
    summaries.sort(key=lambda s: s.entry.name != report.champion)
    picks = []
    for summary in summaries[: spec.search.top_k]:
        seed = next(
            (s for s in summary.entry.seeds if (summary.entry.name, s) in checkpoints), None
        )
        if seed is None:
            continue
        trial_id, checkpoint = checkpoints[(summary.entry.name, seed)]
        tags = {
            "test_top1_mean": f"{summary.mean:.4f}",
            "test_top1_std": f"{summary.std:.4f}",
            "test_seeds": str(summary.n),
            "seed": str(seed),
            "selection_metric": f"{report.mode} {report.metric}",
            "selection_score": f"{summary.entry.selection_score:.4f}",
            "search_trial": summary.entry.source_trial,
        }
        description = (
            f"{summary.entry.name} (search trial {summary.entry.source_trial}), seed {seed}: "
            f"test top-1 {summary.mean:.2f} +- {summary.std:.2f} % over {summary.n} seeds "
            f"(last epoch, the dataset's test split); chosen by {report.metric} "
            f"{summary.entry.selection_score:.2f} on the selection split, never by test."
        )
        picks.append(
            {"trial": trial_id, "checkpoint": checkpoint, "tags": tags, "description": description}
        )
    return register(spec, tracker, picks, info, num_classes)


def register(
    spec: Spec, tracker: SearchTracker, picks: list[dict], info, num_classes: int
) -> tuple[list[tuple[str, str]], str | None]:
    """Log each pick (``trial``, ``checkpoint``, version ``tags``, ``description``) as an
    MLflow model, register it under the spec's model name and alias the first one; the first
    one's weights also go to ``<experiment path>/best_student.pt`` when storage is local.

    Once per search: a resumed search that had registered already gets the same versions
    back (from the parent run's tag) and registers nothing again.
    """
    from sdd_search.teacher import save_model_file

    best_path = None
    if "://" not in spec.experiment_path():
        best_path = f"{spec.experiment_path()}/best_student.pt"
    done = tracker.parent_tag(TAG_REGISTERED)
    if done is not None:
        registered = [tuple(pair) for pair in json.loads(done)]
        return registered, best_path if registered and Path(best_path or "").is_file() else None
    registered: list[tuple[str, ...]] = []  # (Tune trial id, version, MLflow run name)
    size = info.image_size
    example = np.zeros((2, info.channels, size, size), dtype=np.float32)
    for rank, pick in enumerate(picks):
        run_id = tracker.run_id_of(pick["trial"])
        if run_id is None or not pick["checkpoint"]:
            continue
        model, _ = load_student(_checkpoint_uri(spec, pick["checkpoint"]))
        if not registered and best_path:
            save_model_file(best_path, model, spec.student.model, num_classes)
        name = spec.registered_model_name
        version = tracker.register_student(run_id, model, example, name)
        tracker.set_tags(
            run_id, {"sdd_search.registered_version": version, "sdd_search.rank": rank + 1}
        )
        for key, value in pick["tags"].items():
            tracker.client.set_model_version_tag(name, version, key, value)
        if pick["description"]:
            tracker.client.update_model_version(name, version, description=pick["description"])
        if not registered:
            tracker.set_alias(name, spec.tracking.alias, version)
        registered.append((pick["trial"], version, tracker.client.get_run(run_id).info.run_name))
    tracker.set_tags(tracker.parent_run_id, {TAG_REGISTERED: json.dumps(registered)})
    return registered, best_path if registered else None
