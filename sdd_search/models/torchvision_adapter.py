"""Split any torchvision classifier into (features, head), so SDD works on unedited models.

    model = create_model("torchvision/resnet50", num_classes=100, pretrained=True)
    features = model.forward_features(images)  # B x 2048 x H/32 x W/32
    logits = model(images)  # B x 100, as the original model computes them

The split is generic: walk the model's top-level children, find the classifier (the last
child holding an ``nn.Linear``), drop the global pooling and flattening in front of or inside
it (our mean-pool replaces them), and keep everything the pooled vector still goes through
(dropout, convnext's pre-logit LayerNorm, mobilenet_v3's MLP) as the head. A short table covers
what a model's ``forward`` does outside its children: densenet's final ReLU, inception's input
re-normalisation, and the auxiliary classifiers to skip. Models without a spatial map behind a
global pool (vision transformers, VGG/AlexNet's 7x7-grid classifier, squeezenet's conv
classifier) raise :class:`UnsupportedTorchvisionModelError`; :func:`torchvision_support_problem`
says so from the name alone, before anything is built or downloaded.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from sdd_search.models.base import DistillModel

# Side-branch classifiers that the model's forward uses only for training losses.
AUXILIARY_CLASSIFIER_NAMES = frozenset({"AuxLogits", "aux1", "aux2"})


class UnsupportedTorchvisionModelError(ValueError):
    """Raised for a torchvision model that has no (feature map, global-pool head) split."""


class InceptionInputTransform(nn.Module):
    """Inception v3 / GoogLeNet's ``transform_input``: ImageNet-normalised input -> the
    (x - 0.5) / 0.5 normalisation the original weights were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        channel0 = x[:, 0:1] * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
        channel1 = x[:, 1:2] * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
        channel2 = x[:, 2:3] * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
        return torch.cat((channel0, channel1, channel2), 1)


class TorchvisionDistillModel(DistillModel):
    """A torchvision classifier as (features, head); parameters are shared with the original.

    Args:
        features: images -> the last feature map B x C x H x W.
        head: pooled vectors (..., C) -> logits (..., K).
        num_features: C.
        num_classes: K.
    """

    def __init__(
        self, features: nn.Module, head: nn.Module, num_features: int, num_classes: int
    ) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.num_features = num_features
        self.num_classes = num_classes

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> the last feature map, as the original model computes it before pooling."""
        return self.features(x)

    def get_classifier(self) -> nn.Module:
        """The head over pooled vectors: a Linear, or the model's dropout/norm/MLP + Linear."""
        return self.head


# Name prefix -> why that family's classifier is not a head over one pooled vector. It is what
# wrap_torchvision_model finds on the built model (a test checks one model per family), said
# from the name alone, so a spec check or list_models() needs no model built and no download.
UNSUPPORTED_TORCHVISION_FAMILIES = {
    "alexnet": "its classifier flattens a 6 x 6 grid of features, not one pooled vector",
    "squeezenet": "it has no nn.Linear classifier: its convolutional classifier runs before pooling",
    "vgg": "its classifier flattens a 7 x 7 grid of features, not one pooled vector",
    "vit_": "a vision transformer classifies a class token and has no spatial feature map",
}


def torchvision_support_problem(name: str) -> str | None:
    """None if torchvision's model ``name`` splits into (features, global-pool head), else one
    line saying why not.

    Args:
        name: a torchvision classification model name without the ``torchvision/`` prefix.
    """
    for family, reason in UNSUPPORTED_TORCHVISION_FAMILIES.items():
        if name.startswith(family):
            return (
                f"torchvision model {name!r} is not supported ({reason}; use a convolutional, "
                "swin or maxvit model)"
            )
    return None


def list_torchvision_models(supported_only: bool = True) -> list[str]:
    """Names of torchvision's classification models (``resnet50``, ``convnext_tiny``, ...).

    Args:
        supported_only: leave out the families that have no (features, global-pool head) split.
    """
    import torchvision

    names = sorted(torchvision.models.list_models(module=torchvision.models))
    if supported_only:
        names = [name for name in names if torchvision_support_problem(name) is None]
    return names


