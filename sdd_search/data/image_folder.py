"""The loader for image files (imagefolder: ImageNet, CUB-200, the user's own folders).

Worker processes only read encoded file bytes; the main process decodes a whole batch at once
with ``torchvision.io.decode_jpeg(..., device=device)`` (nvjpeg on CUDA), then random-resized-
crops, flips and normalises on the device (on CUDA the whole batch's crops in a few batched
kernels, :mod:`sdd_search.data.gpu_resize`, made ahead of the training loop by a background
thread, :mod:`sdd_search.data.prefetch`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sdd_search.data.base import DatasetError
from sdd_search.data.gpu_resize import resize_regions, resize_shorter_then_center
from sdd_search.data.prefetch import prefetched
from sdd_search.data.sampling import (
    AUGMENT_STREAM,
    check_rank,
    derive_seed,
    sample_flips,
    sample_resized_crop_boxes,
    seeded_generator,
    shard_indices,
)
from sdd_search.data.transfer import host_to_device, normalisation, to_normalised_float

__all__ = ["ImageFolderLoader"]

VAL_RESIZE_FRACTION = 0.875  # ImageNet convention: resize to S / 0.875, center-crop S


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
    """Yields this rank's indices for the current epoch (see :func:`shard_indices`), on the host."""

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
        return shard_indices(
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


def _is_jpeg(encoded: Tensor) -> bool:
    return encoded.numel() >= 2 and int(encoded[0]) == 0xFF and int(encoded[1]) == 0xD8


class ImageFolderLoader:
    """Batches from image files: workers read bytes, the main process decodes and augments.

    ``paths``/``labels`` list the files and their class indices. Training: shuffled per epoch,
    sharded with the tail dropped, RandomResizedCrop(image_size, scale (0.08, 1), ratio (3/4, 4/3))
    and a horizontal flip with probability 1/2. Evaluation: shorter side resized to
    ``int(image_size / 0.875)``, center crop ``image_size``. Greyscale and CMYK JPEGs decode to RGB;
    PNG files (some ImageNet "JPEG"s are) decode on the CPU. The resizes are torchvision's
    antialiased bilinear; with ``batched_resize`` (default: on CUDA) a batch's crops are resized
    together by a few batched matrix products (:func:`resize_regions`) instead of one resize per
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
        check_rank(rank, world_size)
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
        # prefetched); on the CPU it would only take cores from the step.
        self.prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        self.epoch = 0
        self._paths = list(paths)
        self._dataset = _EncodedImageFiles(self._paths, labels)
        self._sampler = _ShardSampler(
            len(self._paths), seed=seed, rank=rank, world_size=world_size, train=train
        )
        self._scale, self._shift = normalisation(mean, std, self.device)
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
            decoded[position] = host_to_device(image, self.device)
        return decoded  # type: ignore[return-value]

    def _augment(self, images: list[Tensor], generator: torch.Generator) -> Tensor:
        """Random-resized-crop and flip each image to uint8 ``B x 3 x S x S``."""
        import torchvision.transforms.v2.functional as TF

        heights = torch.tensor([image.shape[-2] for image in images], dtype=torch.int64)
        widths = torch.tensor([image.shape[-1] for image in images], dtype=torch.int64)
        # Crop boxes for the whole batch in one vectorised draw, on the host (no device sync).
        boxes = sample_resized_crop_boxes(heights, widths, generator)
        flips = sample_flips(len(images), generator)
        size = [self.image_size, self.image_size]

        box_list = boxes.tolist()

        def one(i: int) -> Tensor:
            top, left, height, width = box_list[i]
            return TF.resized_crop(images[i], top, left, height, width, size, antialias=True)

        if self.batched_resize:
            scales = boxes[:, 2:].to(torch.float64) / self.image_size
            plan = torch.cat([boxes.to(torch.float64), scales, torch.zeros_like(scales)], dim=1)
            return resize_regions(images, plan, flips, self.image_size, one)
        mirrored = flips.tolist()
        return torch.stack([one(i).flip(-1) if mirrored[i] else one(i) for i in range(len(images))])

    def _center(self, images: list[Tensor]) -> Tensor:
        """Resize shorter side to ``int(S / 0.875)`` and center-crop ``S``: uint8 ``B x 3 x S x S``."""
        import torchvision.transforms.v2.functional as TF

        resize_to = int(self.image_size / VAL_RESIZE_FRACTION)
        size = [self.image_size, self.image_size]

        def one(i: int) -> Tensor:
            return TF.center_crop(TF.resize(images[i], [resize_to], antialias=True), size)

        if self.batched_resize:
            plan = torch.tensor(
                [
                    resize_shorter_then_center(*image.shape[-2:], resize_to, self.image_size)
                    for image in images
                ],
                dtype=torch.float64,
            )
            flips = torch.zeros(len(images), dtype=torch.bool)
            return resize_regions(images, plan, flips, self.image_size, one)
        return torch.stack([one(i) for i in range(len(images))])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # The file-reading workers start (or, persistent, restart their epoch) here, in the
        # caller's thread: forked from the prefetch thread, a worker could inherit a lock that
        # another thread held at that moment and hang when it exits.
        files = iter(self._loader)
        batches = self._batches(files)
        return prefetched(batches, self.device) if self.prefetch else batches

    def _batches(self, files: Iterator) -> Iterator[tuple[Tensor, Tensor]]:
        # Crop parameters must be host ints for slicing, so they come from a CPU generator.
        generator = seeded_generator(
            torch.device("cpu"), derive_seed(AUGMENT_STREAM, self.seed, self.epoch, self.rank)
        )
        for encoded, labels, indices in files:
            images = self._decode(encoded, indices)
            batch = self._augment(images, generator) if self.train else self._center(images)
            images_out = to_normalised_float(batch, self._scale, self._shift, self.channels_last)
            yield images_out, labels.to(self.device, non_blocking=True)
