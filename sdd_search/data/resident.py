"""The loader for datasets small enough to live whole on the device (digits, CIFAR, synthetic).

The uint8 dataset is moved to the device once; each batch is one gather that selects, crops
(padding) and flips, then one multiply-add that converts to float and normalises. No worker
processes, no per-image Python, no host-device sync per batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sdd_search.data.base import DatasetError
from sdd_search.data.sampling import (
    AUGMENT_STREAM,
    check_rank,
    derive_seed,
    sample_crop_offsets,
    sample_flips,
    seeded_generator,
    shard_indices,
)
from sdd_search.data.transfer import normalisation, to_normalised_float

__all__ = ["ResidentLoader"]


class ResidentLoader:
    """Batches from a uint8 dataset held whole on the device, augmented on the device.

    ``images`` is uint8 ``N x C x H x W`` (any device; moved once), ``labels`` integer ``N``.
    Training (``train=True``): shuffled per epoch, sharded, tail dropped so every rank runs
    ``(N // world_size) // batch_size`` full batches; each image is randomly cropped back to
    ``H x W`` from its ``pad``-pixel zero-padded version and mirrored with probability 1/2 when
    ``flip``. Evaluation (selection or test): in order, sharded without dropping, no augmentation.

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
        check_rank(rank, world_size)
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
        self._scale, self._shift = normalisation(mean, std, self.device)
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
        indices = shard_indices(
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
        generator = seeded_generator(
            self.device, derive_seed(AUGMENT_STREAM, self.seed, self.epoch, self.rank)
        )
        # The whole epoch's random numbers in two calls instead of two per batch.
        offsets = sample_crop_offsets(indices.numel(), self.pad, generator)
        flips = sample_flips(indices.numel(), generator)
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
            images = to_normalised_float(images, self._scale, self._shift, self.channels_last)
            yield images, self._labels[batch_indices]
