"""ImageNet MobileNetV1 (width 1.0, 224 x 224 inputs), ported from mdistiller.

Source: megvii-research/mdistiller, mdistiller/models/imagenet/mobilenetv1.py. It is the
student of the SDD/DKD papers' ImageNet ResNet50 -> "MobileNetV2" rows (a naming slip in the DKD
code: the network is this MobileNetV1). Module names match the original (``model.<i>``, ``fc``)
so its checkpoints load with ``load_state_dict``; initialisation is PyTorch's default, as there.

The feature map is the last depthwise-separable block's output after its ReLU, 1024 channels:
7 x 7 for 224 x 224 inputs (total stride 32). The original's ``AvgPool2d(7)`` becomes a global
mean, identical at 224 x 224 and defined at any input size.
"""

from __future__ import annotations

from torch import Tensor, nn

from sdd_search.models.base import DistillModel
from sdd_search.models.registry import register_model


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """The stem: 3x3 conv, BN, ReLU (mdistiller's ``conv_bn``)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def depthwise_separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 depthwise conv, BN, ReLU, then 1x1 pointwise conv, BN, ReLU (``conv_dw``)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


# (output channels, stride) of the 13 depthwise-separable blocks after the stem.
DEPTHWISE_SEPARABLE_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    *((512, 1),) * 5,
    (1024, 2),
    (1024, 1),
)


class MobileNetV1(DistillModel):
    """MobileNetV1 for ImageNet-sized inputs.

    Args:
        num_classes: K, the number of logits (mdistiller fixes 1000).
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers = [conv_bn_relu(3, 32, 2)]
        in_channels = 32
        for out_channels, stride in DEPTHWISE_SEPARABLE_BLOCKS:
            layers.append(depthwise_separable(in_channels, out_channels, stride))
            in_channels = out_channels
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, num_classes)
        self.num_features = in_channels
        self.num_classes = num_classes

    def forward_features(self, x: Tensor) -> Tensor:
        """Images B x 3 x H x W -> the last block's output after its ReLU, B x 1024 x H/32 x W/32."""
        return self.model(x)

    def get_classifier(self) -> nn.Module:
        """The ``Linear(1024, K)`` head, as in the original."""
        return self.fc


@register_model
def mobilenetv1(num_classes: int) -> MobileNetV1:
    """MobileNetV1 at width 1.0 (mdistiller's ImageNet ``MobileNetV1``, the paper's student)."""
    return MobileNetV1(num_classes=num_classes)
