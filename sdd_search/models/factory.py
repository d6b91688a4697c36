"""Build a model by name: a registered network, or any torchvision classifier.

    from sdd_search.models import create_model, list_models

    student = create_model("resnet8x4", num_classes=100)
    teacher = create_model("torchvision/resnet50", num_classes=1000, pretrained=True)

The factory sits above :mod:`sdd_search.models.registry` (the name -> constructor table) and
:mod:`sdd_search.models.torchvision_adapter` (the split of a torchvision model into features and
head) and routes a name to one of them by its ``torchvision/`` prefix, as timm's ``_factory``
routes ``hf-hub:`` names. Neither module below imports this one.
"""

from __future__ import annotations

from typing import Any

from sdd_search.models.base import DistillModel
from sdd_search.models.registry import (
    UnknownModelError,
    list_registered_models,
    model_constructor,
    unknown_model_message,
)
from sdd_search.models.torchvision_adapter import (
    UnsupportedTorchvisionModelError,
    create_torchvision_model,
    list_torchvision_models,
    torchvision_support_problem,
)

TORCHVISION_PREFIX = "torchvision/"


def is_torchvision_name(name: str) -> bool:
    """True for names such as ``"torchvision/resnet50"`` that :func:`create_model` builds from
    torchvision instead of the registry."""
    return name.startswith(TORCHVISION_PREFIX)


def list_models(include_torchvision: bool = False) -> list[str]:
    """Sorted names of the registered networks.

    Args:
        include_torchvision: also list every supported torchvision classification model, as
            ``"torchvision/<name>"``.
    """
    names = list_registered_models()
    if include_torchvision:
        names += [TORCHVISION_PREFIX + name for name in list_torchvision_models()]
    return names


def _name_error(name: str) -> ValueError | None:
    """The error :func:`create_model` raises for ``name`` before building anything, or None."""
    if is_torchvision_name(name):
        short_name = name.removeprefix(TORCHVISION_PREFIX)
        if short_name not in list_torchvision_models(supported_only=False):
            candidates = list_models(include_torchvision=True)
            return UnknownModelError(
                unknown_model_message(
                    name,
                    [candidate for candidate in candidates if is_torchvision_name(candidate)],
                    listed_by="sdd_search.models.list_models(include_torchvision=True)",
                )
            )
        problem = torchvision_support_problem(short_name)
        return None if problem is None else UnsupportedTorchvisionModelError(problem)
    if model_constructor(name) is not None:
        return None
    registered = list_registered_models()
    # A bare torchvision name (e.g. "resnet50") is a likely slip: suggest its prefixed form.
    candidates = registered + list_torchvision_models()

    def shown_as(match: str) -> str:
        return match if match in registered else TORCHVISION_PREFIX + match

    return UnknownModelError(unknown_model_message(name, candidates, shown_as))


def model_name_problem(name: str) -> str | None:
    """None if :func:`create_model` can build ``name``, else the one-line reason it cannot.

    The same checks :func:`create_model` makes first (unknown names with their close matches,
    torchvision models without a features/head split), so a spec check catches what a trial
    would fail on; nothing is built or downloaded.
    """
    error = _name_error(name)
    return None if error is None else str(error)


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
        UnsupportedTorchvisionModelError: for a torchvision model without a (features, head)
            split.
        ValueError: for weights requested of a registered model.
    """
    error = _name_error(name)
    if error is not None:
        raise error
    if is_torchvision_name(name):
        return create_torchvision_model(
            name.removeprefix(TORCHVISION_PREFIX), num_classes, **kwargs
        )
    constructor = model_constructor(name)
    assert constructor is not None  # _name_error found it
    # Callers may pass torchvision's options uniformly; only a request for weights is an error.
    pretrained = kwargs.pop("pretrained", False)
    weights = kwargs.pop("weights", None)
    if pretrained or weights is not None:
        raise ValueError(
            f"model {name!r} has no downloadable weights; build it with pretrained=False and "
            "load a checkpoint (mdistiller's state dicts load directly)"
        )
    return constructor(num_classes=num_classes, **kwargs)