def _contains_linear(module: nn.Module) -> bool:
    return any(isinstance(submodule, nn.Linear) for submodule in module.modules())


def _is_global_pool(module: nn.Module) -> bool:
    """True for an adaptive pool to 1 x 1; a pool to a larger grid raises (no global head)."""
    if not isinstance(module, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
        return False
    output_size = module.output_size
    sizes = output_size if isinstance(output_size, tuple) else (output_size, output_size)
    if all(size == 1 for size in sizes):
        if isinstance(module, nn.AdaptiveMaxPool2d):
            raise UnsupportedTorchvisionModelError(
                "the classifier max-pools its features; SDD's cell logits assume average pooling"
            )
        return True
    raise UnsupportedTorchvisionModelError(
        f"the classifier pools features to a {output_size} grid before its Linear layers, not "
        "to one global vector, so its head cannot be applied per cell"
    )


def _layer_norm_over_last_dim(norm: nn.LayerNorm) -> nn.LayerNorm:
    """A LayerNorm over the last dim that shares ``norm``'s parameters (for LayerNorm2d,
    which normalises the channel dim of B x C x H x W maps)."""
    converted = nn.LayerNorm(
        norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine
    )
    converted.weight = norm.weight
    converted.bias = norm.bias
    return converted


def _head_layers(classifier: nn.Module) -> tuple[list[nn.Module], bool]:
    """The classifier's layers that act on pooled vectors, and whether any were changed."""
    from torchvision.models.convnext import LayerNorm2d

    if not isinstance(classifier, nn.Sequential):
        if isinstance(classifier, nn.Linear):
            return [classifier], False
        raise UnsupportedTorchvisionModelError(
            f"its classifier is a {type(classifier).__name__}, not a Linear or a Sequential"
        )
    layers: list[nn.Module] = []
    changed = False
    for layer in classifier:
        if _is_global_pool(layer):
            if layers:
                raise UnsupportedTorchvisionModelError(
                    "its classifier pools after a per-position layer, so the head does not "
                    "commute with pooling"
                )
            changed = True
        elif isinstance(layer, nn.Flatten):
            changed = True
        elif isinstance(layer, LayerNorm2d):
            layers.append(_layer_norm_over_last_dim(layer))
            changed = True
        elif isinstance(layer, nn.Conv2d | nn.AvgPool2d | nn.MaxPool2d):
            raise UnsupportedTorchvisionModelError(
                f"its classifier has a {type(layer).__name__}, a spatial layer, so it is not a "
                "head over pooled vectors"
            )
        else:
            layers.append(layer)
    return layers, changed


def _feature_dim(head: nn.Module) -> int:
    """C: the input width of the head's first Linear or LayerNorm."""
    for module in head.modules():
        if isinstance(module, nn.Linear):
            return module.in_features
        if isinstance(module, nn.LayerNorm):
            return int(module.normalized_shape[-1])
    raise UnsupportedTorchvisionModelError("its head has no Linear layer")


def _last_linear(module: nn.Module) -> nn.Linear:
    linears = [submodule for submodule in module.modules() if isinstance(submodule, nn.Linear)]
    return linears[-1]


def wrap_torchvision_model(model: nn.Module) -> TorchvisionDistillModel:
    """Split a torchvision classifier into (features, head), sharing its modules and weights.

    The returned model's global logits equal ``model(x)`` in eval mode; ``forward_features``
    gives the map the original pools (after densenet's final ReLU, after swin's final norm).

    Raises:
        UnsupportedTorchvisionModelError: for models without such a split (see module docs).
    """
    import torchvision

    model_kind = type(model).__name__
    if isinstance(model, torchvision.models.VisionTransformer):
        raise UnsupportedTorchvisionModelError(
            f"{model_kind} classifies a class token and has no spatial feature map; use a "
            "convolutional or swin/maxvit model"
        )
    children = [
        (name, child)
        for name, child in model.named_children()
        if name not in AUXILIARY_CLASSIFIER_NAMES
    ]
    classifier_indices = [i for i, (_, child) in enumerate(children) if _contains_linear(child)]
    if not classifier_indices:
        raise UnsupportedTorchvisionModelError(
            f"{model_kind} has no nn.Linear classifier; a convolutional classifier applied "
            "before pooling (as in squeezenet) cannot be split into features and head"
        )
    classifier_index = classifier_indices[-1]
    if classifier_index != len(children) - 1:
        trailing = ", ".join(name for name, _ in children[classifier_index + 1 :])
        raise UnsupportedTorchvisionModelError(
            f"{model_kind} has modules after its classifier ({trailing}); cannot split it"
        )

    # Walk back over the global pool / flatten / dropout between the features and classifier.
    features_end = classifier_index
    while features_end > 0:
        previous = children[features_end - 1][1]
        if not (_is_global_pool(previous) or isinstance(previous, nn.Flatten | nn.Dropout)):
            break
        features_end -= 1
    dropouts_before_classifier = [
        child
        for _, child in children[features_end:classifier_index]
        if isinstance(child, nn.Dropout)
    ]

    classifier = children[classifier_index][1]
    classifier_layers, changed = _head_layers(classifier)
    head_layers = dropouts_before_classifier + classifier_layers
    if not dropouts_before_classifier and not changed:
        head = classifier
    elif len(head_layers) == 1:
        head = head_layers[0]
    else:
        head = nn.Sequential(*head_layers)

    feature_stages: list[tuple[str, nn.Module]] = []
    if getattr(model, "transform_input", False):
        feature_stages.append(("transform_input", InceptionInputTransform()))
    for name, child in children[:features_end]:
        # A ModuleList (maxvit's blocks) is run in order, as the model's forward does.
        feature_stages.append(
            (name, nn.Sequential(*child) if isinstance(child, nn.ModuleList) else child)
        )
    if isinstance(model, torchvision.models.DenseNet):
        # DenseNet applies this ReLU in forward(), outside its children.
        feature_stages.append(("final_relu", nn.ReLU(inplace=True)))

    return TorchvisionDistillModel(
        features=nn.Sequential(OrderedDict(feature_stages)),
        head=head,
        num_features=_feature_dim(head),
        num_classes=_last_linear(head).out_features,
    )


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    """Swap the model's last ``nn.Linear`` for a fresh one with ``num_classes`` outputs."""
    name = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attribute)
    setattr(parent, attribute, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def create_torchvision_model(
    name: str, num_classes: int, pretrained: bool = False, weights: Any = None
) -> TorchvisionDistillModel:
    """Build torchvision's ``name`` and split it into (features, head).

    Args:
        name: a torchvision classification model name, e.g. ``"resnet50"``
            (``sdd_search.models.create_model`` has checked that torchvision has it).
        num_classes: K; with pretrained weights of another class count, the last Linear is
            replaced by a freshly initialised one.
        pretrained: use torchvision's DEFAULT weights (downloads them once into the torch
            hub cache).
        weights: a torchvision weights name (``"IMAGENET1K_V2"``) or enum; overrides
            ``pretrained``.

    Raises:
        UnsupportedTorchvisionModelError: for a model without a (features, head) split, before
            anything is built or downloaded.
    """
    import torchvision

    problem = torchvision_support_problem(name)
    if problem is not None:
        raise UnsupportedTorchvisionModelError(problem)
    if weights is None and pretrained:
        weights = "DEFAULT"
    if weights is None:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    else:
        model = torchvision.models.get_model(name, weights=weights)
        if _last_linear(model).out_features != num_classes:
            _replace_last_linear(model, num_classes)
    try:
        return wrap_torchvision_model(model)
    except UnsupportedTorchvisionModelError as error:
        raise UnsupportedTorchvisionModelError(f"torchvision model {name!r}: {error}") from None
