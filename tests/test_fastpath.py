"""The fast path gives the same numbers as the plain one.

1. The fused training step (teacher + student + CE + SDD in one module) matches a plain eager
   step written out by hand, and still does when torch.compile'd, in fp32 and under bf16
   autocast with channels_last (bf16-level tolerance).
2. The on-device augmentation of :class:`ResidentLoader` is distributed like torchvision's
   ``RandomCrop(32, padding=4) + RandomHorizontalFlip()``: each crop offset and flip is read back
   from the loader's actual output pixels of a marker image.

Compiling on a CPU runs gcc (about a minute per graph on 2 cores with a cold inductor cache,
seconds with a warm one); ``SDD_SKIP_COMPILE_TESTS=1`` skips just the compiled cases.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from sdd_search.config import DistillConfig
from sdd_search.data import ResidentLoader, build_datasets_and_loaders
from sdd_search.models import create_model
from sdd_search.sdd import sdd_loss
from sdd_search.step import SUM_COLUMNS, named_sums
from sdd_search.train import DistillationStep, StudentWithCells

skip_compile = pytest.mark.skipif(
    os.environ.get("SDD_SKIP_COMPILE_TESTS") == "1",
    reason="SDD_SKIP_COMPILE_TESTS=1: torch.compile on CPU is slow with a cold cache",
)

NUM_CLASSES = 10
SCALES = (1, 2, 4)
DISTILL = DistillConfig(base="kd", scales=list(SCALES), temperature=4.0, ce_weight=0.5)


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _nets(channels_last: bool = False) -> tuple[StudentWithCells, StudentWithCells]:
    torch.manual_seed(0)
    student = create_model("resnet8", num_classes=NUM_CLASSES)
    teacher = create_model("resnet8", num_classes=NUM_CLASSES)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    return StudentWithCells(student, SCALES).train(), StudentWithCells(teacher, SCALES).eval()


def _batch(channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, 16, 16, generator=generator)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, NUM_CLASSES, (16,), generator=generator)


def _plain_step_loss(student_net, teacher_net, images, labels, kd_scale: float) -> torch.Tensor:
    """The unfused eager step, written out: student, teacher, CE and SDD one after another."""
    logits, cells = student_net(images)
    with torch.no_grad():
        teacher_cells = teacher_net(images)[1]
    ce_loss = F.cross_entropy(logits.float(), labels)
    kd_loss = sdd_loss(cells, teacher_cells, labels, base="kd", temperature=4.0)
    return DISTILL.ce_weight * ce_loss + kd_scale * kd_loss


def _gradient(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def test_fused_eager_step_equals_plain_step(one_thread):
    student_net, teacher_net = _nets()
    images, labels = _batch()
    expected = _plain_step_loss(student_net, teacher_net, images, labels, 0.7)
    expected.backward()
    expected_grad = _gradient(student_net)
    student_net.zero_grad(set_to_none=True)

    step = DistillationStep(student_net, teacher_net, DISTILL)
    loss, sums = step(images, labels, torch.tensor(0.7))
    loss.backward()

    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(_gradient(student_net), expected_grad, rtol=0, atol=0)
    assert sums.shape == (len(SUM_COLUMNS),)
    totals = named_sums(sums)
    assert totals["loss"] == pytest.approx(loss.item() * 16, rel=1e-6)
    assert totals["seen"] == 16.0  # images seen


def test_fused_step_keeps_the_teacher_in_eval_mode():
    student_net, teacher_net = _nets()
    step = DistillationStep(student_net.eval(), teacher_net, DISTILL)
    assert step.train() is step
    assert student_net.training and not teacher_net.training


def test_fused_step_without_teacher_is_cross_entropy(one_thread):
    student_net, _ = _nets()
    images, labels = _batch()
    step = DistillationStep(student_net, None, DistillConfig(method="none", scales=[1, 2]))
    loss, sums = step(images, labels, torch.tensor(1.0))
    expected = F.cross_entropy(student_net(images)[0], labels)
    torch.testing.assert_close(loss, expected)
    assert named_sums(sums)["kd"] == 0.0  # no distillation term


@skip_compile
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_fused_step_matches_plain_eager_step(precision, one_thread):
    amp = precision == "bf16"
    torch._dynamo.reset()  # no graphs left over from other tests
    student_net, teacher_net = _nets(channels_last=amp)
    images, labels = _batch(channels_last=amp)
    expected = _plain_step_loss(student_net, teacher_net, images, labels, 0.7)
    expected.backward()
    expected_grad = _gradient(student_net)
    student_net.zero_grad(set_to_none=True)

    step = torch.compile(
        DistillationStep(student_net, teacher_net, DISTILL, amp=amp), dynamic=False
    )
    loss, _ = step(images, labels, torch.tensor(0.7))
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0)
    if not amp:  # the compiled backward, too (fp32: tight tolerance)
        loss.backward()
        torch.testing.assert_close(_gradient(student_net), expected_grad, rtol=1e-3, atol=1e-5)

    # kd_scale is a tensor input: a new warm-up value runs the same graph, no recompile.
    with torch._dynamo.config.patch(error_on_recompile=True):
        step(images, labels, torch.tensor(0.2))


# ----------------------------------------------------------------------------------------------
# Augmentation: the loader's output pixels against torchvision's transforms
# ----------------------------------------------------------------------------------------------

SIDE, PAD, SAMPLES = 32, 4, 4096
CENTER = SIDE // 2


def _marker_images(count: int) -> torch.Tensor:
    """uint8 count x 3 x 32 x 32: channel 0 = 1 + row, channel 1 = 1 + column, channel 2 = id.

    Zero padding reads as 0, so the pixel values give back where each output pixel came from.
    """
    rows = torch.arange(SIDE).view(SIDE, 1).expand(SIDE, SIDE)
    marker = torch.stack([1 + rows, 1 + rows.T, torch.zeros_like(rows)])
    images = marker.expand(count, 3, SIDE, SIDE).clone()
    images[:, 2] = (torch.arange(count) % 251).view(count, 1, 1)
    return images.to(torch.uint8)


def _expected_crop(image: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
    crop = F.pad(image, (PAD,) * 4)[:, top : top + SIDE, left : left + SIDE]
    return crop.flip(-1) if flip else crop


def _read_back(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left) offsets in the padded image and flips of uint8 B x 3 x 32 x 32 crops."""
    rows = images[:, 0].long()
    columns = images[:, 1].long()
    flips = columns[:, CENTER, CENTER + 1] < columns[:, CENTER, CENTER]
    top = rows[:, CENTER, CENTER] - 1 - CENTER + PAD
    # A mirrored crop's column CENTER holds the crop's column SIDE - 1 - CENTER.
    source_column = torch.where(flips, SIDE - 1 - CENTER, CENTER)
    left = columns[:, CENTER, CENTER] - 1 - source_column + PAD
    return top, left, flips


