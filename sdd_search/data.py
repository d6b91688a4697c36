"""Datasets and loaders that keep the accelerator fed.

One entry point for the trainer::

    info, train_loader, val_loader = build_datasets_and_loaders(
        "cifar100", root="/data", batch_size=64, device=torch.device("cuda"), seed=0,
        rank=rank, world_size=world_size,
    )
    for epoch in range(epochs):
        train_loader.set_epoch(epoch)        # order and augmentation = f(seed, epoch, rank)
        for images, labels in train_loader:  # float32 B x 3 x S x S normalised, int64 B; on device
            ...

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
run the same number of full batches; validation shards keep everything, so every validation image
is seen exactly once across ranks (ranks may differ by one batch; the trainer all-reduces counts).
Augmentation draws from a generator seeded by (seed, epoch, rank). Shuffling on CUDA and on CPU
gives different (each reproducible) orders, since the two devices' generators differ.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetInfo",
    "ImageFolderLoader",
    "Loader",
    "ResidentLoader",
    "build_datasets_and_loaders",
    "dataset_info",
]

DATASETS: tuple[str, ...] = ("digits", "cifar100", "cifar10", "imagefolder", "synthetic")

_CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
_CIFAR100_STD = (0.2673, 0.2564, 0.2762)
_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Synthetic images are half a class prototype, half uniform noise: mean 0.5, std about 0.2.
_SYNTHETIC_MEAN = (0.5, 0.5, 0.5)
_SYNTHETIC_STD = (0.2, 0.2, 0.2)

_DEFAULT_IMAGE_SIZE = {"digits": 16, "cifar100": 32, "cifar10": 32, "imagefolder": 224}
_DEFAULT_IMAGE_SIZE["synthetic"] = 32

_DIGITS_VAL_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0  # the split never depends on the run seed: every trial sees the same val set
_SYNTHETIC_DATA_SEED = 0

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_VAL_RESIZE_FRACTION = 0.875  # ImageNet convention: resize to S / 0.875, center-crop S
_RRC_SCALE = (0.08, 1.0)
_RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_RRC_ATTEMPTS = 10
# The batched resize (CUDA) pads a chunk of regions to its largest: regions over this many pixels
# on a side are resized image by image instead, and a chunk's canvas holds at most this many
# elements (its int64 gather index 8 bytes each), which bounds the memory of one chunk.
_BATCHED_MAX_SIDE = 512
_CANVAS_ELEMENTS = 1 << 25

_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message names the path and what was expected."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a schedule need to know about a dataset.

    ``image_size`` is the side in pixels of the square images the loaders yield; ``mean``/``std``
    are per channel, in units of the [0, 1] pixel range; ``num_train``/``num_val`` are totals
    over all ranks.
    """

    name: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_train: int
    num_val: int


@runtime_checkable
class Loader(Protocol):
    """What the trainer iterates: ``(images, labels)`` batches already on the target device.

    ``images`` is float32 ``B x 3 x S x S`` normalised with the dataset's mean/std (optionally
    channels_last strided); ``labels`` is int64 ``B``.
    """

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ----------------------------------------------------------------------------------------------
# Seeds, shards and augmentation parameters (pure functions of a generator; unit-tested directly)
# ----------------------------------------------------------------------------------------------


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integer parts, so that (1, 0) and (0, 1) give unrelated streams."""
    entropy = [part % (1 << 64) for part in parts]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator living on ``device`` (CUDA draws need a CUDA generator), seeded with ``seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _shard_indices(
    num_samples: int,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    shuffle: bool,
    drop_last: bool,
    device: torch.device,
) -> Tensor:
    """This rank's sample indices for one epoch, int64 on ``device``.

    The permutation depends on (seed, epoch) only, so the ranks' strided shares are disjoint.
    With ``drop_last`` every rank gets ``num_samples // world_size`` indices; without it the
    shares together cover every index exactly once.
    """
    if shuffle:
        generator = _generator(device, _derive_seed(_SHUFFLE_STREAM, seed, epoch))
        order = torch.randperm(num_samples, generator=generator, device=device)
    else:
        order = torch.arange(num_samples, device=device)
    if drop_last:
        per_rank = num_samples // world_size
        return order[rank : per_rank * world_size : world_size]
    return order[rank::world_size]


def _sample_crop_offsets(n: int, pad: int, generator: torch.Generator) -> Tensor:
    """Top-left corners of ``n`` random crops from images zero-padded by ``pad`` pixels per side.

    Returns int64 ``n x 2`` (row, column), each uniform on 0..2*pad, on the generator's device.
    """
    return torch.randint(
        0, 2 * pad + 1, (n, 2), generator=generator, device=generator.device, dtype=torch.int64
    )


def _sample_flips(n: int, generator: torch.Generator) -> Tensor:
    """``n`` fair coin flips (bool, True = mirror left-right) on the generator's device."""
    return torch.rand(n, generator=generator, device=generator.device) < 0.5


