"""Where each dataset comes from: one row per dataset in :data:`SOURCES`, and its readers.

A row holds what is fixed about a dataset (default image size, normalisation, whether a mirrored
image is still the same class, which loader serves it, the share of the training split held out
for selection) and the functions that read its roles (:mod:`sdd_search.data.splits`): ``digits``
(scikit-learn's bundled 8x8 handwritten digits, offline; a fixed 20 % of them is the test
split), ``cifar10``/``cifar100`` (the official pickle batches in a local folder, read by a
restricted unpickler: :mod:`~sdd_search.data.safe_pickle`), ``imagefolder``
(``root/{train,val}/<class>/`` image files, val/ the test split; with ``root/test/`` too, val/
is the selection split and test/ the test split) and ``synthetic`` (learnable random images, for
tests and benchmarks; a quarter as many test images again).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sdd_search.data import safe_pickle
from sdd_search.data.base import DatasetError
from sdd_search.data.splits import stratified_split

__all__ = ["DATASETS", "SOURCES", "DatasetSource", "SourceOptions", "Split", "mean_std"]

_CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
_CIFAR100_STD = (0.2673, 0.2564, 0.2762)
_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Synthetic images are half a class prototype, half uniform noise: mean 0.5, std about 0.2.
_SYNTHETIC_MEAN = (0.5, 0.5, 0.5)
_SYNTHETIC_STD = (0.2, 0.2, 0.2)

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_TEST_SEED = 0  # the test split never depends on the run seed
_SYNTHETIC_DATA_SEED = 0

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class SourceOptions:
    """What a reader needs besides the role.

    ``root`` is the dataset folder (cifar*, imagefolder); ``image_size`` the side in pixels the
    resident sources are stored at; ``download`` lets torchvision fetch CIFAR into ``root``;
    ``synthetic_num_classes``/``synthetic_size`` (training images) shape the synthetic set.
    """

    root: str | None
    image_size: int
    download: bool = False
    synthetic_num_classes: int = 10
    synthetic_size: int = 256


@dataclass(frozen=True)
class Split:
    """Some images of a dataset: ``items`` are uint8 ``N x C x H x W`` images (resident sources)
    or ``N`` file paths (image folders); ``labels`` are int64 ``N`` class indices."""

    items: Tensor | list[str]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> Split:
        """The images at ``indices`` (int64), in that order."""
        if isinstance(self.items, Tensor):
            return Split(self.items[torch.from_numpy(indices)], self.labels[indices])
        return Split([self.items[i] for i in indices.tolist()], self.labels[indices])

    def concat(self, other: Split) -> Split:
        """These images, then ``other``'s."""
        if isinstance(self.items, Tensor) and isinstance(other.items, Tensor):
            items: Tensor | list[str] = torch.cat([self.items, other.items])
        else:
            items = list(self.items) + list(other.items)
        return Split(items, torch.cat([self.labels, other.labels]))


@dataclass(frozen=True)
class DatasetSource:
    """One dataset: its fixed facts and the functions that read it.

    ``image_size``: default side of the yielded images, pixels. ``mean``/``std``: per channel in
    [0, 1] pixel units; None = measured on the training split. ``flip``: a mirrored image keeps
    its class (random flips in training). ``resident``: the whole dataset lives on the device
    (:class:`~sdd_search.data.resident.ResidentLoader`), else it is read from files
    (:class:`~sdd_search.data.image_folder.ImageFolderLoader`). ``selection_fraction``: the
    default share of the training split held out as the selection split.

    ``num_classes(options)``: cheap. ``read(role, options)``: the role's images, loaded; role is
    ``"train"`` (the dataset's whole training split, before a selection split is held out of it),
    ``"selection"`` (None unless the dataset has a selection split of its own) or ``"test"``.
    ``labels(role, options)``: the same role's labels (None where ``read`` gives None), cheaply:
    no image decoded, and for CIFAR not even a pickle opened (the standard split's counts).
    """

    name: str
    image_size: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    flip: bool
    resident: bool
    selection_fraction: float
    num_classes: Callable[[SourceOptions], int]
    read: Callable[[str, SourceOptions], Split | None]
    labels: Callable[[str, SourceOptions], np.ndarray | None]


def _labels_read(read: Callable[[str, SourceOptions], Split | None]):
    """A ``labels`` function for sources whose ``read`` is already cheap."""

    def labels(role: str, options: SourceOptions) -> np.ndarray | None:
        split = read(role, options)
        return None if split is None else split.labels.numpy()

    return labels


# ----------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------


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


