"""The data package's two entry points: describe a dataset and its roles, or build one stage's
loaders for one rank."""

from __future__ import annotations

import numpy as np
import torch

from sdd_search.data.base import DatasetError, DatasetInfo, Loader
from sdd_search.data.image_folder import ImageFolderLoader
from sdd_search.data.resident import ResidentLoader
from sdd_search.data.sampling import check_rank
from sdd_search.data.sources import DATASETS, SOURCES, DatasetSource, SourceOptions, Split, mean_std
from sdd_search.data.splits import SELECTION_SEED, STAGES, Stage, stratified_split
from sdd_search.remote import is_object_store, listed_source

__all__ = ["build_datasets_and_loaders", "dataset_info"]


def _source(name: str) -> DatasetSource:
    if name not in SOURCES:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return SOURCES[name]


def _options(source: DatasetSource, image_size: int | None, **options) -> SourceOptions:
    size = source.image_size if image_size is None else int(image_size)
    if size < 1:
        raise DatasetError(
            f"{source.name}: image_size must be a positive number of pixels, got {size}"
        )
    return SourceOptions(image_size=size, **options)


def _check_stage(stage: str) -> None:
    """Raise DatasetError unless ``stage`` is one of :data:`STAGES`."""
    if stage not in STAGES:
        raise DatasetError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")


