"""Batched antialiased bilinear resizes of many image regions at once (the CUDA path).

torchvision resizes one image per call: several kernels and some Python per image, which leaves
a GPU waiting at ImageNet rates. Here a batch's regions (random-resized crops, or resize then
center crop) are gathered into padded canvases and resized by two batched matrix products with
per-image filter matrices: a constant number of kernels per chunk of images. The filters are
PIL's and torchvision's ``antialias=True`` bilinear, so the results equal torchvision's to within
one grey level.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sdd_search.data.transfer import host_to_device

# The batched resize pads a chunk of regions to its largest: regions over this many pixels on a
# side are resized image by image instead, and a chunk's canvas holds at most this many elements
# (its int64 gather index 8 bytes each), which bounds the memory of one chunk.
BATCHED_MAX_SIDE = 512
CANVAS_ELEMENTS = 1 << 25


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
    """Resize one chunk of regions at once into ``out[picks]`` (see :func:`resize_regions`).

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
    table = host_to_device(host, device)
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


def resize_regions(
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
    Regions within ``BATCHED_MAX_SIDE`` are sorted by area and resized in chunks of bounded
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
        if max(heights[i], widths[i]) <= BATCHED_MAX_SIDE:
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
            if end > start and (end - start + 1) * channels * grown_h * grown_w > CANVAS_ELEMENTS:
                break
            end, span_h, span_w = end + 1, grown_h, grown_w
        chunk = batched[start:end]
        rows = torch.tensor(chunk, dtype=torch.int64)
        _resize_chunk(
            out, chunk, [images[i] for i in chunk], plan[rows], flips[rows], (span_h, span_w), dtype
        )
        start = end
    return out


def resize_shorter_then_center(height: int, width: int, resize_to: int, size: int) -> list[float]:
    """The :func:`resize_regions` plan row of torchvision's ``resize(resize_to)`` + ``center_crop(size)``."""
    # torchvision.transforms.v2.functional._geometry._compute_resized_output_size, then center_crop.
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize_to, int(resize_to * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    scale_h, scale_w = height / new_h, width / new_w
    return [0, 0, height, width, scale_h, scale_w, top * scale_h, left * scale_w]
