"""Seeds, shards and augmentation parameters: pure functions of a seed or a generator.

Sharding: the epoch's permutation is a function of (seed, epoch) and identical on every rank;
rank r takes every world_size-th element starting at r. Train shards drop the tail so all ranks
run the same number of full batches; evaluation shards keep everything, so every image is seen
exactly once across ranks. Augmentation draws from a generator seeded by (seed, epoch, rank).
Shuffling on CUDA and on CPU gives different (each reproducible) orders, since the two devices'
generators differ.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# Independent random streams drawn from one run seed.
SHUFFLE_STREAM = 0
AUGMENT_STREAM = 1

# torchvision's RandomResizedCrop defaults: area fraction, aspect ratio (width / height), tries.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integer parts, so that (1, 0) and (0, 1) give unrelated streams."""
    entropy = [part % (1 << 64) for part in parts]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator living on ``device`` (CUDA draws need a CUDA generator), seeded with ``seed``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def shard_indices(
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
        generator = seeded_generator(device, derive_seed(SHUFFLE_STREAM, seed, epoch))
        order = torch.randperm(num_samples, generator=generator, device=device)
    else:
        order = torch.arange(num_samples, device=device)
    if drop_last:
        per_rank = num_samples // world_size
        return order[rank : per_rank * world_size : world_size]
    return order[rank::world_size]


def sample_crop_offsets(n: int, pad: int, generator: torch.Generator) -> Tensor:
    """Top-left corners of ``n`` random crops from images zero-padded by ``pad`` pixels per side.

    Returns int64 ``n x 2`` (row, column), each uniform on 0..2*pad, on the generator's device.
    """
    return torch.randint(
        0, 2 * pad + 1, (n, 2), generator=generator, device=generator.device, dtype=torch.int64
    )


def sample_flips(n: int, generator: torch.Generator) -> Tensor:
    """``n`` fair coin flips (bool, True = mirror left-right) on the generator's device."""
    return torch.rand(n, generator=generator, device=generator.device) < 0.5


def sample_resized_crop_boxes(
    heights: Tensor,
    widths: Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = RRC_SCALE,
    ratio: tuple[float, float] = RRC_RATIO,
    attempts: int = RRC_ATTEMPTS,
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


def check_rank(rank: int, world_size: int) -> None:
    """Raise ValueError unless 0 <= rank < world_size (the process's place in a data-parallel job)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 for world_size {world_size}")
