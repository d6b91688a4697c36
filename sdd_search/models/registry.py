"""A timm-style registry: every network registers under a name and one factory builds it.

    from sdd_search.models import create_model, list_models

    student = create_model("resnet8x4", num_classes=100)
    teacher = create_model("torchvision/resnet50", num_classes=1000, pretrained=True)

Names with the ``torchvision/`` prefix are any torchvision classification model, split into
(features, head) by :mod:`sdd_search.models.torchvision_adapter`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

from sdd_search.models.base import DistillModel

TORCHVISION_PREFIX = "torchvision/"

ModelConstructor = Callable[..., DistillModel]
ConstructorT = TypeVar("ConstructorT", bound=ModelConstructor)

_MODEL_CONSTRUCTORS: dict[str, ModelConstructor] = {}


class UnknownModelError(ValueError):
    """Raised by :func:`create_model` for a name that is neither registered nor torchvision's."""


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


def is_torchvision_name(name: str) -> bool:
    """True for names such as ``"torchvision/resnet50"`` that :func:`create_model` builds from
    torchvision instead of the registry."""
    return name.startswith(TORCHVISION_PREFIX)


def list_models(include_torchvision: bool = False) -> list[str]:
    """Sorted names of the registered networks.

    Args:
        include_torchvision: also list every torchvision classification model, as
            ``"torchvision/<name>"``.
    """
    names = sorted(_MODEL_CONSTRUCTORS)
    if include_torchvision:
        from sdd_search.models.torchvision_adapter import list_torchvision_models

        names += [TORCHVISION_PREFIX + name for name in list_torchvision_models()]
    return names


def unknown_model_message(name: str, candidates: list[str], shown_as: Callable[[str], str]) -> str:
    """One line naming an unknown model and its close matches among ``candidates``."""
    by_lowercase = {candidate.lower(): candidate for candidate in candidates}
    # Case-insensitive, so mdistiller's spellings (ShuffleV1, MobileNetV2) find ours.
    matches = difflib.get_close_matches(name.lower(), list(by_lowercase), n=5, cutoff=0.6)
    suggestion = (
        f"; did you mean {', '.join(shown_as(by_lowercase[match]) for match in matches)}?"
        if matches
        else ""
    )
    return f"unknown model {name!r}{suggestion} (sdd_search.models.list_models() lists all)"


def create_model(name: str, num_classes: int, **kwargs: Any) -> DistillModel:
    """Build a model by name.

    Args:
        name: a registered name (``list_models()``) such as ``"resnet32x4"``, or
            ``"torchvision/<name>"`` for any torchvision classification model.
        num_classes: K, the number of logits.
        **kwargs: passed to the constructor; torchvision models take ``pretrained`` (use
            torchvision's DEFAULT weights) and ``weights`` (a weights name or enum). Registered
            models accept ``pretrained=False`` / ``weights=None`` and ignore them.

    Raises:
        UnknownModelError: for an unknown name, with the close matches in its message.
        ValueError: for weights requested of a registered (CIFAR) model.
    """
    if is_torchvision_name(name):
        from sdd_search.models.torchvision_adapter import create_torchvision_model

        return create_torchvision_model(
            name.removeprefix(TORCHVISION_PREFIX), num_classes, **kwargs
        )
    constructor = _MODEL_CONSTRUCTORS.get(name)
    if constructor is None:
        from sdd_search.models.torchvision_adapter import list_torchvision_models

        # A bare torchvision name (e.g. "resnet50") is a likely slip: suggest its prefixed form.
        candidates = list(_MODEL_CONSTRUCTORS) + list_torchvision_models()

        def shown_as(match: str) -> str:
            return match if match in _MODEL_CONSTRUCTORS else TORCHVISION_PREFIX + match

        raise UnknownModelError(unknown_model_message(name, candidates, shown_as))
    # Callers may pass torchvision's options uniformly; only a request for weights is an error.
    pretrained = kwargs.pop("pretrained", False)
    weights = kwargs.pop("weights", None)
    if pretrained or weights is not None:
        raise ValueError(
            f"model {name!r} has no downloadable weights; build it with pretrained=False and "
            "load a checkpoint (mdistiller's CIFAR teacher state dicts load directly)"
        )
    return constructor(num_classes=num_classes, **kwargs)
