"""Models for distillation: a registry of the paper's CIFAR networks and a torchvision adapter.

Every model is a :class:`DistillModel`: ``forward(x)`` returns ``(logits, feature_map)`` and
``get_classifier()`` returns the head that SDD applies to every pooled cell::

    from sdd_search.models import create_model
    from sdd_search.sdd import cell_logits

    student = create_model("resnet8x4", num_classes=100)
    logits, features = student(images)
    cells = cell_logits(features, student.get_classifier(), (1, 2, 4))  # B x 21 x 100
"""

# The network modules are imported for their @register_model side effect.
from sdd_search.models import (  # noqa: F401
    mobilenetv2,
    resnet,
    shufflenetv1,
    shufflenetv2,
    vgg,
    wrn,
)
from sdd_search.models.base import DistillModel, global_average_pool
from sdd_search.models.registry import (
    UnknownModelError,
    create_model,
    is_torchvision_name,
    list_models,
    register_model,
)
from sdd_search.models.torchvision_adapter import (
    UnsupportedTorchvisionModelError,
    wrap_torchvision_model,
)

__all__ = [
    "DistillModel",
    "UnknownModelError",
    "UnsupportedTorchvisionModelError",
    "create_model",
    "global_average_pool",
    "is_torchvision_name",
    "list_models",
    "register_model",
    "wrap_torchvision_model",
]