def _held_out_selection(
    source: DatasetSource, labels: np.ndarray, selection_fraction: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, selection) indices into the training split: a stratified ``selection_fraction``
    (None = the source's default) held out with :data:`SELECTION_SEED`, the same for every run."""
    fraction = source.selection_fraction if selection_fraction is None else selection_fraction
    if not 0 < fraction < 1:
        raise DatasetError(
            f"{source.name}: selection_fraction must be between 0 and 1 (exclusive), got {fraction}"
        )
    kept, held_out = stratified_split(labels, fraction, SELECTION_SEED)
    if len(held_out) == 0:
        raise DatasetError(
            f"{source.name}: the selection split is empty ({len(labels)} training images x "
            f"selection_fraction {fraction} rounds to 0); raise data.selection_fraction"
        )
    return kept, held_out


def _info(
    source: DatasetSource,
    options: SourceOptions,
    stage: Stage,
    num_train: int,
    num_selection: int,
    num_test: int | None,
) -> DatasetInfo:
    """The record for ``stage``; ``num_train`` is the training split minus the selection split."""
    mean, std = mean_std(source, options)
    return DatasetInfo(
        name=source.name,
        num_classes=source.num_classes(options),
        image_size=options.image_size,
        channels=3,
        mean=mean,
        std=std,
        stage=stage,
        num_train=num_train + (num_selection if stage == "final" else 0),
        num_selection=num_selection,
        num_test=num_test,
    )


def dataset_info(
    name: str,
    root: str | None = None,
    image_size: int | None = None,
    *,
    stage: Stage = "search",
    selection_fraction: float | None = None,
    synthetic_num_classes: int = 10,
    synthetic_size: int = 256,
) -> DatasetInfo:
    """Describe a dataset and its three roles without building loaders.

    Arguments as :func:`build_datasets_and_loaders`'s. Cheap: no image is decoded. digits and
    synthetic are counted exactly (the digits split takes milliseconds); cifar10/100 report the
    standard 50000/10000 split without reading the pickles (:func:`build_datasets_and_loaders`
    reports the counts it actually loaded); imagefolder lists the folders, test's included (an
    s3:// or gs:// root: the object store's listing, nothing downloaded; sdd_search.remote).
    """
    _check_stage(stage)
    source = _source(name)
    if is_object_store(root):
        source = listed_source(source, root)
    options = _options(
        source,
        image_size,
        root=root,
        synthetic_num_classes=synthetic_num_classes,
        synthetic_size=synthetic_size,
    )
    train_labels = source.labels("train", options)
    selection_labels = source.labels("selection", options)
    if selection_labels is None:
        kept, held_out = _held_out_selection(source, train_labels, selection_fraction)
        num_train, num_selection = len(kept), len(held_out)
    else:
        num_train, num_selection = len(train_labels), len(selection_labels)
    num_test = len(source.labels("test", options))
    return _info(source, options, stage, num_train, num_selection, num_test)


def _stage_splits(
    source: DatasetSource, options: SourceOptions, stage: Stage, selection_fraction: float | None
) -> tuple[DatasetInfo, Split, Split]:
    """(info, training images, evaluation images) of ``stage``; the search stage never reads
    the test split."""
    train = source.read("train", options)
    selection = source.read("selection", options)
    if selection is None:  # held out of the training split
        kept, selected = _held_out_selection(source, train.labels.numpy(), selection_fraction)
        num_train, num_selection = len(kept), len(selected)
    else:
        num_train, num_selection = len(train), len(selection)
    if stage == "search":
        info = _info(source, options, stage, num_train, num_selection, None)
        if selection is None:
            return info, train.subset(kept), train.subset(selected)
        return info, train, selection
    test = source.read("test", options)
    info = _info(source, options, stage, num_train, num_selection, len(test))
    # All the training data: the training split as it is, or followed by its own selection split.
    return info, train if selection is None else train.concat(selection), test


def _loader(
    source: DatasetSource,
    split: Split,
    info: DatasetInfo,
    *,
    train: bool,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    **common,
) -> Loader:
    """The loader the source's table row names, over ``split``, training or evaluating."""
    if source.resident:
        return ResidentLoader(
            split.items,
            split.labels,
            batch_size=batch_size,
            train=train,
            pad=max(1, info.image_size // 8),
            flip=source.flip,
            mean=info.mean,
            std=info.std,
            device=device,
            name=source.name,
            **common,
        )
    return ImageFolderLoader(
        split.items,
        split.labels.tolist(),
        batch_size=batch_size,
        train=train,
        image_size=info.image_size,
        mean=info.mean,
        std=info.std,
        device=device,
        num_workers=num_workers,
        name=source.name,
        **common,
    )


def build_datasets_and_loaders(
    name: str,
    *,
    root: str | None,
    batch_size: int,
    device: torch.device | str,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    download: bool = False,
    image_size: int | None = None,
    num_workers: int = 4,
    channels_last: bool = False,
    eval_batch_size: int | None = None,
    stage: Stage = "search",
    selection_fraction: float | None = None,
    synthetic_num_classes: int = 10,
    synthetic_size: int = 256,
) -> tuple[DatasetInfo, Loader, Loader]:
    """Load a dataset and return (info, train loader, evaluation loader) for this rank.

    ``stage`` "search": train on the training split minus the selection split, evaluate on the
    selection split; the test split is never read. "final": train on all the training data
    (train + selection), evaluate on the test split. ``selection_fraction`` is the share of the
    training split held out as the selection split (None = the dataset's default: 0.1 cifar and
    imagefolder, 0.2 digits and synthetic); stratified by label with a fixed seed
    (:data:`~sdd_search.data.splits.SELECTION_SEED`), so every trial and every run sees the same
    selection split. An image folder with both val/ and test/ uses val/ as its selection split.

    ``batch_size`` and ``eval_batch_size`` (default: ``batch_size``) are per rank, in images.
    ``image_size`` is the side in pixels of the yielded images (defaults: digits 16, cifar 32,
    synthetic 32, imagefolder 224). ``num_workers`` only applies to imagefolder (file-reading
    processes). ``download`` fetches CIFAR into ``root`` when it is missing (run it on one rank
    first in a multi-process job). Small datasets (digits, cifar, synthetic) live whole on
    ``device`` with padding-crop augmentation of ``image_size // 8`` pixels (2 for digits at 16,
    4 for CIFAR at 32) plus a horizontal flip, except for digits (not mirror-symmetric).
    """
    device = torch.device(device)
    _check_stage(stage)
    source = _source(name)
    options = _options(
        source,
        image_size,
        root=root,
        download=download,
        synthetic_num_classes=synthetic_num_classes,
        synthetic_size=synthetic_size,
    )
    check_rank(rank, world_size)
    eval_batch = batch_size if eval_batch_size is None else eval_batch_size
    info, train_split, eval_split = _stage_splits(source, options, stage, selection_fraction)
    common = {
        "seed": seed,
        "rank": rank,
        "world_size": world_size,
        "channels_last": channels_last,
        "device": device,
        "num_workers": num_workers,
    }
    train_loader = _loader(source, train_split, info, train=True, batch_size=batch_size, **common)
    eval_loader = _loader(source, eval_split, info, train=False, batch_size=eval_batch, **common)
    return info, train_loader, eval_loader