def _sample_resized_crop_boxes(
    heights: Tensor,
    widths: Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = _RRC_SCALE,
    ratio: tuple[float, float] = _RRC_RATIO,
    attempts: int = _RRC_ATTEMPTS,
) -> Tensor:
    """RandomResizedCrop boxes for a batch of images, vectorised over images and attempts.

    ``heights``/``widths`` are int64 ``n`` image sides in pixels. Follows torchvision's
    ``RandomResizedCrop.get_params``: up to ``attempts`` draws of an area fraction uniform in
    ``scale`` and a log-uniform aspect ratio (width / height) in ``ratio``; the first draw that fits
    is placed uniformly; if none fits, a center crop clamped to ``ratio``. All attempts are drawn
    at once (one call per batch instead of a Python loop per image).

    Returns int64 ``n x 4`` boxes (top, left, height, width) in pixels, on the generator's device.
    """
    device = generator.device
    n = heights.numel()
    height = heights.to(device=device, dtype=torch.float64)
    width = widths.to(device=device, dtype=torch.float64)
    area = height * width
    uniform = torch.rand((n, attempts, 4), generator=generator, device=device, dtype=torch.float64)
    target_area = area[:, None] * (scale[0] + (scale[1] - scale[0]) * uniform[..., 0])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * uniform[..., 1])
    crop_w = torch.round(torch.sqrt(target_area * aspect))
    crop_h = torch.round(torch.sqrt(target_area / aspect))
    fits = (crop_w > 0) & (crop_w <= width[:, None]) & (crop_h > 0) & (crop_h <= height[:, None])
    # argmax over a 0/1 tensor returns the first fitting attempt, as the sequential loop would.
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    chosen_w = crop_w.gather(1, first)[:, 0]
    chosen_h = crop_h.gather(1, first)[:, 0]
    placement = uniform.gather(1, first[..., None].expand(n, 1, 4))[:, 0, 2:]
    # floor(u * count) with u uniform on [0, 1) is uniform on 0..count-1, like torch.randint.
    top = torch.floor(placement[:, 0] * (height - chosen_h + 1))
    left = torch.floor(placement[:, 1] * (width - chosen_w + 1))

    in_ratio = width / height
    fallback_w = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fallback_h = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    fallback_top = torch.div(height - fallback_h, 2, rounding_mode="floor")
    fallback_left = torch.div(width - fallback_w, 2, rounding_mode="floor")

    boxes = torch.stack(
        [
            torch.where(found, top, fallback_top),
            torch.where(found, left, fallback_left),
            torch.where(found, chosen_h, fallback_h),
            torch.where(found, chosen_w, fallback_w),
        ],
        dim=1,
    )
    return boxes.to(torch.int64)


def _normalisation(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[Tensor, Tensor]:
    """(scale, shift), each float32 ``1 x C x 1 x 1``, with uint8 * scale + shift = (x/255-mean)/std."""
    mean_t = torch.tensor(mean, dtype=torch.float32)
    std_t = torch.tensor(std, dtype=torch.float32)
    scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1).to(device)
    shift = (-mean_t / std_t).view(1, -1, 1, 1).to(device)
    return scale, shift


def _to_normalised_float(
    images: Tensor, scale: Tensor, shift: Tensor, channels_last: bool
) -> Tensor:
    """uint8 ``B x C x H x W`` -> normalised float32, converting layout in the same copy."""
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    out = images.to(dtype=torch.float32, memory_format=memory_format)
    # (x / 255 - mean) / std folded into x * scale + shift: two in-place passes, no temporaries.
    return out.mul_(scale).add_(shift)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 for world_size {world_size}")


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------


class ResidentLoader:
    """Batches from a uint8 dataset held whole on the device, augmented on the device.

    ``images`` is uint8 ``N x C x H x W`` (any device; moved once), ``labels`` integer ``N``.
    Training (``train=True``): shuffled per epoch, sharded, tail dropped so every rank runs
    ``(N // world_size) // batch_size`` full batches; each image is randomly cropped back to
    ``H x W`` from its ``pad``-pixel zero-padded version and mirrored with probability 1/2 when
    ``flip``. Validation: in order, sharded without dropping, no augmentation.

    Yields float32 ``B x C x H x W`` images normalised with ``mean``/``std`` (given in [0, 1]
    pixel units) and int64 labels, both on ``device``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str,
        train: bool,
        pad: int = 0,
        flip: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        name: str = "dataset",
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"{name}: images must be uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{name}: {labels.numel()} labels for {images.shape[0]} images")
        if batch_size < 1:
            raise ValueError(f"{name}: batch_size must be at least 1, got {batch_size}")
        _check_rank(rank, world_size)
        self.device = torch.device(device)
        self.name = name
        self.batch_size = batch_size
        self.train = train
        self.pad = pad if train else 0
        self.flip = flip and train
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self.epoch = 0
        self.num_samples, channels, self.height, self.width = images.shape
        if self.pad:
            # Pad the stored dataset once (uint8, zeros like torchvision's RandomCrop): no per-batch pad.
            images = F.pad(images, (self.pad,) * 4)
        self._images = images.to(self.device).contiguous()
        self._labels = labels.to(device=self.device, dtype=torch.int64)
        self._scale, self._shift = _normalisation(mean, std, self.device)
        stored_h, stored_w = self._images.shape[2:]
        self._image_stride = channels * stored_h * stored_w
        self._row_stride = stored_w
        # Every crop of every image is an H x W window of the flat storage starting at
        # image * image_stride + top * row_stride + left; this overlapping strided view names all
        # of them, so a batch of crops is one indexing op with a B-long index (no per-pixel index).
        span = (channels - 1) * stored_h * stored_w + (self.height - 1) * stored_w + self.width
        flat = self._images.view(-1)
        self._windows = flat.as_strided(
            (flat.numel() - span + 1, channels, self.height, self.width),
            (1, stored_h * stored_w, stored_w, 1),
        )
        self._cols = torch.arange(self.width, device=self.device)
        self._cols_mirrored = self._cols.flip(0)
        if train and len(self) == 0:
            raise DatasetError(
                f"{name}: batch_size {batch_size} x world_size {world_size} exceeds the "
                f"{self.num_samples} training images; lower train.batch_size"
            )

    def __len__(self) -> int:
        if self.train:
            return (self.num_samples // self.world_size) // self.batch_size
        share = len(range(self.rank, self.num_samples, self.world_size))
        return math.ceil(share / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass's order and augmentation a pure function of (seed, epoch, rank)."""
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_epoch(int(state["epoch"]))

    def epoch_indices(self) -> Tensor:
        """The dataset indices this rank visits in the current epoch, in order (int64, device)."""
        indices = _shard_indices(
            self.num_samples,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            shuffle=self.train,
            drop_last=self.train,
            device=self.device,
        )
        if self.train:
            indices = indices[: len(self) * self.batch_size]
        return indices

    def _epoch_plan(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(indices, crop offsets ``n x 2`` or None, flips ``n`` or None) for the current epoch."""
        indices = self.epoch_indices()
        if not self.train:
            return indices, None, None
        generator = _generator(
            self.device, _derive_seed(_AUGMENT_STREAM, self.seed, self.epoch, self.rank)
        )
        # The whole epoch's random numbers in two calls instead of two per batch.
        offsets = _sample_crop_offsets(indices.numel(), self.pad, generator)
        flips = _sample_flips(indices.numel(), generator)
        if not self.flip:
            flips = torch.zeros_like(flips)
        return indices, offsets, flips

    def _gather_augmented(self, indices: Tensor, offsets: Tensor, flips: Tensor) -> Tensor:
        """uint8 ``B x C x H x W`` random crops (mirrored where ``flips``) of the padded images."""
        starts = indices * self._image_stride + offsets[:, 0] * self._row_stride + offsets[:, 1]
        crops = self._windows[starts]
        if not self.flip:
            return crops
        # Mirror by reading columns right to left where flipped: one gather, no mask, no sync.
        columns = torch.where(flips[:, None], self._cols_mirrored, self._cols)
        return crops.gather(3, columns[:, None, None, :].expand_as(crops))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        indices, offsets, flips = self._epoch_plan()
        batch = self.batch_size
        for number in range(len(self)):
            window = slice(number * batch, (number + 1) * batch)
            batch_indices = indices[window]
            if offsets is None or flips is None:
                images = self._images[batch_indices]
            else:
                images = self._gather_augmented(batch_indices, offsets[window], flips[window])
            images = _to_normalised_float(images, self._scale, self._shift, self.channels_last)
            yield images, self._labels[batch_indices]


class _EncodedImageFiles(torch.utils.data.Dataset):
    """Map-style dataset of raw file bytes: item i is (uint8 1-D tensor of the file, label, i)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int]) -> None:
        self.paths = list(paths)
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        # Workers only read bytes: decoding happens batched in the main process (nvjpeg on CUDA).
        data = np.fromfile(self.paths[index], dtype=np.uint8)
        return torch.from_numpy(data), self.labels[index], index


