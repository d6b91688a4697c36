"""Models for distillation: a registry of the paper's networks and a torchvision adapter.

Every model is a :class:`DistillModel` with timm's API: ``forward(x)`` returns the logits,
``forward_features(x)`` the last feature map, ``get_classifier()`` the head that SDD applies to
every pooled cell, and ``forward_cells(x, scales)`` the cell logits::

    from sdd_search.models import create_model

    student = create_model("resnet8x4", num_classes=100)
    logits = student(images)  # B x 100
    cells = student.forward_cells(images, (1, 2, 4))  # B x 21 x 100; cells[:, 0] == logits
"""

# The network modules are imported for their @register_model side effect.
from sdd_search.models import (  # noqa: F401
    mobilenetv1,
    mobilenetv2,
    resnet,
    shufflenetv1,
    shufflenetv2,
    vgg,
    wrn,
)
from sdd_search.models.base import DistillModel, global_average_pool
from sdd_search.models.factory import (
    TORCHVISION_PREFIX,
    create_model,
    is_torchvision_name,
    list_models,
    model_name_problem,
)
from sdd_search.models.registry import UnknownModelError, register_model
from sdd_search.models.torchvision_adapter import (
    UnsupportedTorchvisionModelError,
    list_torchvision_models,
    wrap_torchvision_model,
)

__all__ = [
    "TORCHVISION_PREFIX",
    "DistillModel",
    "UnknownModelError",
    "UnsupportedTorchvisionModelError",
    "create_model",
    "global_average_pool",
    "is_torchvision_name",
    "list_models",
    "list_torchvision_models",
    "model_name_problem",
    "register_model",
    "wrap_torchvision_model",
]
