"""Teachers: from a checkpoint file, from torchvision's weights, or trained once here and cached.

Loading never unpickles arbitrary objects (``torch.load(weights_only=True)``). A teacher whose
number of classes differs from the dataset's is a :class:`TeacherError` with a one-line message.
A script needs one call: ``run_trial(config, teacher=teacher_for(config))``.

This module imports :mod:`sdd_search.train` (a teacher is trained by ``run_trial``), never the
other way round: run_trial takes its teacher as an argument.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from sdd_search.checkpoint import atomic_save
from sdd_search.config import TeacherConfig, TrialConfig
from sdd_search.data import dataset_info
from sdd_search.models import create_model
from sdd_search.train import run_trial

CHECKPOINT_FORMAT = "sdd-search/model-v1"


class TeacherError(ValueError):
    """A teacher that cannot be used: the message names the field and what was expected."""


def cache_dir(config: TeacherConfig | None = None) -> Path:
    """Where trained teachers are cached: teacher.cache_dir, $SDD_SEARCH_CACHE or ~/.cache."""
    if config is not None and config.cache_dir:
        return Path(config.cache_dir).expanduser()
    env = os.environ.get("SDD_SEARCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sdd-search"


def save_model_file(
    path: str | os.PathLike, model: nn.Module, model_name: str, num_classes: int
) -> None:
    """Write a model in our checkpoint format (atomically: a crash never leaves half a file)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_name": model_name,
        "num_classes": num_classes,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    atomic_save(payload, path)


def _state_dict_from_file(path: Path) -> dict[str, torch.Tensor]:
    """Accept our format, the official SDD/mdistiller ``{"model": state_dict}`` and bare ones."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TeacherError(f"teacher.checkpoint: no file at {path}") from None
    except Exception as error:  # a pickle with arbitrary objects, or not a torch file at all
        raise TeacherError(
            f"teacher.checkpoint: {path} is not a weights-only torch checkpoint ({error})"
        ) from None
    if isinstance(payload, dict):
        for key in ("state_dict", "model", "student"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not all(
        isinstance(v, torch.Tensor) for v in payload.values()
    ):
        raise TeacherError(f"teacher.checkpoint: {path} holds no state_dict of tensors")
    # DataParallel / DDP / torch.compile prefixes.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in payload):
            payload = {k[len(prefix) :]: v for k, v in payload.items()}
    return payload


def load_model_file(
    path: str | os.PathLike, model_name: str, num_classes: int, *, field: str = "teacher.checkpoint"
) -> nn.Module:
    """Build ``model_name`` and load the weights at ``path``; classes must match."""
    path = Path(path)
    state_dict = _state_dict_from_file(path)
    model = create_model(model_name, num_classes=num_classes)
    head_weight = [m for m in model.get_classifier().modules() if isinstance(m, nn.Linear)][
        -1
    ].weight
    head_key = next(name for name, p in model.named_parameters() if p is head_weight)
    if head_key in state_dict and state_dict[head_key].shape[0] != num_classes:
        raise TeacherError(
            f"{field}: {path} predicts {state_dict[head_key].shape[0]} classes but the dataset "
            f"has {num_classes}; use a teacher trained on this dataset"
        )
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise TeacherError(f"{field}: {path} does not fit model {model_name!r} ({first})") from None
    return model


def teacher_cache_key(config: TrialConfig) -> str:
    """Content key of a trained teacher: everything that changes its weights."""
    teacher_train = config.teacher.train or config.train
    content = {
        "model": config.teacher.model,
        # The stage is left out: a teacher always trains on the search stage's split.
        "data": config.data.model_dump(exclude={"root", "download", "num_workers", "stage"}),
        "data_root": str(Path(config.data.root).expanduser().resolve())
        if config.data.root
        else None,
        "train": teacher_train.model_dump(
            exclude={"device", "num_threads", "compile", "compile_mode"}
        ),
        "version": 2,  # 2: digits split by sdd_search.data.stratified_split
    }
    blob = json.dumps(content, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_teacher_path(config: TrialConfig) -> Path:
    name = config.teacher.model.replace("/", "_")
    return (
        cache_dir(config.teacher)
        / "teachers"
        / f"{name}-{config.data.dataset}-{teacher_cache_key(config)}.pt"
    )


def ensure_teacher(config: TrialConfig, *, log=print) -> Path | None:
    """Make sure the teacher's weights exist on disk; train it once if source is ``train``.

    Returns the weights file (None for torchvision weights, which torchvision caches itself).
    """
    source = config.teacher.source
    if source == "checkpoint":
        path = Path(config.teacher.checkpoint).expanduser()
        if not path.is_file():
            raise TeacherError(f"teacher.checkpoint: no file at {path}")
        return path
    if source == "torchvision":
        return None
    path = cached_teacher_path(config)
    if path.is_file():
        log(f"teacher: cached {config.teacher.model} at {path}")
        return path
    teacher_train = config.teacher.train or config.train
    teacher_config = config.model_copy(
        update={
            # Train minus selection, scored on selection: the teacher never sees the test split.
            "data": config.data.model_copy(update={"stage": "search"}),
            "student": config.student.model_copy(update={"model": config.teacher.model}),
            "distill": config.distill.model_copy(update={"method": "none"}),
            "train": teacher_train,
        }
    )
    log(
        f"teacher: training {config.teacher.model} once ({teacher_train.epochs} epochs), cache {path}"
    )
    result = run_trial(teacher_config, teacher=None, log=log)
    save_model_file(path, result.model, config.teacher.model, result.num_classes)
    log(f"teacher: selection top-1 {result.best['val_top1']:.2f}% (best epoch) -> {path}")
    return path


def load_teacher(
    config: TeacherConfig, num_classes: int, weights_path: str | os.PathLike | None
) -> nn.Module:
    """The teacher in eval mode with frozen parameters (on the CPU; the caller moves it)."""
    if config.source == "torchvision":
        model = create_model(
            config.model, num_classes=1000, pretrained=True, weights=config.weights
        )
        if model.num_classes != num_classes:
            raise TeacherError(
                f"teacher.model: {config.model} with {config.weights} weights predicts "
                f"{model.num_classes} classes but the dataset has {num_classes}"
            )
    else:
        if weights_path is None:
            raise TeacherError("teacher: no weights file (call ensure_teacher first)")
        field = "teacher.checkpoint" if config.source == "checkpoint" else "teacher (cached)"
        model = load_model_file(weights_path, config.model, num_classes, field=field)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def teacher_for(config: TrialConfig, *, log=print) -> nn.Module | None:
    """The frozen teacher ``run_trial(config, teacher=...)`` needs, on the CPU: None when
    ``distill.method`` is "none" (labels only); otherwise :func:`ensure_teacher` (training and
    caching it once if its source is "train"), then :func:`load_teacher`. ``log`` gets a line
    when the teacher is trained or found in the cache."""
    if config.distill.method == "none":
        return None
    data = config.data
    info = dataset_info(
        data.dataset,
        data.root,
        data.image_size,
        synthetic_num_classes=data.synthetic_num_classes,
        synthetic_size=data.synthetic_size,
    )
    return load_teacher(config.teacher, info.num_classes, ensure_teacher(config, log=log))
