"""A timm-style registry: every network registers its constructor under its own name.

This module only fills and reads the name -> constructor table; building a model by name,
including the ``torchvision/`` names, is :mod:`sdd_search.models.factory`'s job::

    @register_model
    def resnet8x4(num_classes: int) -> CifarResNet: ...
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TypeVar

from sdd_search.models.base import DistillModel

ModelConstructor = Callable[..., DistillModel]
ConstructorT = TypeVar("ConstructorT", bound=ModelConstructor)

_MODEL_CONSTRUCTORS: dict[str, ModelConstructor] = {}


class UnknownModelError(ValueError):
    """Raised by ``create_model`` for a name that is neither registered nor torchvision's."""


def register_model(constructor: ConstructorT) -> ConstructorT:
    """Decorator: register ``constructor(num_classes, **kwargs) -> DistillModel`` under its name.

    The function's ``__name__`` is the model name, as in timm. Registering a name twice raises
    ValueError, so two modules can never silently shadow each other.
    """
    name = constructor.__name__
    if name in _MODEL_CONSTRUCTORS:
        raise ValueError(f"model name {name!r} is already registered")
    _MODEL_CONSTRUCTORS[name] = constructor
    return constructor


def list_registered_models() -> list[str]:
    """Sorted names of the registered networks."""
    return sorted(_MODEL_CONSTRUCTORS)


def model_constructor(name: str) -> ModelConstructor | None:
    """The constructor registered under ``name``, or None."""
    return _MODEL_CONSTRUCTORS.get(name)


def unknown_model_message(
    name: str,
    candidates: list[str],
    shown_as: Callable[[str], str] = str,
    listed_by: str = "sdd_search.models.list_models()",
) -> str:
    """One line naming an unknown model and its close matches among ``candidates``.

    Args:
        name: the name asked for.
        candidates: the known names to match it against.
        shown_as: how a matched candidate is spelled in the message.
        listed_by: the call that lists every known name, named at the end of the message.
    """
    by_lowercase = {candidate.lower(): candidate for candidate in candidates}
    # Case-insensitive, so mdistiller's spellings (ShuffleV1, MobileNetV2) find ours.
    matches = difflib.get_close_matches(name.lower(), list(by_lowercase), n=5, cutoff=0.6)
    suggestion = (
        f"; did you mean {', '.join(shown_as(by_lowercase[match]) for match in matches)}?"
        if matches
        else ""
    )
    return f"unknown model {name!r}{suggestion} ({listed_by} lists all)"