def _chi_square(counts_a: torch.Tensor, counts_b: torch.Tensor) -> float:
    """Two-sample chi-square statistic of homogeneity over the bins (empty bins skipped)."""
    a, b = counts_a.double(), counts_b.double()
    total = a + b
    keep = total > 0
    expected_a = total * a.sum() / total.sum()
    expected_b = total * b.sum() / total.sum()
    stat = (a - expected_a) ** 2 / expected_a + (b - expected_b) ** 2 / expected_b
    return float(stat[keep].sum())


def test_loader_augmentation_is_distributed_like_torchvision():
    from torchvision import transforms

    # The product's settings for 32-pixel resident datasets: 4-pixel padding and flips.
    _, product_loader, _ = build_datasets_and_loaders(
        "synthetic", root=None, batch_size=8, device="cpu", image_size=SIDE, synthetic_size=64
    )
    assert (product_loader.pad, product_loader.flip) == (PAD, True)

    markers = _marker_images(SAMPLES)
    labels = torch.arange(SAMPLES) % 251
    loader = ResidentLoader(
        markers,
        labels,
        batch_size=512,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        device="cpu",
        train=True,
        pad=product_loader.pad,
        flip=product_loader.flip,
        seed=3,
    )
    loader.set_epoch(1)
    batches = list(loader)
    output = torch.cat([images for images, _ in batches]).mul(255.0).round().to(torch.uint8)
    output_labels = torch.cat([batch_labels for _, batch_labels in batches])
    assert output.shape == (SAMPLES, 3, SIDE, SIDE)
    top, left, flips = _read_back(output)
    # Every output is exactly the crop its read-back offsets name, of the right image.
    assert torch.equal(output[:, 2, CENTER, CENTER].long(), output_labels)
    for index in range(0, SAMPLES, 97):
        image = markers[0].clone()
        image[2] = output_labels[index]  # the image id, as the label says
        expected = _expected_crop(image, int(top[index]), int(left[index]), bool(flips[index]))
        assert torch.equal(output[index], expected), f"output {index} is not a clean crop"

    torch.manual_seed(0)
    reference = transforms.Compose(
        [transforms.RandomCrop(SIDE, padding=PAD), transforms.RandomHorizontalFlip()]
    )
    torch_output = torch.stack([reference(markers[i]) for i in range(SAMPLES)])
    torch_top, torch_left, torch_flips = _read_back(torch_output)

    span = 2 * PAD + 1
    assert int(top.min()) == 0 and int(top.max()) == 2 * PAD
    assert int(left.min()) == 0 and int(left.max()) == 2 * PAD
    ours = torch.bincount(top * span + left, minlength=span * span)
    theirs = torch.bincount(torch_top * span + torch_left, minlength=span * span)
    # 81 offset cells: df 80, chi-square 0.999 quantile ~ 124.8 (seeds fixed: not flaky).
    assert _chi_square(ours, theirs) < 124.8
    expected_count = SAMPLES / (span * span)
    assert float(((ours - expected_count) ** 2 / expected_count).sum()) < 124.8  # vs uniform
    for rate in (flips.float().mean(), torch_flips.float().mean()):
        assert abs(float(rate) - 0.5) < 4 * (0.25 / SAMPLES) ** 0.5
    # Flips independent of the offset: the flip rate of the left and right halves agrees.
    left_half = flips[left < PAD].float().mean()
    right_half = flips[left > PAD].float().mean()
    assert abs(float(left_half - right_half)) < 0.06


def test_a_step_the_compiler_cannot_build_trains_eagerly_with_a_warning(one_thread):
    from sdd_search.train import compiled_or_eager

    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no C compiler on this node")  # what a missing toolchain looks like

    torch._dynamo.reset()
    student_net, teacher_net = _nets()
    images, labels = _batch()
    step = DistillationStep(student_net, teacher_net, DISTILL)
    expected, _ = step(images, labels, torch.tensor(0.7))
    step_fn = compiled_or_eager(step, lambda m: torch.compile(m, backend=broken_backend))
    with pytest.warns(RuntimeWarning, match="training eagerly"):
        loss, _ = step_fn(images, labels, torch.tensor(0.7))
    torch.testing.assert_close(loss, expected)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eager from now on: no second attempt, no new warning
        loss, _ = step_fn(images, labels, torch.tensor(0.7))
    torch.testing.assert_close(loss, expected)
    torch._dynamo.reset()