def _collate_encoded(items: list[tuple[Tensor, int, int]]) -> tuple[list[Tensor], Tensor, Tensor]:
    """Variable-length byte tensors stay a list; labels and indices become int64 tensors."""
    encoded = [item[0] for item in items]
    labels = torch.tensor([item[1] for item in items], dtype=torch.int64)
    indices = torch.tensor([item[2] for item in items], dtype=torch.int64)
    return encoded, labels, indices


class _ShardSampler(torch.utils.data.Sampler[int]):
    """Yields this rank's indices for the current epoch (see :func:`_shard_indices`), on the host."""

    def __init__(
        self, num_samples: int, *, seed: int, rank: int, world_size: int, train: bool
    ) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> Tensor:
        return _shard_indices(
            self.num_samples,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            shuffle=self.train,
            drop_last=self.train,
            device=torch.device("cpu"),
        )

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // self.world_size
        return len(range(self.rank, self.num_samples, self.world_size))


def _host_to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``, without waiting for the GPU.

    A plain ``.to("cuda")`` from pageable memory synchronises the stream: the loader would wait
    for the training step in flight, and the GPU would then idle while the next batch is made.
    From page-locked memory the copy is queued like a kernel (PyTorch keeps the pinned block
    until the copy has run).
    """
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _resize_weights(
    lengths: Tensor, scales: Tensor, starts: Tensor, size: int, span: int
) -> Tensor:
    """float32 ``n x size x span`` weights of the antialiased bilinear resize, one axis.

    Row ``j`` of matrix ``i`` takes output sample ``j`` from the first ``lengths[i]`` of ``span``
    input samples: the triangle filter centred at ``starts[i] + (j + 0.5) * scales[i]`` (input
    pixels per output pixel), widened to ``scales[i]`` when downscaling, cut at the input's edge
    and renormalised. This is PIL's and torchvision's ``antialias=True`` bilinear filter, so a
    batched matrix product gives what ``torchvision.transforms.v2.functional.resize`` gives.
    """
    device = lengths.device
    length = lengths.to(torch.float32)[:, None, None]
    scale = scales.to(torch.float32)[:, None, None]
    outputs = torch.arange(size, device=device, dtype=torch.float32)[None, :, None]
    centers = starts.to(torch.float32)[:, None, None] + (outputs + 0.5) * scale
    positions = torch.arange(span, device=device, dtype=torch.float32)[None, None, :] + 0.5
    weights = (1.0 - ((positions - centers) / scale.clamp(min=1.0)).abs()).clamp_(min=0.0)
    weights = weights * (positions < length)
    return weights / weights.sum(dim=-1, keepdim=True)


def _resize_chunk(
    out: Tensor,
    picks: list[int],
    images: list[Tensor],
    plan: Tensor,
    flips: Tensor,
    span: tuple[int, int],
    dtype: torch.dtype,
) -> None:
    """Resize one chunk of regions at once into ``out[picks]`` (see :func:`_resize_regions`).

    ``images``, ``plan`` (float64 ``n x 8`` on the host: region top, left, height, width; scales
    and starts, rows then columns) and ``flips`` are the chunk's. Every region is gathered into
    one ``n x C x Hc x Wc`` canvas (``span``), edge pixels repeated past its end; two batched
    matrix products with the per-image filter matrices (zero past each region, mirrored where
    ``flips``) resize them all, in ``dtype``. The per-image numbers reach the device in one
    asynchronous copy: nothing here waits for the GPU.
    """
    device = images[0].device
    size = out.shape[-1]
    channels = images[0].shape[0]
    span_h, span_w = span
    dims = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.float64)
    planes = dims[:, 0] * dims[:, 1]
    offsets = torch.cumsum(planes * channels, 0) - planes * channels
    # Every value is an integer below 2**53 or a float: one float64 table, one copy.
    host = torch.cat(
        [
            torch.stack([offsets, planes, dims[:, 1]], dim=1),
            plan,
            flips.to(torch.float64)[:, None],
            torch.tensor(picks, dtype=torch.float64)[:, None],
        ],
        dim=1,
    )
    table = _host_to_device(host, device)
    offset, plane, width, top, left, height, length = table[:, :7].to(torch.int64).unbind(1)
    scale_y, scale_x, start_y, start_x = table[:, 7:11].unbind(1)
    mirrored, where = table[:, 11] > 0.5, table[:, 12].to(torch.int64)
    flat = torch.cat([image.reshape(-1) for image in images])  # one copy of the whole batch
    rows = torch.minimum(torch.arange(span_h, device=device), height[:, None] - 1) + top[:, None]
    cols = torch.minimum(torch.arange(span_w, device=device), length[:, None] - 1) + left[:, None]
    chans = torch.arange(channels, device=device)
    index = (
        (offset[:, None] + chans[None, :] * plane[:, None])[:, :, None, None]
        + (rows * width[:, None])[:, None, :, None]
        + cols[:, None, None, :]
    )
    canvas = flat[index].to(dtype)
    weights_y = _resize_weights(height, scale_y, start_y, size, span_h)
    weights_x = _resize_weights(length, scale_x, start_x, size, span_w)
    weights_x = torch.where(mirrored[:, None, None], weights_x.flip(1), weights_x)
    resized = weights_y.to(dtype)[:, None] @ canvas @ weights_x.to(dtype).transpose(1, 2)[:, None]
    out.index_copy_(0, where, resized.float().round_().clamp_(0, 255).to(torch.uint8))


def _resize_regions(
    images: list[Tensor],
    plan: Tensor,
    flips: Tensor,
    size: int,
    one_by_one: Callable[[int], Tensor],
    dtype: torch.dtype | None = None,
) -> Tensor:
    """uint8 ``B x C x size x size``: a region of each image resized and mirrored, in a few ops.

    ``plan`` (float64 ``B x 8``, host) gives per image the region the filter may read (top, left,
    height, width, integers), the scales (input pixels per output pixel, rows then columns) and
    the starts (where output pixel 0's edge lies, in region pixels). A random-resized crop is its
    box with scales box/size and starts 0; resize-then-center-crop is the whole image with the
    resize's scales and the crop offset times them. ``flips`` (bool ``B``) mirrors left-right.
    Regions within ``_BATCHED_MAX_SIDE`` are sorted by area and resized in chunks of bounded
    memory, a constant number of kernels per chunk instead of several per image; larger ones go
    through ``one_by_one(i)`` (uint8 ``C x size x size``, not yet mirrored).

    ``dtype`` of the matrix products, default float16 on CUDA (it holds every uint8 value
    exactly and runs on the tensor cores; results within one grey level of float32's, as
    torchvision's own uint8 kernels are) and float32 elsewhere.
    """
    count = len(images)
    device = images[0].device
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    out = torch.empty((count, images[0].shape[0], size, size), dtype=torch.uint8, device=device)
    heights = plan[:, 2].to(torch.int64).tolist()
    widths = plan[:, 3].to(torch.int64).tolist()
    mirrored = flips.tolist()
    batched = []
    for i in range(count):
        if max(heights[i], widths[i]) <= _BATCHED_MAX_SIDE:
            batched.append(i)
        else:
            image = one_by_one(i)
            out[i] = image.flip(-1) if mirrored[i] else image
    batched.sort(key=lambda i: heights[i] * widths[i])
    channels = images[0].shape[0]
    start = 0
    while start < len(batched):
        end, span_h, span_w = start, 0, 0
        while end < len(batched):
            i = batched[end]
            grown_h, grown_w = max(span_h, heights[i]), max(span_w, widths[i])
            if end > start and (end - start + 1) * channels * grown_h * grown_w > _CANVAS_ELEMENTS:
                break
            end, span_h, span_w = end + 1, grown_h, grown_w
        chunk = batched[start:end]
        rows = torch.tensor(chunk, dtype=torch.int64)
        _resize_chunk(
            out, chunk, [images[i] for i in chunk], plan[rows], flips[rows], (span_h, span_w), dtype
        )
        start = end
    return out


def _resize_shorter_then_center(height: int, width: int, resize_to: int, size: int) -> list[float]:
    """The :func:`_resize_regions` plan row of torchvision's ``resize(resize_to)`` + ``center_crop(size)``."""
    # torchvision.transforms.v2.functional._geometry._compute_resized_output_size, then center_crop.
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize_to, int(resize_to * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    scale_h, scale_w = height / new_h, width / new_w
    return [0, 0, height, width, scale_h, scale_w, top * scale_h, left * scale_w]


def _is_jpeg(encoded: Tensor) -> bool:
    return encoded.numel() >= 2 and int(encoded[0]) == 0xFF and int(encoded[1]) == 0xD8


class ImageFolderLoader:
    """Batches from image files: workers read bytes, the main process decodes and augments.

    ``paths``/``labels`` list the files and their class indices. Training: shuffled per epoch,
    sharded with the tail dropped, RandomResizedCrop(image_size, scale (0.08, 1), ratio (3/4, 4/3))
    and a horizontal flip with probability 1/2. Validation: shorter side resized to
    ``int(image_size / 0.875)``, center crop ``image_size``. Greyscale and CMYK JPEGs decode to RGB;
    PNG files (some ImageNet "JPEG"s are) decode on the CPU. The resizes are torchvision's
    antialiased bilinear; with ``batched_resize`` (default: on CUDA) a batch's crops are resized
    together by a few batched matrix products (:func:`_resize_regions`) instead of one resize per
    image, which would leave the GPU waiting on Python at ImageNet rates. With ``prefetch``
    (default: on CUDA) a background thread makes batches ahead of the training loop.

    Yields float32 ``B x 3 x S x S`` normalised images and int64 labels on ``device``.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        *,
        batch_size: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 4,
        channels_last: bool = False,
        batched_resize: bool | None = None,
        prefetch: bool | None = None,
        name: str = "imagefolder",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"{name}: batch_size must be at least 1, got {batch_size}")
        _check_rank(rank, world_size)
        self.device = torch.device(device)
        self.name = name
        self.batch_size = batch_size
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        # CUDA resizes the whole batch in a few kernels (per-image resizes would leave the GPU
        # waiting on Python); the CPU's per-image uint8 kernels are faster than padded matrix
        # products there. Both give torchvision's antialiased resize, to within 1 grey level.
        self.batched_resize = (
            self.device.type == "cuda" if batched_resize is None else batched_resize
        )
        # On CUDA a background thread makes the next batches while the step runs (see
        # _prefetched); on the CPU it would only take cores from the step.
        self.prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        self.epoch = 0
        self._paths = list(paths)
        self._dataset = _EncodedImageFiles(self._paths, labels)
        self._sampler = _ShardSampler(
            len(self._paths), seed=seed, rank=rank, world_size=world_size, train=train
        )
        self._scale, self._shift = _normalisation(mean, std, self.device)
        self._loader = torch.utils.data.DataLoader(
            self._dataset,
            batch_size=batch_size,
            sampler=self._sampler,
            drop_last=train,
            collate_fn=_collate_encoded,
            num_workers=num_workers,
            # Page-locked byte buffers make the host-to-device copy of nvjpeg's input asynchronous.
            pin_memory=self.device.type == "cuda",
            # Keep workers alive across epochs: re-forking them costs seconds per epoch on ImageNet.
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
        )
        if train and len(self) == 0:
            raise DatasetError(
                f"{name}: batch_size {batch_size} x world_size {world_size} exceeds the "
                f"{len(self._paths)} training images; lower train.batch_size"
            )

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass's order and augmentation a pure function of (seed, epoch, rank)."""
        self.epoch = epoch
        self._sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_epoch(int(state["epoch"]))

    def epoch_indices(self) -> Tensor:
        """The file indices this rank visits in the current epoch, in order (int64, CPU)."""
        indices = self._sampler.indices()
        if self.train:
            indices = indices[: len(self) * self.batch_size]
        return indices

    def _decode(self, encoded: list[Tensor], indices: Tensor) -> list[Tensor]:
        """Decode a batch of files to uint8 ``3 x H x W`` tensors on the device."""
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        decoded: list[Tensor | None] = [None] * len(encoded)
        jpeg_positions = [i for i, data in enumerate(encoded) if _is_jpeg(data)]
        if jpeg_positions:
            try:
                # One batched call: on CUDA nvjpeg decodes the whole batch together.
                images = decode_jpeg(
                    [encoded[i] for i in jpeg_positions], mode=ImageReadMode.RGB, device=self.device
                )
                for position, image in zip(jpeg_positions, images, strict=True):
                    decoded[position] = image
            except RuntimeError:
                pass  # one bad or nvjpeg-unsupported file: decode the batch image by image below
        for position, data in enumerate(encoded):
            if decoded[position] is not None:
                continue
            try:
                image = decode_image(data, mode=ImageReadMode.RGB)
            except RuntimeError as error:
                path = self._paths[int(indices[position])]
                raise DatasetError(
                    f"{self.name}: cannot decode {path} (expected a JPEG or PNG image): {error}"
                ) from None
            decoded[position] = _host_to_device(image, self.device)
        return decoded  # type: ignore[return-value]

    def _augment(self, images: list[Tensor], generator: torch.Generator) -> Tensor:
        """Random-resized-crop and flip each image to uint8 ``B x 3 x S x S``."""
        import torchvision.transforms.v2.functional as TF

        heights = torch.tensor([image.shape[-2] for image in images], dtype=torch.int64)
        widths = torch.tensor([image.shape[-1] for image in images], dtype=torch.int64)
        # Crop boxes for the whole batch in one vectorised draw, on the host (no device sync).
        boxes = _sample_resized_crop_boxes(heights, widths, generator)
        flips = _sample_flips(len(images), generator)
        size = [self.image_size, self.image_size]

        box_list = boxes.tolist()

        def one(i: int) -> Tensor:
            top, left, height, width = box_list[i]
            return TF.resized_crop(images[i], top, left, height, width, size, antialias=True)

        if self.batched_resize:
            scales = boxes[:, 2:].to(torch.float64) / self.image_size
            plan = torch.cat([boxes.to(torch.float64), scales, torch.zeros_like(scales)], dim=1)
            return _resize_regions(images, plan, flips, self.image_size, one)
        mirrored = flips.tolist()
        return torch.stack([one(i).flip(-1) if mirrored[i] else one(i) for i in range(len(images))])

    def _center(self, images: list[Tensor]) -> Tensor:
        """Resize shorter side to ``int(S / 0.875)`` and center-crop ``S``: uint8 ``B x 3 x S x S``."""
        import torchvision.transforms.v2.functional as TF

        resize_to = int(self.image_size / _VAL_RESIZE_FRACTION)
        size = [self.image_size, self.image_size]

        def one(i: int) -> Tensor:
            return TF.center_crop(TF.resize(images[i], [resize_to], antialias=True), size)

        if self.batched_resize:
            plan = torch.tensor(
                [
                    _resize_shorter_then_center(*image.shape[-2:], resize_to, self.image_size)
                    for image in images
                ],
                dtype=torch.float64,
            )
            flips = torch.zeros(len(images), dtype=torch.bool)
            return _resize_regions(images, plan, flips, self.image_size, one)
        return torch.stack([one(i) for i in range(len(images))])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # The file-reading workers start (or, persistent, restart their epoch) here, in the
        # caller's thread: forked from the prefetch thread, a worker could inherit a lock that
        # another thread held at that moment and hang when it exits.
        files = iter(self._loader)
        batches = self._batches(files)
        return _prefetched(batches, self.device) if self.prefetch else batches

    def _batches(self, files: Iterator) -> Iterator[tuple[Tensor, Tensor]]:
        # Crop parameters must be host ints for slicing, so they come from a CPU generator.
        generator = _generator(
            torch.device("cpu"), _derive_seed(_AUGMENT_STREAM, self.seed, self.epoch, self.rank)
        )
        for encoded, labels, indices in files:
            images = self._decode(encoded, indices)
            batch = self._augment(images, generator) if self.train else self._center(images)
            images_out = _to_normalised_float(batch, self._scale, self._shift, self.channels_last)
            yield images_out, labels.to(self.device, non_blocking=True)


_PREFETCH_DEPTH = 2  # batches made ahead of the one in use


def _prefetched(
    batches: Iterator[tuple[Tensor, Tensor]], device: torch.device
) -> Iterator[tuple[Tensor, Tensor]]:
    """``batches``, made by a background thread up to ``_PREFETCH_DEPTH`` batches ahead.

    While the training thread launches a step, the next batches are decoded (nvjpeg's CPU stage
    and the file bytes wait outside the GIL) and augmented. On CUDA the thread works on its own
    stream; each batch comes with an event the consumer's stream waits on, and the batch's
    tensors are marked as used by that stream so their memory is not reused early. Errors are
    raised in the consumer; leaving the loop early stops the thread.
    """
    import contextlib
    import queue
    import threading

    ready: queue.Queue = queue.Queue(maxsize=_PREFETCH_DEPTH)
    stop = threading.Event()
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    finished = object()

    def hand_over(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        # A new thread starts on GPU 0: work (and pin memory) on the loader's GPU instead.
        cuda = (torch.cuda.device(device), torch.cuda.stream(stream)) if stream is not None else ()
        try:
            with contextlib.ExitStack() as context:
                for manager in cuda:
                    context.enter_context(manager)
                for images, labels in batches:
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not hand_over((images, labels, event)):
                        return
        except BaseException as error:  # noqa: BLE001 (re-raised in the consumer)
            hand_over(error)
            return
        hand_over(finished)

    thread = threading.Thread(target=produce, name="sdd-search-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is finished:
                return
            if isinstance(item, BaseException):
                # Raised without keeping it in this frame: the exception's traceback holds this
                # frame, and that cycle would keep the loader (and its worker processes) alive
                # until a garbage collection, whose DataLoader shutdown waits 5 s per worker.
                error, item = item, None
                try:
                    raise error
                finally:
                    del error
            images, labels, event = item
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                images.record_stream(current)
                labels.record_stream(current)
            yield images, labels
    finally:
        stop.set()
        thread.join()
        batches.close()  # an epoch left early: end its loader iteration here, not at collection


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


def _resize_uint8(images: Tensor, size: int, chunk: int = 4096) -> Tensor:
    """Bilinear (antialiased) resize of uint8 ``N x C x H x W`` to ``N x C x size x size``."""
    if images.shape[-2:] == (size, size):
        return images
    out = []
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].float()
        part = F.interpolate(
            part, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out.append(part.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: (float ``1797 x 8 x 8`` pixels in 0..16, int64 labels).

    Read straight from the CSV that ships inside scikit-learn, without importing it (importing
    scikit-learn takes seconds, and every trial's fresh worker process would pay them); falls
    back to ``sklearn.datasets.load_digits`` where that file is not found.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices: each class gives round(val_fraction * its size) to val."""
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(val_fraction * len(members)))
        val.append(rng.permutation(members)[:count])
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


@lru_cache(maxsize=4)
def _digits_arrays(image_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 digits as uint8 ``N x 3 x S x S`` + labels, split into (train, val).

    Returns (train_images, train_labels, val_images, val_labels). The 20% stratified validation
    split uses a fixed seed, independent of any run seed.
    """
    raw_images, raw_labels = _load_digits()
    pixels = torch.from_numpy(raw_images.astype(np.float32)) * (255.0 / 16.0)  # 0..16 -> 0..255
    pixels = F.interpolate(
        pixels[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    images = pixels.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(raw_labels)
    train_idx, val_idx = stratified_split(raw_labels, _DIGITS_VAL_FRACTION, _DIGITS_SPLIT_SEED)
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


def _digits_mean_std(train_images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of the digits training split, in [0, 1] pixel units."""
    values = train_images.float().div_(255.0)
    mean = values.mean(dim=(0, 2, 3)).tolist()
    std = values.std(dim=(0, 2, 3)).tolist()
    return tuple(round(m, 4) for m in mean), tuple(round(s, 4) for s in std)


def _synthetic_arrays(
    num_classes: int, size: int, image_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Learnable random data: each image is half its class's smooth prototype, half noise.

    Drawn from a fixed generator (independent of the run seed). Returns (train_images uint8
    ``size x 3 x S x S``, train_labels, val_images ``max(1, size // 4) x ...``, val_labels).
    """
    generator = torch.Generator().manual_seed(_SYNTHETIC_DATA_SEED)
    total = size + _synthetic_val_size(size)
    prototypes = torch.rand((num_classes, 3, 4, 4), generator=generator) * 255.0
    prototypes = F.interpolate(
        prototypes, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    labels = torch.randint(0, num_classes, (total,), generator=generator)
    noise = torch.rand((total, 3, image_size, image_size), generator=generator) * 255.0
    images = (0.5 * prototypes[labels] + 0.5 * noise).round_().clamp_(0, 255).to(torch.uint8)
    return images[:size], labels[:size], images[size:], labels[size:]


def _synthetic_val_size(size: int) -> int:
    return max(1, size // 4)


_CIFAR_LAYOUT = {
    # name: (folder, first training file, test file, number of classes, display name)
    "cifar100": ("cifar-100-python", "train", "test", 100, "CIFAR-100"),
    "cifar10": ("cifar-10-batches-py", "data_batch_1", "test_batch", 10, "CIFAR-10"),
}


def _cifar_folder_check(name: str, root: str | None) -> str:
    """The expected training file path; raises DatasetError when the data is absent."""
    folder, train_file, test_file, _, pretty = _CIFAR_LAYOUT[name]
    if root is None:
        raise DatasetError(
            f"{name}: data.root is not set; expected a folder holding {folder}/{train_file}; "
            "set data.root (and data.download: true to fetch it)"
        )
    expected = os.path.join(root, folder, train_file)
    for required in (train_file, test_file):
        if not os.path.isfile(os.path.join(root, folder, required)):
            raise DatasetError(
                f"{name}: no {pretty} data under {root} (expected {expected}); "
                "set data.download: true or point data.root at it"
            )
    return expected


def _load_cifar(
    name: str, root: str | None, download: bool, image_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CIFAR-10/100 as uint8 ``N x 3 x S x S`` + labels: (train, train labels, test, test labels).

    Files are read with torchvision's own CIFAR classes; the md5 check runs only when downloading
    (torchvision verifies the archive), so a hand-made or trimmed copy in the same format loads too.
    """
    from torchvision import datasets

    base = datasets.CIFAR100 if name == "cifar100" else datasets.CIFAR10
    if download and root is not None:
        try:
            _cifar_folder_check(name, root)
        except DatasetError:
            base(root, train=True, download=True)  # downloads, checks md5, extracts

    _cifar_folder_check(name, root)

    class _LocalCIFAR(base):  # type: ignore[valid-type, misc]
        # md5 None = existence check only (torchvision's check_integrity contract).
        train_list = [[file, None] for file, _ in base.train_list]
        test_list = [[file, None] for file, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    arrays = []
    for train in (True, False):
        try:
            dataset = _LocalCIFAR(root, train=train, download=False)
        except (
            RuntimeError,
            EOFError,
            KeyError,
            ValueError,
            OSError,
            pickle.UnpicklingError,
        ) as error:
            folder = _CIFAR_LAYOUT[name][0]
            raise DatasetError(
                f"{name}: cannot read the {_CIFAR_LAYOUT[name][4]} pickles under "
                f"{os.path.join(root, folder)} ({type(error).__name__}: {error})"
            ) from None
        images = (
            torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
        )
        arrays.append(_resize_uint8(images, image_size))
        arrays.append(torch.tensor(dataset.targets, dtype=torch.int64))
    return arrays[0], arrays[1], arrays[2], arrays[3]


def _list_images(folder: str) -> list[str]:
    return sorted(
        entry.path
        for entry in os.scandir(folder)
        if entry.is_file() and entry.name.lower().endswith(_IMAGE_SUFFIXES)
    )


def _scan_image_folder(
    root: str | None,
) -> tuple[list[str], list[str], list[int], list[str], list[int]]:
    """(classes, train paths, train labels, val paths, val labels) of ``root/{train,val}/<class>/``."""
    layout = "train/<class>/*.jpg and val/<class>/*.jpg"
    if root is None:
        raise DatasetError(f"imagefolder: data.root is not set; expected a folder with {layout}")
    train_dir = os.path.join(root, "train")
    val_dir = os.path.join(root, "val")
    for split_dir in (train_dir, val_dir):
        if not os.path.isdir(split_dir):
            raise DatasetError(f"imagefolder: no folder {split_dir} (expected {root}/{layout})")
    classes = sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir())
    if not classes:
        raise DatasetError(
            f"imagefolder: {train_dir} has no class folders (expected {root}/{layout})"
        )
    class_index = {name: i for i, name in enumerate(classes)}

    train_paths: list[str] = []
    train_labels: list[int] = []
    for name in classes:
        files = _list_images(os.path.join(train_dir, name))
        if not files:
            raise DatasetError(
                f"imagefolder: {os.path.join(train_dir, name)} holds no images (expected *.jpg files)"
            )
        train_paths += files
        train_labels += [class_index[name]] * len(files)

    val_paths: list[str] = []
    val_labels: list[int] = []
    for name in sorted(entry.name for entry in os.scandir(val_dir) if entry.is_dir()):
        if name not in class_index:
            raise DatasetError(
                f"imagefolder: {os.path.join(val_dir, name)} has no matching class folder in "
                f"{train_dir} (expected val/ classes to be a subset of train/ classes)"
            )
        files = _list_images(os.path.join(val_dir, name))
        val_paths += files
        val_labels += [class_index[name]] * len(files)
    if not val_paths:
        raise DatasetError(f"imagefolder: {val_dir} holds no images (expected {root}/{layout})")
    return classes, train_paths, train_labels, val_paths, val_labels


def _resolve_image_size(name: str, image_size: int | None) -> int:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    size = _DEFAULT_IMAGE_SIZE[name] if image_size is None else int(image_size)
    if size < 1:
        raise DatasetError(f"{name}: image_size must be a positive number of pixels, got {size}")
    return size


def dataset_info(
    name: str,
    root: str | None = None,
    image_size: int | None = None,
    *,
    synthetic_num_classes: int = 10,
    synthetic_size: int = 256,
) -> DatasetInfo:
    """Describe a dataset without building loaders.

    Cheap: digits and synthetic are computed exactly (the digits split takes milliseconds);
    cifar10/100 report the standard 50000/10000 split without reading the pickles
    (:func:`build_datasets_and_loaders` reports the counts it actually loaded); imagefolder
    lists the folders (no image is opened).
    """
    size = _resolve_image_size(name, image_size)
    if name == "digits":
        train_images, _, val_images, _ = _digits_arrays(size)
        mean, std = _digits_mean_std(train_images)
        return DatasetInfo(name, 10, size, 3, mean, std, len(train_images), len(val_images))
    if name in _CIFAR_LAYOUT:
        num_classes = _CIFAR_LAYOUT[name][3]
        mean, std = (
            (_CIFAR100_MEAN, _CIFAR100_STD) if name == "cifar100" else (_CIFAR10_MEAN, _CIFAR10_STD)
        )
        return DatasetInfo(name, num_classes, size, 3, mean, std, 50000, 10000)
    if name == "imagefolder":
        classes, train_paths, _, val_paths, _ = _scan_image_folder(root)
        return DatasetInfo(
            name,
            len(classes),
            size,
            3,
            _IMAGENET_MEAN,
            _IMAGENET_STD,
            len(train_paths),
            len(val_paths),
        )
    return DatasetInfo(
        name,
        synthetic_num_classes,
        size,
        3,
        _SYNTHETIC_MEAN,
        _SYNTHETIC_STD,
        synthetic_size,
        _synthetic_val_size(synthetic_size),
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
    synthetic_num_classes: int = 10,
    synthetic_size: int = 256,
) -> tuple[DatasetInfo, Loader, Loader]:
    """Load a dataset and return (info, train loader, val loader) for this rank.

    ``batch_size`` and ``eval_batch_size`` (default: ``batch_size``) are per rank, in images.
    ``image_size`` is the side in pixels of the yielded images (defaults: digits 16, cifar 32,
    synthetic 32, imagefolder 224). ``num_workers`` only applies to imagefolder (file-reading
    processes). ``download`` fetches CIFAR into ``root`` when it is missing (run it on one rank
    first in a multi-process job). Small datasets (digits, cifar, synthetic) live whole on
    ``device`` with padding-crop augmentation of ``image_size // 8`` pixels (2 for digits at 16,
    4 for CIFAR at 32) plus a horizontal flip, except for digits (not mirror-symmetric).
    """
    device = torch.device(device)
    size = _resolve_image_size(name, image_size)
    _check_rank(rank, world_size)
    eval_batch = batch_size if eval_batch_size is None else eval_batch_size
    common = {"seed": seed, "rank": rank, "world_size": world_size, "channels_last": channels_last}

    if name == "imagefolder":
        classes, train_paths, train_labels, val_paths, val_labels = _scan_image_folder(root)
        info = DatasetInfo(
            name,
            len(classes),
            size,
            3,
            _IMAGENET_MEAN,
            _IMAGENET_STD,
            len(train_paths),
            len(val_paths),
        )
        folder_args = {
            "image_size": size,
            "mean": info.mean,
            "std": info.std,
            "device": device,
            "num_workers": num_workers,
            "name": name,
            **common,
        }
        train_loader = ImageFolderLoader(
            train_paths, train_labels, batch_size=batch_size, train=True, **folder_args
        )
        val_loader = ImageFolderLoader(
            val_paths, val_labels, batch_size=eval_batch, train=False, **folder_args
        )
        return info, train_loader, val_loader

    flip = True
    if name == "digits":
        train_x, train_y, val_x, val_y = _digits_arrays(size)
        mean, std = _digits_mean_std(train_x)
        num_classes = 10
        flip = False  # a mirrored 2 is not a 2
    elif name in _CIFAR_LAYOUT:
        train_x, train_y, val_x, val_y = _load_cifar(name, root, download, size)
        num_classes = _CIFAR_LAYOUT[name][3]
        mean, std = (
            (_CIFAR100_MEAN, _CIFAR100_STD) if name == "cifar100" else (_CIFAR10_MEAN, _CIFAR10_STD)
        )
    else:
        train_x, train_y, val_x, val_y = _synthetic_arrays(
            synthetic_num_classes, synthetic_size, size
        )
        num_classes = synthetic_num_classes
        mean, std = _SYNTHETIC_MEAN, _SYNTHETIC_STD

    info = DatasetInfo(
        name, num_classes, size, 3, tuple(mean), tuple(std), len(train_x), len(val_x)
    )
    resident_args = {"mean": info.mean, "std": info.std, "device": device, "name": name, **common}
    train_loader = ResidentLoader(
        train_x,
        train_y,
        batch_size=batch_size,
        train=True,
        pad=max(1, size // 8),
        flip=flip,
        **resident_args,
    )
    val_loader = ResidentLoader(val_x, val_y, batch_size=eval_batch, train=False, **resident_args)
    return info, train_loader, val_loader
