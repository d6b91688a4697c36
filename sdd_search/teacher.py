"""Teachers: from a checkpoint file, from torchvision's weights, or trained once here and cached.

Loading never unpickles arbitrary objects (``torch.load(weights_only=True)``). A file that asks
to run code, a torn one, or a teacher whose classes, keys or shapes differ from the dataset's and
the model's is a :class:`TeacherError` with a one-line message; :func:`check_teacher_checkpoint`
finds all of these for ``--check``, cheaply, before anything starts.
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

from sdd_search.checkpoint import CheckpointError, atomic_save, load_weights_only
from sdd_search.config import TeacherConfig, TrialConfig
from sdd_search.data import dataset_info
from sdd_search.models import create_model
from sdd_search.remote import (
    RemoteError,
    check_sha256,
    fetch_file,
    is_download,
    is_object_store,
)
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


def _state_dict_from_file(
    path: Path, *, field: str = "teacher.checkpoint", mmap: bool = False
) -> dict[str, torch.Tensor]:
    """Accept our format, the official SDD/mdistiller ``{"model": state_dict}`` and bare ones."""
    try:
        payload = load_weights_only(path, mmap=mmap)
    except FileNotFoundError:
        raise TeacherError(f"{field}: no file at {path}") from None
    except CheckpointError as error:  # a pickle with arbitrary objects, torn, or not torch's
        raise TeacherError(f"{field}: {error}") from None
    if isinstance(payload, dict):
        for key in ("state_dict", "model", "student"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not all(
        isinstance(v, torch.Tensor) for v in payload.values()
    ):
        raise TeacherError(f"{field}: {path} holds no state_dict of tensors")
    # DataParallel / DDP / torch.compile prefixes.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in payload):
            payload = {k[len(prefix) :]: v for k, v in payload.items()}
    return payload


def _head_key(model: nn.Module) -> str:
    """The state-dict key of the weight of ``model``'s last linear layer (its logits)."""
    linear = [m for m in model.get_classifier().modules() if isinstance(m, nn.Linear)][-1]
    return next(name for name, p in model.named_parameters() if p is linear.weight)


def _check_fits(
    model: nn.Module, state_dict: dict, path: Path, model_name: str, num_classes: int, field: str
) -> None:
    """TeacherError unless ``state_dict`` predicts ``num_classes`` and has exactly ``model``'s
    keys and shapes (``model`` may live on the meta device)."""
    head_key = _head_key(model)
    if head_key in state_dict and state_dict[head_key].shape[0] != num_classes:
        raise TeacherError(
            f"{field}: {path} predicts {state_dict[head_key].shape[0]} classes but the dataset "
            f"has {num_classes}; use a teacher trained on this dataset"
        )
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    problems = [
        f"{kind} keys: {', '.join(keys[:3])}{f' (+{len(keys) - 3} more)' if len(keys) > 3 else ''}"
        for kind, keys in (
            ("missing", [key for key in expected if key not in state_dict]),
            ("unexpected", [key for key in state_dict if key not in expected]),
        )
        if keys
    ]
    problems += [
        f"{key}: shape {list(state_dict[key].shape)} in the file, {list(shape)} in the model"
        for key, shape in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != shape
    ][:1]
    if problems:
        raise TeacherError(
            f"{field}: {path} does not fit model {model_name!r} ({'; '.join(problems)})"
        )


def load_model_file(
    path: str | os.PathLike, model_name: str, num_classes: int, *, field: str = "teacher.checkpoint"
) -> nn.Module:
    """Build ``model_name`` and load the weights at ``path``; classes, keys and shapes must match."""
    path = Path(path)
    state_dict = _state_dict_from_file(path, field=field)
    model = create_model(model_name, num_classes=num_classes)
    _check_fits(model, state_dict, path, model_name, num_classes, field)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise TeacherError(f"{field}: {path} does not fit model {model_name!r} ({first})") from None
    return model


def check_teacher_checkpoint(config: TrialConfig, *, count_classes: bool = True) -> None:
    """What ``--check`` verifies of a ``source: checkpoint`` teacher before anything starts,
    cheaply: the file loads weights-only (memory-mapped: nothing read twice, nothing unpickled
    but tensors), its head predicts the dataset's number of classes, and its keys and shapes fit
    ``teacher.model`` (built on the meta device: no memory, no initialisation). Raises
    TeacherError (one line), or DatasetError where the dataset's classes cannot be counted;
    returns at once for the other sources. Without ``count_classes`` (a dataset in an object
    store, not listed here) the head keeps the file's own number of classes."""
    if config.teacher.source != "checkpoint":
        return
    from sdd_search.data.sources import SOURCES, SourceOptions

    data = config.data
    source = SOURCES[data.dataset]
    options = SourceOptions(
        data.root,
        data.image_size or source.image_size,
        synthetic_num_classes=data.synthetic_num_classes,
        synthetic_size=data.synthetic_size,
    )
    # Cheap: no image read, no pickle opened.
    num_classes = source.num_classes(options) if count_classes else None
    path, name = Path(config.teacher.checkpoint).expanduser(), config.teacher.model
    state_dict = _state_dict_from_file(path, mmap=True)
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes or 1)
        if num_classes is None:
            head = state_dict.get(_head_key(model))
            num_classes = 1 if head is None else head.shape[0]
            model = create_model(name, num_classes=num_classes)
    _check_fits(model, state_dict, path, name, num_classes, "teacher.checkpoint")


def _root_key(root: str | None) -> str | None:
    """data.root in a teacher's cache key: a local folder resolved, a URI as it is."""
    if not root:
        return None
    return root.rstrip("/") if is_object_store(root) else str(Path(root).expanduser().resolve())


def _checkpoint_file(config: TeacherConfig, log) -> Path:
    """teacher.checkpoint on this node's disk: the path itself, or the URL downloaded once into
    the cache (sdd_search.remote.fetch_file); teacher.sha256, when given, checked either way."""
    try:
        if is_download(config.checkpoint):
            return fetch_file(config.checkpoint, cache_dir(config), sha256=config.sha256, log=log)
        path = Path(config.checkpoint).expanduser()
        if not path.is_file():
            raise TeacherError(f"teacher.checkpoint: no file at {path}")
        if config.sha256:
            check_sha256(path, config.sha256)
        return path
    except RemoteError as error:
        raise TeacherError(str(error)) from None


def teacher_cache_key(config: TrialConfig) -> str:
    """Content key of a trained teacher: everything that changes its weights."""
    teacher_train = config.teacher.train or config.train
    content = {
        "model": config.teacher.model,
        # The stage is left out: a teacher always trains on the search stage's split.
        "data": config.data.model_dump(
            exclude={"root", "download", "num_workers", "stage", "cache_dir"}
        ),
        "data_root": _root_key(config.data.root),
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
        return _checkpoint_file(config.teacher, log)
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
