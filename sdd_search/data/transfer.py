"""Getting pixels to the device as the model wants them: an asynchronous host-to-device copy,
and uint8 -> normalised float32 in one pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def host_to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``, without waiting for the GPU.

    A plain ``.to("cuda")`` from pageable memory synchronises the stream: the loader would wait
    for the training step in flight, and the GPU would then idle while the next batch is made.
    From page-locked memory the copy is queued like a kernel (PyTorch keeps the pinned block
    until the copy has run).
    """
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def normalisation(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[Tensor, Tensor]:
    """(scale, shift), each float32 ``1 x C x 1 x 1``, with uint8 * scale + shift = (x/255-mean)/std.

    ``mean``/``std`` are per channel, in units of the [0, 1] pixel range.
    """
    mean_t = torch.tensor(mean, dtype=torch.float32)
    std_t = torch.tensor(std, dtype=torch.float32)
    scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1).to(device)
    shift = (-mean_t / std_t).view(1, -1, 1, 1).to(device)
    return scale, shift


def to_normalised_float(
    images: Tensor, scale: Tensor, shift: Tensor, channels_last: bool
) -> Tensor:
    """uint8 ``B x C x H x W`` -> normalised float32, converting layout in the same copy."""
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    out = images.to(dtype=torch.float32, memory_format=memory_format)
    # (x / 255 - mean) / std folded into x * scale + shift: two in-place passes, no temporaries.
    return out.mul_(scale).add_(shift)
