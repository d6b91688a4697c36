"""Datasets and loaders: real on-disk fixtures (CIFAR pickles, JPEG folders), sharding, determinism,
and the augmentation samplers' distributions."""

from __future__ import annotations

import io
import itertools
import math
import pickle
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdd_search.config import DataConfig
from sdd_search.data import (
    DATASETS,
    DatasetError,
    DatasetInfo,
    ImageFolderLoader,
    Loader,
    ResidentLoader,
    build_datasets_and_loaders,
    dataset_info,
    gpu_resize,
    role_counts,
    sampling,
    stratified_split,
)
from sdd_search.data.sources import _load_digits

torch.set_num_threads(2)
CPU = torch.device("cpu")


def _all_batches(loader: Loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([images for images, _ in batches]), torch.cat(
        [labels for _, labels in batches]
    )


def _denormalise(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Normalised float batch -> pixel values 0..255 (float)."""
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return (images * std + mean) * 255.0


# ----------------------------------------------------------------------------------------------
# On-disk fixtures
# ----------------------------------------------------------------------------------------------


def _write_cifar_pickle(path: Path, entry: dict) -> None:
    # The real files are protocol-2 pickles; torchvision reads them with encoding="latin1", under
    # which their (Python 2 str) keys come back as str: "data", "fine_labels", ...
    with open(path, "wb") as handle:
        pickle.dump(entry, handle, protocol=2)


@pytest.fixture
def cifar100_root(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    """A 50-train / 20-test CIFAR-100 in the on-disk layout of cifar-100-python.tar.gz."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    entries = {}
    for split, count in (("train", 50), ("test", 20)):
        fine = rng.integers(0, 100, count).tolist()
        entries[split] = {
            "filenames": [f"{split}_{i}.png" for i in range(count)],
            "batch_label": f"{split} batch 1 of 1",
            "fine_labels": fine,
            "coarse_labels": [label // 5 for label in fine],
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        }
        _write_cifar_pickle(folder / split, entries[split])
    meta = {
        "fine_label_names": [f"fine_{i}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i}" for i in range(20)],
    }
    _write_cifar_pickle(folder / "meta", meta)
    return tmp_path, entries


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


# Solid colours survive JPEG almost exactly, so a center crop's pixel values are predictable.
_CLASS_COLOURS = {"ant": (200, 30, 30), "bee": (30, 200, 30), "cat": (30, 30, 200)}


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 classes of real JPEGs of mixed sizes (40x30, 50x64), one greyscale, one PNG named .JPEG."""
    root = tmp_path / "images"
    sizes = [(40, 30), (50, 64), (40, 30), (50, 64)]  # PIL sizes are (width, height)
    for split, count in (("train", 4), ("val", 2)):
        for name, colour in _CLASS_COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = Image.new("RGB", sizes[i], colour)
                (folder / f"{name}_{i}.jpg").write_bytes(_jpeg_bytes(image))
    grey = Image.new("L", (48, 36), 128)
    (root / "train" / "bee" / "bee_grey.jpg").write_bytes(_jpeg_bytes(grey))
    # ImageNet holds a few PNG files with a .JPEG name; they must load too.
    Image.new("RGB", (33, 45), _CLASS_COLOURS["ant"]).save(
        root / "train" / "ant" / "ant_png.JPEG", "PNG"
    )
    (root / "train" / "ant" / "notes.txt").write_text("not an image: ignored")
    return root


# ----------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------


def test_digits_split_is_fixed_stratified_and_complete() -> None:
    # The final stage: all 1438 training images, evaluated on the fixed 20% test split.
    info, train_a, val_a = build_datasets_and_loaders(
        "digits", root=None, batch_size=64, device=CPU, seed=0, stage="final"
    )
    _, train_b, val_b = build_datasets_and_loaders(
        "digits", root=None, batch_size=64, device=CPU, seed=123, stage="final"
    )

    assert info == dataset_info("digits", stage="final")
    assert (info.num_train, info.num_test) == (1438, 359)
    assert info.num_train + info.num_test == 1797
    assert (info.num_classes, info.image_size, info.channels) == (10, 16, 3)
    images_a, labels_a = _all_batches(val_a)
    images_b, labels_b = _all_batches(val_b)
    assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    # Stratified: every class holds 20% of its images (rounded) in the test split.
    _, all_labels = _load_digits()
    per_class = np.bincount(all_labels, minlength=10)
    assert torch.bincount(labels_a, minlength=10).tolist() == np.round(0.2 * per_class).tolist()
    assert len(train_a) == 1438 // 64 and len(val_a) == math.ceil(359 / 64)


def test_digits_roles_count_train_selection_and_test() -> None:
    """Search: 80% of the training pool trains, 20% of it (stratified) is the selection split;
    the test split is the same 359 images as the final stage's."""
    info, train, selection = build_datasets_and_loaders(
        "digits", root=None, batch_size=64, device=CPU
    )
    assert (info.stage, info.num_train, info.num_selection, info.num_test) == (
        "search", 1150, 288, None,  # the search stage never opens the test split
    )  # fmt: skip
    assert info.num_eval == 288 and len(train) == 1150 // 64 and len(selection) == 5
    described = dataset_info("digits")
    assert described == replace(info, num_test=359)
    assert role_counts(described) == "train 1150 / selection 288 / test 359"
    assert role_counts(dataset_info("digits", stage="final")) == role_counts(described)
    assert role_counts(info) == "train 1150 / selection 288 / test not read"
    assert 1150 + 288 + 359 == 1797
    # A share of the training data other than the default.
    custom = dataset_info("digits", selection_fraction=0.5)
    assert (custom.num_train, custom.num_selection) == (719, 719)


def test_digits_are_scikit_learns_without_importing_it() -> None:
    # A fresh process (every trial's worker is one) reads the digits without importing
    # scikit-learn, and gets exactly sklearn.datasets.load_digits().
    code = (
        "import sys; from sdd_search.data.sources import _load_digits; images, labels = _load_digits(); "
        "print(images.shape, labels.shape, 'sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["(1797,", "8,", "8)", "(1797,)", "False"], out.stdout
    from sklearn.datasets import load_digits

    images, labels = _load_digits()
    digits = load_digits()
    np.testing.assert_array_equal(images, digits.images)
    np.testing.assert_array_equal(labels, digits.target)


def test_stratified_split_is_disjoint_complete_and_seeded() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 5, 1])
    train, val = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert np.bincount(labels[val], minlength=4).tolist() == [2, 4, 1, 0]
    again, val_again = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(val, val_again) and np.array_equal(train, again)
    assert not np.array_equal(val, stratified_split(labels, 0.2, seed=1)[1])


def test_stratified_split_holds_out_the_whole_share_within_one_image_per_class() -> None:
    # 100 classes of 1 image at 10%: per-class rounding would hold out none; 10 are held out.
    rng = np.random.default_rng(0)
    for labels, fraction in [
        (np.arange(100), 0.1),
        (rng.integers(0, 7, 500), 0.13),
        (np.repeat(np.arange(3), [5, 5, 4]), 0.1),
    ]:
        kept, held_out = stratified_split(labels, fraction, seed=3)
        assert len(held_out) == round(fraction * len(labels))
        assert not set(kept.tolist()) & set(held_out.tolist())
        for label in np.unique(labels):
            share = fraction * int((labels == label).sum())
            assert abs(int((labels[held_out] == label).sum()) - share) < 1


def test_digits_batches_are_shaped_and_normalised() -> None:
    info, train, val = build_datasets_and_loaders(
        "digits", root=None, batch_size=64, device=CPU, stage="final"
    )
    images, labels = next(iter(train))
    assert images.shape == (64, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (64,) and labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) <= 9

    val_images, val_labels = _all_batches(val)
    assert val_images.shape == (359, 3, 16, 16) and val_labels.shape == (359,)
    assert abs(float(val_images.mean())) < 0.1
    assert abs(float(val_images.std()) - 1.0) < 0.1
    pixels = _denormalise(val_images, info)
    assert float(pixels.min()) > -0.5 and float(pixels.max()) < 255.5
    assert torch.allclose(pixels, pixels.round(), atol=2e-3)  # exact uint8 values underneath


def test_digits_never_flips_and_crops_with_padding_two() -> None:
    _, train, _ = build_datasets_and_loaders("digits", root=None, batch_size=64, device=CPU)
    assert isinstance(train, ResidentLoader) and train.pad == 2 and not train.flip
    for epoch in range(3):
        train.set_epoch(epoch)
        _, offsets, flips = train._epoch_plan()
        assert not bool(flips.any())
        assert int(offsets.min()) == 0 and int(offsets.max()) == 4


def test_same_seed_and_epoch_reproduce_batches_and_other_epochs_differ() -> None:
    def first_batches(seed: int, epoch: int, rank: int = 0) -> list[torch.Tensor]:
        _, train, _ = build_datasets_and_loaders(
            "digits", root=None, batch_size=64, device=CPU, seed=seed, rank=rank, world_size=2
        )
        train.set_epoch(epoch)
        return [images for images, _ in itertools.islice(train, 3)]

    reference = first_batches(seed=1, epoch=3)
    assert all(torch.equal(a, b) for a, b in zip(reference, first_batches(1, 3), strict=True))
    assert not torch.equal(reference[0], first_batches(1, 4)[0])
    assert not torch.equal(reference[0], first_batches(2, 3)[0])
    assert not torch.equal(reference[0], first_batches(1, 3, rank=1)[0])


def test_state_dict_round_trip_resumes_the_same_epoch() -> None:
    _, train, _ = build_datasets_and_loaders(
        "synthetic", root=None, batch_size=32, device=CPU, seed=5
    )
    train.set_epoch(7)
    expected = next(iter(train))[0]
    _, restored, _ = build_datasets_and_loaders(
        "synthetic", root=None, batch_size=32, device=CPU, seed=5
    )
    restored.load_state_dict(train.state_dict())
    assert torch.equal(next(iter(restored))[0], expected)


# ----------------------------------------------------------------------------------------------
# The resident loader's vectorised crop + flip against a per-image reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
def test_resident_batches_equal_per_image_pad_crop_flip(channels_last: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 12, 12), dtype=torch.uint8, generator=generator)
    labels = torch.arange(40) % 7
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    loader = ResidentLoader(
        images, labels, batch_size=16, mean=mean, std=std, device=CPU, train=True,
        pad=3, flip=True, seed=9, channels_last=channels_last,
    )  # fmt: skip
    loader.set_epoch(2)
    indices, offsets, flips = loader._epoch_plan()
    batches = list(loader)
    assert len(batches) == 2 and flips.any() and not flips.all()

    padded = F.pad(images, (3, 3, 3, 3))
    mean_t, std_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    for position in range(32):
        top, left = offsets[position].tolist()
        crop = padded[int(indices[position]), :, top : top + 12, left : left + 12]
        if flips[position]:
            crop = crop.flip(-1)
        expected = (crop.float() / 255.0 - mean_t) / std_t
        batch_images, batch_labels = batches[position // 16]
        torch.testing.assert_close(batch_images[position % 16], expected, rtol=0, atol=1e-5)
        assert int(batch_labels[position % 16]) == int(labels[indices[position]])
    first = batches[0][0]
    assert first.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_crop_offsets_cover_zero_to_eight_uniformly_and_flips_are_fair() -> None:
    generator = torch.Generator().manual_seed(0)
    count = 90_000
    offsets = sampling.sample_crop_offsets(count, 4, generator)
    for axis in range(2):
        counts = torch.bincount(offsets[:, axis])
        assert counts.numel() == 9  # exactly the values 0..8
        assert int(counts.min()) > 0.9 * count / 9 and int(counts.max()) < 1.1 * count / 9
    flip_rate = float(sampling.sample_flips(count, generator).float().mean())
    assert abs(flip_rate - 0.5) < 0.05

    _, train, _ = build_datasets_and_loaders(
        "synthetic", root=None, batch_size=32, device=CPU, synthetic_size=2000
    )
    assert train.pad == 4
    _, offsets, flips = train._epoch_plan()
    assert sorted(offsets.unique().tolist()) == list(range(9))
    assert abs(float(flips.float().mean()) - 0.5) < 0.05


# ----------------------------------------------------------------------------------------------
# RandomResizedCrop parameters
# ----------------------------------------------------------------------------------------------


def test_resized_crop_boxes_stay_in_scale_ratio_and_image() -> None:
    generator = torch.Generator().manual_seed(0)
    heights = torch.randint(200, 600, (20_000,), generator=generator)
    widths = torch.randint(200, 600, (20_000,), generator=generator)
    boxes = sampling.sample_resized_crop_boxes(heights, widths, generator)
    top, left, height, width = boxes.unbind(1)
    assert bool((top >= 0).all() and (left >= 0).all())
    assert bool((top + height <= heights).all() and (left + width <= widths).all())
    assert bool((height > 0).all() and (width > 0).all())

    # Fallback boxes are centered and touch both sides along at least one axis.
    fallback = (
        ((height == heights) | (width == widths))
        & (top == (heights - height) // 2)
        & (left == (widths - width) // 2)
    )
    area_fraction = (height * width).double() / (heights * widths).double()
    aspect = width.double() / height.double()
    sampled = ~fallback
    # Rounding the sides to whole pixels moves area and ratio by at most about 1 pixel per side.
    assert float(area_fraction[sampled].min()) >= 0.08 * 0.98
    assert float(area_fraction.max()) <= 1.0
    assert float(aspect[sampled].min()) >= 0.75 * 0.98
    assert float(aspect[sampled].max()) <= (4 / 3) * 1.02
    # Both ends of the distribution are reached.
    assert float(area_fraction.min()) < 0.1 and float(area_fraction.max()) > 0.97


def test_resized_crop_boxes_match_torchvision_distribution_and_fallback() -> None:
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    image = torch.zeros(1, 60, 200)  # wide: about 40% of attempts do not fit
    reference = torch.tensor(
        [RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(2000)]
    ).double()
    generator = torch.Generator().manual_seed(1)
    ours = sampling.sample_resized_crop_boxes(
        torch.full((20_000,), 60), torch.full((20_000,), 200), generator
    ).double()
    for column in range(4):  # top, left, height, width: same means within sampling noise
        spread = float(reference[:, column].std()) / math.sqrt(2000)
        assert float(ours[:, column].mean()) == pytest.approx(
            float(reference[:, column].mean()), abs=5 * spread
        )

    # Images no crop can fit: torchvision's center fallback, clamped to the ratio range.
    for height, width in [(1, 100), (100, 1), (2, 2)]:
        expected = RandomResizedCrop.get_params(
            torch.zeros(1, height, width), [0.08, 1.0], [3 / 4, 4 / 3]
        )
        got = sampling.sample_resized_crop_boxes(
            torch.tensor([height]), torch.tensor([width]), generator
        )
        if height * width > 4:
            assert tuple(got[0].tolist()) == expected
        else:  # a 2x2 image can fit a crop; just check it is inside
            assert got[0, 2] <= 2 and got[0, 3] <= 2


# ----------------------------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------------------------


def test_cifar100_loads_from_real_pickle_format(cifar100_root: tuple[Path, dict]) -> None:
    root, entries = cifar100_root
    info, train, val = build_datasets_and_loaders(
        "cifar100", root=str(root), batch_size=16, device=CPU, download=False, stage="final"
    )
    assert (info.num_classes, info.image_size, info.num_train, info.num_test) == (100, 32, 50, 20)
    assert info.mean == (0.5071, 0.4865, 0.4409) and info.std == (0.2673, 0.2564, 0.2762)
    assert len(train) == 50 // 16
    images, labels = next(iter(train))
    assert images.shape == (16, 3, 32, 32) and labels.dtype == torch.int64
    assert set(labels.tolist()) <= set(entries["train"]["fine_labels"])

    val_images, val_labels = _all_batches(val)
    assert val_labels.tolist() == entries["test"]["fine_labels"]
    expected = torch.from_numpy(entries["test"]["data"]).view(20, 3, 32, 32).float()
    torch.testing.assert_close(_denormalise(val_images, info), expected, rtol=0, atol=1e-3)


def test_cifar100_missing_folder_names_the_expected_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as raised:
        build_datasets_and_loaders("cifar100", root=str(tmp_path), batch_size=16, device=CPU)
    message = str(raised.value)
    assert str(tmp_path / "cifar-100-python" / "train") in message
    assert "data.download: true" in message and "\n" not in message


def test_cifar100_corrupt_pickle_is_a_dataset_error(cifar100_root: tuple[Path, dict]) -> None:
    root, _ = cifar100_root
    (root / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="cifar-100-python"):
        build_datasets_and_loaders(
            "cifar100", root=str(root), batch_size=16, device=CPU, stage="final"
        )
    (root / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="cifar-100-python"):
        build_datasets_and_loaders("cifar100", root=str(root), batch_size=16, device=CPU)


class _Tripwire:
    """Unpickling this creates ``path``: proof that a file was opened and unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_search_stage_never_opens_cifars_test_batch(
    cifar100_root: tuple[Path, dict], tmp_path: Path
) -> None:
    root, entries = cifar100_root
    test_file = root / "cifar-100-python" / "test"
    opened = tmp_path / "test-batch-was-unpickled"
    test_file.write_bytes(pickle.dumps(_Tripwire(opened), protocol=2))
    info, train, selection = build_datasets_and_loaders(
        "cifar100", root=str(root), batch_size=8, device=CPU
    )
    assert not opened.exists()
    # 10% of the 50 training images, stratified: 5 held out for selection, none of them trained on.
    assert (info.num_train, info.num_selection, info.num_test) == (45, 5, None)
    _, selection_labels = _all_batches(selection)
    assert len(selection_labels) == 5
    assert set(selection_labels.tolist()) <= set(entries["train"]["fine_labels"])
    # Without the test batch at all, the search stage still builds; the final stage names it.
    test_file.unlink()
    build_datasets_and_loaders("cifar100", root=str(root), batch_size=8, device=CPU)
    with pytest.raises(DatasetError, match=re.escape(str(test_file))):
        build_datasets_and_loaders(
            "cifar100", root=str(root), batch_size=8, device=CPU, stage="final"
        )
    # Reading the test batch refuses the tripwire (the search stage's silence is meaningful),
    # and never runs it: batches are read by a restricted unpickler.
    test_file.write_bytes(pickle.dumps(_Tripwire(opened), protocol=2))
    with pytest.raises(DatasetError, match=f"{re.escape(str(test_file))}: not a plain-data"):
        build_datasets_and_loaders(
            "cifar100", root=str(root), batch_size=8, device=CPU, stage="final"
        )
    assert not opened.exists()


def test_cifar10_loads_five_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write_cifar_pickle(
            folder / name,
            {"batch_label": name, "labels": rng.integers(0, 10, 8).tolist(),
             "data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), "filenames": ["x.png"] * 8},
        )  # fmt: skip
    _write_cifar_pickle(folder / "batches.meta", {"label_names": [str(i) for i in range(10)]})
    info, train, val = build_datasets_and_loaders(
        "cifar10", root=str(tmp_path), batch_size=8, device=CPU, stage="final"
    )
    assert (info.num_classes, info.num_train, info.num_test) == (10, 40, 8)
    assert info.mean == (0.4914, 0.4822, 0.4465)
    assert len(train) == 5 and next(iter(val))[0].shape == (8, 3, 32, 32)


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------


def test_imagefolder_loads_jpegs_of_mixed_sizes_and_modes(image_folder: Path) -> None:
    info, train, val = build_datasets_and_loaders(
        "imagefolder",
        root=str(image_folder),
        batch_size=4,
        device=CPU,
        image_size=32,
        num_workers=0,
        stage="final",
    )
    assert info == dataset_info("imagefolder", str(image_folder), image_size=32, stage="final")
    assert (info.num_classes, info.num_train, info.num_test, info.image_size) == (3, 14, 6, 32)
    assert isinstance(train, ImageFolderLoader) and isinstance(train, Loader)
    assert len(train) == 14 // 4 and len(val) == 2

    batches = list(train)
    assert len(batches) == 3
    for images, labels in batches:
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1, 2}

    val_images, val_labels = _all_batches(val)
    assert val_labels.tolist() == [0, 0, 1, 1, 2, 2]  # sorted class folders: ant, bee, cat
    pixels = _denormalise(val_images, info)
    for image, label in zip(pixels, val_labels.tolist(), strict=True):
        colour = torch.tensor(list(_CLASS_COLOURS.values())[label], dtype=torch.float32)
        assert torch.allclose(image.mean(dim=(1, 2)), colour, atol=6.0)


def test_imagefolder_workers_shard_and_reproduce(image_folder: Path) -> None:
    def loaders(rank: int) -> tuple[Loader, Loader]:
        _, train, val = build_datasets_and_loaders(
            "imagefolder", root=str(image_folder), batch_size=3, device=CPU, image_size=32,
            num_workers=2, seed=4, rank=rank, world_size=2, stage="final",
        )  # fmt: skip
        return train, val

    (train0, val0), (train1, val1) = loaders(0), loaders(1)
    for loader in (train0, train1):
        loader.set_epoch(1)
    indices0, indices1 = train0.epoch_indices(), train1.epoch_indices()
    assert len(indices0) == len(indices1) == 6 and len(train0) == len(train1) == 2
    assert not set(indices0.tolist()) & set(indices1.tolist())
    assert sorted(val0.epoch_indices().tolist() + val1.epoch_indices().tolist()) == list(range(6))
    assert sum(len(labels) for loader in (val0, val1) for _, labels in loader) == 6

    first = [images for images, _ in train0]
    again = [images for images, _ in train0]  # same epoch again: identical crops and flips
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    train0.set_epoch(2)
    assert not torch.equal(first[0], next(iter(train0))[0])


def test_imagefolder_val_class_missing_from_train_is_an_error(image_folder: Path) -> None:
    (image_folder / "val" / "dog").mkdir()
    with pytest.raises(DatasetError) as raised:
        build_datasets_and_loaders(
            "imagefolder", root=str(image_folder), batch_size=4, device=CPU, num_workers=0,
            stage="final",
        )  # fmt: skip
    assert str(image_folder / "val" / "dog") in str(raised.value)
    with pytest.raises(DatasetError, match=re.escape(str(image_folder / "val" / "dog"))):
        dataset_info("imagefolder", str(image_folder))  # what --check runs: every role is listed
    # val/ is the test split here: the search stage does not list it.
    build_datasets_and_loaders(
        "imagefolder", root=str(image_folder), batch_size=4, device=CPU, num_workers=0
    )


def test_imagefolder_undecodable_file_names_the_path(image_folder: Path) -> None:
    broken = image_folder / "val" / "ant" / "ant_broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    _, _, val = build_datasets_and_loaders(
        "imagefolder",
        root=str(image_folder),
        batch_size=8,
        device=CPU,
        image_size=32,
        num_workers=0,
        stage="final",
    )
    with pytest.raises(DatasetError, match="ant_broken.jpg"):
        list(val)


def _smooth_images(sides: list[tuple[int, int]], seed: int) -> list[torch.Tensor]:
    """Photo-like uint8 RGB images: coarse noise blown up, so that resizes are not all aliasing."""
    import torchvision.transforms.v2.functional as TF

    generator = torch.Generator().manual_seed(seed)
    images = []
    for height, width in sides:
        coarse = torch.randint(
            0, 256, (3, max(height // 6, 2), max(width // 6, 2)), generator=generator
        )
        images.append(TF.resize(coarse.to(torch.uint8), [height, width], antialias=True))
    return images


def _bare_loader(image_size: int, batched: bool) -> ImageFolderLoader:
    """An ImageFolderLoader with just what its _augment and _center use (no files behind it)."""
    loader = ImageFolderLoader.__new__(ImageFolderLoader)
    loader.image_size, loader.batched_resize = image_size, batched
    return loader


def test_batched_resize_is_torchvisions_antialiased_resize(monkeypatch) -> None:
    """The GPU's batched crop + resize gives torchvision's float result, flips included; regions
    over the size cap go image by image; chunking the batch changes nothing."""
    import torchvision.transforms.v2.functional as TF

    size, cap = 48, 160
    resize_to = int(size / 0.875)
    # Up- and downscaling crops, odd shapes, and an image whose every crop is over the size cap.
    sides = [(30, 40), (75, 50), (140, 150), (61, 200), (17, 23), (150, 90), (900, 800), (90, 90)]
    monkeypatch.setattr(gpu_resize, "BATCHED_MAX_SIDE", cap)
    images = _smooth_images(sides, seed=0)
    loader = _bare_loader(size, batched=True)
    train = loader._augment(images, torch.Generator().manual_seed(7))
    val = loader._center(images)
    assert train.shape == val.shape == (len(sides), 3, size, size) and train.dtype == torch.uint8

    # The loader's draws, repeated: boxes, then flips, from the same generator.
    generator = torch.Generator().manual_seed(7)
    heights, widths = torch.tensor(sides).unbind(1)
    boxes = sampling.sample_resized_crop_boxes(heights, widths, generator).tolist()
    flips = sampling.sample_flips(len(sides), generator).tolist()
    assert any(flips) and not all(flips)

    def check(got: torch.Tensor, expected_float: torch.Tensor, expected_uint8, batched) -> None:
        if not batched:  # over the cap: torchvision's own (uint8) resize, exactly
            assert torch.equal(got, expected_uint8)
            return
        expected = expected_float.round().clamp(0, 255).to(torch.uint8)
        diff = (got.int() - expected.int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.005

    batched_counts = {"train": 0, "val": 0}
    for i, image in enumerate(images):
        top, left, height, width = boxes[i]
        crop = [top, left, height, width, [size, size]]
        expected_float = TF.resized_crop(image.float(), *crop, antialias=True)
        expected_uint8 = TF.resized_crop(image, *crop, antialias=True)
        if flips[i]:
            expected_float, expected_uint8 = expected_float.flip(-1), expected_uint8.flip(-1)
        in_batch = max(height, width) <= cap
        batched_counts["train"] += in_batch
        check(train[i], expected_float, expected_uint8, in_batch)

        def center(image: torch.Tensor) -> torch.Tensor:
            return TF.center_crop(TF.resize(image, [resize_to], antialias=True), [size, size])

        in_batch = max(image.shape[-2:]) <= cap
        batched_counts["val"] += in_batch
        check(val[i], center(image.float()), center(image), in_batch)
    assert 0 < batched_counts["train"] < len(sides) and 0 < batched_counts["val"] < len(sides)

    monkeypatch.setattr(gpu_resize, "CANVAS_ELEMENTS", 3 * 40 * 40)  # one region per chunk
    for again, before in (
        (loader._augment(images, torch.Generator().manual_seed(7)), train),
        (loader._center(images), val),
    ):
        diff = (again.int() - before.int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.001


def test_batched_resize_in_half_precision_stays_within_one_grey_level() -> None:
    """CUDA runs the batched resize's products in float16: one grey level at most from the
    float result, in fewer pixels than torchvision's own uint8 kernels differ from it."""
    import torchvision.transforms.v2.functional as TF

    size = 96
    sides = [tuple(side) for side in torch.randint(150, 260, (8, 2)).tolist()]
    images = _smooth_images(sides, seed=1)
    heights, widths = torch.tensor(sides).unbind(1)
    boxes = sampling.sample_resized_crop_boxes(heights, widths, torch.Generator().manual_seed(3))
    scales = boxes[:, 2:].to(torch.float64) / size
    plan = torch.cat([boxes.to(torch.float64), scales, torch.zeros_like(scales)], dim=1)
    no_flips = torch.zeros(len(sides), dtype=torch.bool)
    crops = [(image, box) for image, box in zip(images, boxes.tolist(), strict=True)]
    exact = torch.stack(
        [TF.resized_crop(im.float(), *box, [size, size], antialias=True) for im, box in crops]
    ).round()
    uint8 = torch.stack(
        [TF.resized_crop(im, *box, [size, size], antialias=True) for im, box in crops]
    )
    half = gpu_resize.resize_regions(images, plan, no_flips, size, None, dtype=torch.float16)
    half_diff = (half.int() - exact.int()).abs()
    uint8_off = float(((uint8.int() - exact.int()).abs() > 0).float().mean())
    assert int(half_diff.max()) <= 1
    assert float((half_diff > 0).float().mean()) < min(0.1, uint8_off)


def test_imagefolder_batched_resize_matches_the_per_image_path(image_folder: Path) -> None:
    def loaders(batched: bool | None) -> tuple[ImageFolderLoader, ImageFolderLoader]:
        _, train, val = build_datasets_and_loaders(
            "imagefolder", root=str(image_folder), batch_size=4, device=CPU, image_size=32,
            num_workers=0, seed=2,
        )  # fmt: skip
        if batched is not None:
            train.batched_resize = val.batched_resize = batched
        return train, val

    default_train, default_val = loaders(None)
    assert not default_train.batched_resize and not default_val.batched_resize  # CPU: per image
    for per_image, batched in zip(loaders(False), loaders(True), strict=True):
        per_image.set_epoch(3)
        batched.set_epoch(3)
        (images_a, labels_a), (images_b, labels_b) = _all_batches(per_image), _all_batches(batched)
        assert torch.equal(labels_a, labels_b)
        pixels_a = _denormalise(images_a, dataset_info("imagefolder", str(image_folder)))
        pixels_b = _denormalise(images_b, dataset_info("imagefolder", str(image_folder)))
        assert float((pixels_a - pixels_b).abs().max()) <= 1.01  # one grey level


def _prefetch_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "sdd-search-prefetch" and t.is_alive()]


def test_imagefolder_prefetch_thread_yields_the_same_batches_and_errors(image_folder: Path) -> None:
    """The background batch maker (CUDA's default) changes nothing but when batches are made:
    same batches in the same order, a bad file still raises its error in the training loop,
    and leaving an epoch early stops the thread."""

    def loaders(prefetch: bool) -> tuple[ImageFolderLoader, ImageFolderLoader]:
        _, train, val = build_datasets_and_loaders(
            "imagefolder", root=str(image_folder), batch_size=3, device=CPU, image_size=32,
            num_workers=1, seed=5, stage="final",
        )  # fmt: skip
        assert not train.prefetch and not val.prefetch  # the CPU default
        train.prefetch = val.prefetch = prefetch
        return train, val

    (plain_train, plain_val), (ahead_train, ahead_val) = loaders(False), loaders(True)
    for epoch in (0, 1):
        for plain, ahead in ((plain_train, ahead_train), (plain_val, ahead_val)):
            plain.set_epoch(epoch)
            ahead.set_epoch(epoch)
            expected, got = list(plain), list(ahead)
            assert len(got) == len(expected) == len(plain) > 1
            for (images_a, labels_a), (images_b, labels_b) in zip(expected, got, strict=True):
                assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    assert not _prefetch_threads()

    batches = iter(ahead_train)
    next(batches)
    assert _prefetch_threads()  # making the next ones
    batches.close()  # what leaving a for loop early does
    assert not _prefetch_threads()

    (image_folder / "val" / "ant" / "ant_broken.jpg").write_bytes(b"\xff\xd8 truncated")
    _, broken = loaders(True)
    with pytest.raises(DatasetError, match="ant_broken.jpg"):
        list(broken)
    assert not _prefetch_threads()


def test_imagefolder_missing_root_layout_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "train"))):
        dataset_info("imagefolder", str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Sharding, synthetic data, argument errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_two_ranks_split_train_disjointly_and_cover_val_once(name: str) -> None:
    shards = [
        build_datasets_and_loaders(
            name,
            root=None,
            batch_size=32,
            device=CPU,
            seed=3,
            rank=rank,
            world_size=2,
            synthetic_size=301,
        )
        for rank in range(2)
    ]
    info = shards[0][0]
    train_indices = []
    for _, train, _ in shards:
        train.set_epoch(5)
        train_indices.append(set(train.epoch_indices().tolist()))
    assert len(train_indices[0]) == len(train_indices[1]) == len(shards[0][1]) * 32
    assert len(shards[0][1]) == len(shards[1][1]) == (info.num_train // 2) // 32
    assert not train_indices[0] & train_indices[1]

    val_indices = [index for _, _, val in shards for index in val.epoch_indices().tolist()]
    assert sorted(val_indices) == list(range(info.num_eval))
    seen = sum(len(labels) for _, _, val in shards for _, labels in val)
    assert seen == info.num_eval


def test_synthetic_dataset_sizes_and_info() -> None:
    info, train, val = build_datasets_and_loaders(
        "synthetic",
        root=None,
        batch_size=50,
        device=CPU,
        synthetic_num_classes=5,
        synthetic_size=200,
        stage="final",
    )
    described = dataset_info(
        "synthetic", synthetic_num_classes=5, synthetic_size=200, stage="final"
    )
    assert info == described
    assert (info.num_classes, info.image_size, info.num_train, info.num_test) == (5, 32, 200, 50)
    assert role_counts(info) == "train 160 / selection 40 / test 50"
    images, labels = next(iter(train))
    assert images.shape == (50, 3, 32, 32) and int(labels.max()) < 5
    assert isinstance(train, Loader) and isinstance(val, Loader)


def test_argument_errors_are_one_line_messages() -> None:
    with pytest.raises(DatasetError, match="expected one of"):
        build_datasets_and_loaders("mnist", root=None, batch_size=8, device=CPU)
    with pytest.raises(DatasetError, match="batch_size 2000"):
        build_datasets_and_loaders("digits", root=None, batch_size=2000, device=CPU)
    with pytest.raises(ValueError, match="rank 2"):
        build_datasets_and_loaders(
            "digits", root=None, batch_size=8, device=CPU, rank=2, world_size=2
        )
    assert set(DATASETS) == {"digits", "cifar100", "cifar10", "imagefolder", "synthetic"}


# ----------------------------------------------------------------------------------------------
# Roles: train, selection (held out of the training data), test
# ----------------------------------------------------------------------------------------------


def _stored_images(loader: ResidentLoader) -> list[bytes]:
    """Each image the loader holds, unpadded and unaugmented, as bytes (one key per image)."""
    pad = loader.pad
    images = loader._images[:, :, pad : pad + loader.height, pad : pad + loader.width]
    return [image.numpy().tobytes() for image in images]


def test_selection_is_held_out_of_train_stratified_and_the_same_for_every_run() -> None:
    def build(stage: str, seed: int) -> tuple[DatasetInfo, ResidentLoader, ResidentLoader]:
        return build_datasets_and_loaders(
            "synthetic", root=None, batch_size=16, device=CPU, seed=seed, stage=stage,
            synthetic_num_classes=7, synthetic_size=300,
        )  # fmt: skip

    info, train, selection = build("search", seed=0)
    _, train_again, selection_again = build("search", seed=41)
    final_info, all_train, test = build("final", seed=0)
    train_keys, selection_keys = _stored_images(train), _stored_images(selection)
    assert (info.num_train, info.num_selection) == (240, 60) and final_info.num_train == 300
    # Disjoint, and together exactly the final stage's training data; test is neither.
    assert not set(train_keys) & set(selection_keys)
    assert sorted(train_keys + selection_keys) == sorted(_stored_images(all_train))
    assert not set(_stored_images(test)) & set(_stored_images(all_train))
    assert test.num_samples == final_info.num_test == 75
    # The same selection split whatever the run seed, call after call.
    images, labels = _all_batches(selection)
    for other in (selection_again, build("search", seed=0)[2]):
        other_images, other_labels = _all_batches(other)
        assert torch.equal(images, other_images) and torch.equal(labels, other_labels)
    assert _stored_images(train_again) == train_keys
    # Stratified: each class gives 20% of its training images, to within one image.
    per_class = torch.bincount(all_train._labels, minlength=7).double()
    held_out = torch.bincount(labels, minlength=7).double()
    assert float((held_out - 0.2 * per_class).abs().max()) < 1


def test_imagefolder_selection_comes_out_of_train_without_listing_val(image_folder: Path) -> None:
    def build(stage: str, **kwargs) -> tuple[DatasetInfo, ImageFolderLoader, ImageFolderLoader]:
        return build_datasets_and_loaders(
            "imagefolder", root=str(image_folder), batch_size=2, device=CPU, num_workers=0,
            image_size=32, stage=stage, **kwargs,
        )  # fmt: skip

    info, train, selection = build("search", selection_fraction=0.3)
    final_info, all_train, test = build("final", selection_fraction=0.3)
    # 30% of 14 (ant 5, bee 5, cat 4): 4 held out, each class 1 or 2.
    assert (info.num_train, info.num_selection, info.num_test) == (10, 4, None)
    assert (final_info.num_train, final_info.num_test) == (14, 6)
    assert not set(train._paths) & set(selection._paths)
    assert sorted(train._paths + selection._paths) == sorted(all_train._paths)
    assert all("/train/" in path for path in selection._paths)
    assert all("/val/" in path for path in test._paths)
    assert selection._paths == build("search", selection_fraction=0.3, seed=9)[2]._paths
    _, labels = _all_batches(selection)
    assert sorted(torch.bincount(labels, minlength=3).tolist()) == [1, 1, 2]
    assert role_counts(dataset_info("imagefolder", str(image_folder), selection_fraction=0.3)) == (
        "train 10 / selection 4 / test 6"
    )


def test_imagefolder_with_val_and_test_uses_val_for_selection(image_folder: Path) -> None:
    for name, colour in _CLASS_COLOURS.items():
        folder = image_folder / "test" / name
        folder.mkdir(parents=True)
        (folder / f"{name}_test.jpg").write_bytes(_jpeg_bytes(Image.new("RGB", (36, 36), colour)))

    def build(stage: str) -> tuple[DatasetInfo, ImageFolderLoader, ImageFolderLoader]:
        return build_datasets_and_loaders(
            "imagefolder", root=str(image_folder), batch_size=2, device=CPU, num_workers=0,
            image_size=32, stage=stage, selection_fraction=0.5,  # not used: val/ is selection
        )  # fmt: skip

    info, train, selection = build("search")
    assert (info.num_train, info.num_selection, info.num_test) == (14, 6, None)
    assert all("/train/" in path for path in train._paths)
    assert sorted(selection._paths) == sorted(str(p) for p in (image_folder / "val").rglob("*.jpg"))
    final_info, all_train, test = build("final")
    assert (final_info.num_train, final_info.num_selection, final_info.num_test) == (20, 6, 3)
    assert sorted(all_train._paths) == sorted(train._paths + selection._paths)
    assert all("/test/" in path for path in test._paths)
    assert final_info == dataset_info(
        "imagefolder", str(image_folder), image_size=32, stage="final"
    )
    # The search stage does not list test/: a class there that train/ lacks goes unnoticed
    # until a stage (or --check's dataset_info) reads it.
    (image_folder / "test" / "dog").mkdir()
    build("search")
    with pytest.raises(DatasetError, match=re.escape(str(image_folder / "test" / "dog"))):
        build("final")
    with pytest.raises(DatasetError, match=re.escape(str(image_folder / "test" / "dog"))):
        dataset_info("imagefolder", str(image_folder))


def test_selection_fraction_and_stage_are_checked() -> None:
    for bad in (0, 1, 1.5, -0.2):
        with pytest.raises(ValueError, match="selection_fraction"):
            DataConfig(selection_fraction=bad)
    with pytest.raises(ValueError, match="stage"):
        DataConfig(stage="test")
    assert DataConfig().stage == "search" and DataConfig().selection_fraction is None
    assert DataConfig(selection_fraction=0.25, stage="final").selection_fraction == 0.25
    with pytest.raises(DatasetError, match="selection_fraction must be between 0 and 1"):
        build_datasets_and_loaders(
            "digits", root=None, batch_size=8, device=CPU, selection_fraction=1.0
        )
    with pytest.raises(DatasetError, match="selection split is empty"):
        dataset_info("synthetic", synthetic_size=8, selection_fraction=0.05)
    with pytest.raises(DatasetError, match="stage must be one of search, final"):
        build_datasets_and_loaders("digits", root=None, batch_size=8, device=CPU, stage="test")