@lru_cache(maxsize=4)
def _digits_arrays(image_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8x8 digits as uint8 ``N x 3 x S x S`` + labels, split into (train, test).

    Returns (train_images, train_labels, test_images, test_labels). The 20% stratified test
    split uses a fixed seed, independent of any run seed.
    """
    raw_images, raw_labels = _load_digits()
    pixels = torch.from_numpy(raw_images.astype(np.float32)) * (255.0 / 16.0)  # 0..16 -> 0..255
    pixels = F.interpolate(
        pixels[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    images = pixels.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(raw_labels)
    train_idx, test_idx = stratified_split(raw_labels, _DIGITS_TEST_FRACTION, _DIGITS_TEST_SEED)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def _read_digits(role: str, options: SourceOptions) -> Split | None:
    if role == "selection":
        return None
    train_x, train_y, test_x, test_y = _digits_arrays(options.image_size)
    return Split(train_x, train_y) if role == "train" else Split(test_x, test_y)


# ----------------------------------------------------------------------------------------------
# synthetic
# ----------------------------------------------------------------------------------------------


def _synthetic_test_size(size: int) -> int:
    return max(1, size // 4)


def _synthetic_draws(options: SourceOptions, *, images: bool) -> tuple[Tensor | None, Tensor]:
    """Learnable random data: each image is half its class's smooth prototype, half noise.

    Drawn from a fixed generator (independent of the run seed): ``synthetic_size`` training
    images, then ``max(1, synthetic_size // 4)`` test images. Returns (uint8 ``N x 3 x S x S``
    images, or None without ``images``: the labels alone are cheap, int64 ``N`` labels).
    """
    num_classes, image_size = options.synthetic_num_classes, options.image_size
    generator = torch.Generator().manual_seed(_SYNTHETIC_DATA_SEED)
    total = options.synthetic_size + _synthetic_test_size(options.synthetic_size)
    prototypes = torch.rand((num_classes, 3, 4, 4), generator=generator) * 255.0
    labels = torch.randint(0, num_classes, (total,), generator=generator)
    if not images:
        return None, labels
    prototypes = F.interpolate(
        prototypes, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    noise = torch.rand((total, 3, image_size, image_size), generator=generator) * 255.0
    pixels = (0.5 * prototypes[labels] + 0.5 * noise).round_().clamp_(0, 255).to(torch.uint8)
    return pixels, labels


def _synthetic_role_slice(role: str, options: SourceOptions) -> slice | None:
    size = options.synthetic_size
    return {"train": slice(0, size), "test": slice(size, None)}.get(role)


def _read_synthetic(role: str, options: SourceOptions) -> Split | None:
    part = _synthetic_role_slice(role, options)
    if part is None:
        return None
    images, labels = _synthetic_draws(options, images=True)
    return Split(images[part], labels[part])


def _synthetic_labels(role: str, options: SourceOptions) -> np.ndarray | None:
    part = _synthetic_role_slice(role, options)
    return None if part is None else _synthetic_draws(options, images=False)[1][part].numpy()


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarLayout:
    folder: str  # below root
    train_files: tuple[str, ...]  # the training batches, in order
    test_file: str
    num_classes: int
    pretty: str  # the name in messages


_CIFAR_LAYOUT = {
    "cifar100": _CifarLayout("cifar-100-python", ("train",), "test", 100, "CIFAR-100"),
    "cifar10": _CifarLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        10,
        "CIFAR-10",
    ),
}
_CIFAR_STANDARD_SIZES = {"train": 50000, "test": 10000}  # images, balanced over the classes


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


def _cifar_folder_check(name: str, root: str | None, role: str) -> None:
    """Raises DatasetError when the role's first file is absent (``role``: train or test)."""
    layout = _CIFAR_LAYOUT[name]
    if root is None:
        raise DatasetError(
            f"{name}: data.root is not set; expected a folder holding "
            f"{layout.folder}/{layout.train_files[0]}; set data.root (and data.download: true to fetch it)"
        )
    required = layout.train_files[0] if role == "train" else layout.test_file
    expected = os.path.join(root, layout.folder, required)
    if not os.path.isfile(expected):
        raise DatasetError(
            f"{name}: no {layout.pretty} data under {root} (expected {expected}); "
            "set data.download: true or point data.root at it"
        )


def _cifar_files(name: str, role: str) -> list[str]:
    layout = _CIFAR_LAYOUT[name]
    return list(layout.train_files) if role == "train" else [layout.test_file]


def _read_cifar_batch(path: str) -> tuple[np.ndarray, list[int]]:
    """One CIFAR batch file: (uint8 ``N x 3072`` pixels, N labels), read with the restricted
    unpickler (a file asking to run code is refused, never run). DatasetError names the file."""
    try:
        entry = safe_pickle.load_path(path)
    except OSError as error:
        raise DatasetError(f"{path}: cannot read it ({error.strerror or error})") from None
    except safe_pickle.PickleRefused as error:
        raise DatasetError(
            f"{path}: not a plain-data CIFAR batch ({error}); refusing to load it"
        ) from None
    except Exception as error:  # truncated, or array data numpy cannot rebuild
        raise DatasetError(f"{path}: {safe_pickle.describe_error(error)}") from None
    if isinstance(entry, dict):
        entry = {
            key.decode("latin1") if isinstance(key, bytes) else key: v for key, v in entry.items()
        }
    labels = entry.get("labels", entry.get("fine_labels")) if isinstance(entry, dict) else None
    data = entry.get("data") if isinstance(entry, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise DatasetError(
            f"{path}: not a CIFAR batch (expected a dict with 'data': uint8 N x 3072 pixels)"
        )
    if data.shape[1] != 3072 or labels is None or len(labels) != len(data):
        raise DatasetError(
            f"{path}: not a CIFAR batch (expected 'data' N x 3072 and N 'labels' or "
            f"'fine_labels', got data {tuple(data.shape)} and "
            f"{'no' if labels is None else len(labels)} labels)"
        )
    return data, [int(label) for label in labels]


def _download_cifar(name: str, root: str) -> None:
    """Fetch and extract the official archive (torchvision checks its md5); nothing unpickled."""
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    base = datasets.CIFAR100 if name == "cifar100" else datasets.CIFAR10
    download_and_extract_archive(base.url, root, filename=base.filename, md5=base.tgz_md5)


def check_cifar_files(name: str, root: str | None, roles: tuple[str, ...], download: bool) -> None:
    """Open and validate every batch file ``roles`` read, before anything starts (``--check``):
    DatasetError names the first missing, hostile or malformed file. With ``download``, files not
    there yet are skipped (the download checks the archive's md5)."""
    layout = _CIFAR_LAYOUT[name]
    if download and not (
        root and os.path.isfile(os.path.join(root, layout.folder, layout.train_files[0]))
    ):
        return
    for role in roles:
        _cifar_folder_check(name, root, role)
        for file in _cifar_files(name, role):
            _read_cifar_batch(_cifar_path(name, str(root), file))


def _cifar_path(name: str, root: str, file: str) -> str:
    path = os.path.join(root, _CIFAR_LAYOUT[name].folder, file)
    if not os.path.isfile(path):
        raise DatasetError(
            f"{name}: no {path} (expected the {_CIFAR_LAYOUT[name].pretty} batches "
            f"{', '.join(_cifar_files(name, 'train'))} and {_CIFAR_LAYOUT[name].test_file})"
        )
    return path


def _read_cifar(name: str, role: str, options: SourceOptions) -> Split | None:
    """CIFAR-10/100's ``role`` (train or test; no selection split of its own) as uint8
    ``N x 3 x S x S`` + labels, from the batch files of the official archive (only the role's:
    the training batches never open the test batch), with the restricted unpickler."""
    if role == "selection":
        return None
    root = options.root
    if options.download and root is not None:
        try:
            _cifar_folder_check(name, root, role)
        except DatasetError:
            _download_cifar(name, root)
    _cifar_folder_check(name, root, role)
    batches = [_read_cifar_batch(_cifar_path(name, str(root), f)) for f in _cifar_files(name, role)]
    pixels = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
    images = torch.from_numpy(pixels)
    labels = torch.tensor([label for _, batch_labels in batches for label in batch_labels])
    return Split(_resize_uint8(images, options.image_size), labels.to(torch.int64))


def _cifar_standard_labels(name: str, role: str) -> np.ndarray | None:
    """The labels of the standard split's ``role``, without reading a file: balanced classes."""
    if role == "selection":
        return None
    num_classes = _CIFAR_LAYOUT[name].num_classes
    return np.repeat(np.arange(num_classes), _CIFAR_STANDARD_SIZES[role] // num_classes)


def _cifar_source(name: str, mean: tuple[float, ...], std: tuple[float, ...]) -> DatasetSource:
    return DatasetSource(
        name,
        image_size=32,
        mean=mean,
        std=std,
        flip=True,
        resident=True,
        selection_fraction=0.1,
        num_classes=lambda options: _CIFAR_LAYOUT[name].num_classes,
        read=lambda role, options: _read_cifar(name, role, options),
        labels=lambda role, options: _cifar_standard_labels(name, role),
    )


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------

_FOLDER_LAYOUT = "train/<class>/*.jpg and val/<class>/*.jpg (test/<class>/*.jpg optional)"


def _list_images(folder: str) -> list[str]:
    return sorted(
        entry.path
        for entry in os.scandir(folder)
        if entry.is_file() and entry.name.lower().endswith(_IMAGE_SUFFIXES)
    )


def _role_folders(root: str | None) -> dict[str, str | None]:
    """Role -> folder: train/; with a test/ folder, val/ is the selection split and test/ the
    test split; without one, val/ is the test split (the selection split is held out of train/).
    Raises DatasetError when train/ or val/ is missing."""
    if root is None:
        raise DatasetError(
            f"imagefolder: data.root is not set; expected a folder with {_FOLDER_LAYOUT}"
        )
    train_dir, val_dir, test_dir = (os.path.join(root, name) for name in ("train", "val", "test"))
    for path in (train_dir, val_dir):
        if not os.path.isdir(path):
            raise DatasetError(f"imagefolder: no folder {path} (expected {root}/{_FOLDER_LAYOUT})")
    if os.path.isdir(test_dir):
        return {"train": train_dir, "selection": val_dir, "test": test_dir}
    return {"train": train_dir, "selection": None, "test": val_dir}


def _class_names(root: str | None) -> list[str]:
    """The class folders of ``root/train``, sorted: class i is the i-th name."""
    train_dir = _role_folders(root)["train"]
    classes = sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir())
    if not classes:
        raise DatasetError(
            f"imagefolder: {train_dir} has no class folders (expected {root}/{_FOLDER_LAYOUT})"
        )
    return classes


def _read_image_folder(role: str, options: SourceOptions) -> Split | None:
    """The file paths and labels of the role's ``<folder>/<class>/*`` (no image is opened).

    Only the role's folder is listed. Every training class folder must hold images; another
    folder's classes must be a subset of the training ones, and it must hold an image.
    """
    root = options.root
    folders = _role_folders(root)
    folder, train_dir = folders[role], folders["train"]
    if folder is None:
        return None
    classes = _class_names(root)
    class_index = {name: i for i, name in enumerate(classes)}
    if role == "train":
        names = classes
    else:
        names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    paths: list[str] = []
    labels: list[int] = []
    for name in names:
        if name not in class_index:
            raise DatasetError(
                f"imagefolder: {os.path.join(folder, name)} has no matching class folder in "
                f"{train_dir} (expected {os.path.basename(folder)}/ classes to be a subset of "
                "train/ classes)"
            )
        files = _list_images(os.path.join(folder, name))
        if not files and role == "train":
            raise DatasetError(
                f"imagefolder: {os.path.join(folder, name)} holds no images (expected *.jpg files)"
            )
        paths += files
        labels += [class_index[name]] * len(files)
    if not paths:
        raise DatasetError(
            f"imagefolder: {folder} holds no images (expected {root}/{_FOLDER_LAYOUT})"
        )
    return Split(paths, torch.tensor(labels, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

SOURCES: dict[str, DatasetSource] = {
    "digits": DatasetSource(
        "digits",
        image_size=16,
        mean=None,  # measured on the training split
        std=None,
        flip=False,  # a mirrored 2 is not a 2
        resident=True,
        selection_fraction=0.2,
        num_classes=lambda options: 10,
        read=_read_digits,
        labels=_labels_read(_read_digits),
    ),
    "cifar100": _cifar_source("cifar100", _CIFAR100_MEAN, _CIFAR100_STD),
    "cifar10": _cifar_source("cifar10", _CIFAR10_MEAN, _CIFAR10_STD),
    "imagefolder": DatasetSource(
        "imagefolder",
        image_size=224,
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        flip=True,
        resident=False,
        selection_fraction=0.1,
        num_classes=lambda options: len(_class_names(options.root)),
        read=_read_image_folder,
        labels=_labels_read(_read_image_folder),
    ),
    "synthetic": DatasetSource(
        "synthetic",
        image_size=32,
        mean=_SYNTHETIC_MEAN,
        std=_SYNTHETIC_STD,
        flip=True,
        resident=True,
        selection_fraction=0.2,
        num_classes=lambda options: options.synthetic_num_classes,
        read=_read_synthetic,
        labels=_synthetic_labels,
    ),
}

DATASETS: tuple[str, ...] = tuple(SOURCES)


def mean_std(
    source: DatasetSource, options: SourceOptions
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The source's (mean, std) per channel in [0, 1] pixel units; where the table gives none,
    measured on the whole training split (rounded to 4 decimals), so both stages normalise alike."""
    if source.mean is not None and source.std is not None:
        return source.mean, source.std
    split = source.read("train", options)
    if split is None or not isinstance(split.items, Tensor):
        raise TypeError(f"{source.name}: only a resident source's mean/std can be measured")
    values = split.items.float().div_(255.0)
    mean = values.mean(dim=(0, 2, 3)).tolist()
    std = values.std(dim=(0, 2, 3)).tolist()
    return tuple(round(m, 4) for m in mean), tuple(round(s, 4) for s in std)
