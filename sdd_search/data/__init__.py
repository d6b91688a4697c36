"""Datasets and loaders that keep the accelerator fed.

One entry point for the trainer::

    info, train_loader, eval_loader = build_datasets_and_loaders(
        "cifar100", root="/data", batch_size=64, device=torch.device("cuda"), seed=0,
        rank=rank, world_size=world_size, stage="search",
    )
    for epoch in range(epochs):
        train_loader.set_epoch(epoch)        # order and augmentation = f(seed, epoch, rank)
        for images, labels in train_loader:  # float32 B x 3 x S x S normalised, int64 B; on device
            ...

Three roles (:mod:`~sdd_search.data.splits`): ``train``; ``selection``, a stratified share of the
training data held out with a fixed seed, on which a search compares its trials; ``test``, the
dataset's own test split. The search stage trains on train and evaluates on selection, never
reading test; the final stage trains on train + selection and evaluates on test.
:func:`dataset_info` counts all three (:func:`role_counts` prints them on one line).

Two loaders behind the same small protocol (:class:`Loader`):

- :class:`ResidentLoader` (digits, cifar10/100, synthetic): the whole uint8 dataset lives on the
  device, moved once; each batch is one gather that selects, crops (padding) and flips, then one
  multiply-add that converts to float and normalises. No worker processes, no per-image Python,
  no host-device sync per batch.
- :class:`ImageFolderLoader` (imagefolder: ImageNet, CUB-200, the user's own folders): worker
  processes only read encoded file bytes; the main process decodes a whole batch at once with
  ``torchvision.io.decode_jpeg(..., device=device)`` (nvjpeg on CUDA), then random-resized-crops,
  flips and normalises on the device (on CUDA the whole batch's crops in a few batched kernels,
  made ahead of the training loop by a background thread).

Sharding: the epoch's permutation is a function of (seed, epoch) and identical on every rank;
rank r takes every world_size-th element starting at r. Train shards drop the tail so all ranks
run the same number of full batches; evaluation shards keep everything, so every evaluation image
is seen exactly once across ranks (ranks may differ by one batch; the trainer all-reduces counts).
Augmentation draws from a generator seeded by (seed, epoch, rank).

Modules: :mod:`~sdd_search.data.sources` (one table row per dataset and its readers),
:mod:`~sdd_search.data.splits` (the roles, stratified splits), :mod:`~sdd_search.data.builder` (the two
entry points), :mod:`~sdd_search.data.resident` and :mod:`~sdd_search.data.image_folder` (the
loaders), :mod:`~sdd_search.data.gpu_resize` (batched resizes), :mod:`~sdd_search.data.prefetch`
(the batch-making thread), :mod:`~sdd_search.data.sampling` (seeds, shards, augmentation draws),
:mod:`~sdd_search.data.transfer` (host-to-device copies, normalisation),
:mod:`~sdd_search.data.base` (the error, the info record, the loader protocol).
"""

from sdd_search.data.base import DatasetError, DatasetInfo, Loader, role_counts
from sdd_search.data.builder import build_datasets_and_loaders, dataset_info
from sdd_search.data.image_folder import ImageFolderLoader
from sdd_search.data.resident import ResidentLoader
from sdd_search.data.sources import DATASETS
from sdd_search.data.splits import SELECTION_SEED, STAGES, Stage, stratified_split

__all__ = [
    "DATASETS",
    "SELECTION_SEED",
    "STAGES",
    "DatasetError",
    "DatasetInfo",
    "ImageFolderLoader",
    "Loader",
    "ResidentLoader",
    "Stage",
    "build_datasets_and_loaders",
    "dataset_info",
    "role_counts",
    "stratified_split",
]
