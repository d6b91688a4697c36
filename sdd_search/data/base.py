"""What the data package's parts share: its error, the record describing a dataset (and its
one-line summary), and the protocol every loader follows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from sdd_search.data.splits import Stage


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message names the path and what was expected."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a schedule need to know about a dataset, for one stage.

    ``image_size`` is the side in pixels of the square images the loaders yield; ``mean``/``std``
    are per channel, in units of the [0, 1] pixel range. ``stage`` is "search" (train on the
    training split minus the selection split, evaluate on selection) or "final" (train on all
    the training data, evaluate on test). Counts are images, totals over all ranks:
    ``num_train`` what the stage trains on, ``num_selection`` the selection split,
    ``num_test`` the test split (None where it was not opened: the search stage's loaders never
    open it).
    """

    name: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stage: Stage
    num_train: int
    num_selection: int
    num_test: int | None

    @property
    def num_eval(self) -> int | None:
        """Images the stage evaluates on: the selection split (search) or the test split (final)."""
        return self.num_selection if self.stage == "search" else self.num_test


def role_counts(info: DatasetInfo) -> str:
    """One line with the three roles' sizes, e.g. ``train 45000 / selection 5000 / test 10000``.

    ``train`` is the training split minus the selection split, in either stage.
    """
    train = info.num_train - (info.num_selection if info.stage == "final" else 0)
    test = "not read" if info.num_test is None else str(info.num_test)
    return f"train {train} / selection {info.num_selection} / test {test}"


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
