"""CIFAR MobileNetV2 (expansion T=6, width 0.5: mdistiller's ``mobile_half``), ported from
mdistiller.

Source: megvii-research/mdistiller, mdistiller/models/cifar/mobilenetv2.py. Module names match
the original so its checkpoints load with ``load_state_dict``. The feature map is the 1x1
conv2's output after its ReLU, 1280 channels: 2 x 2 for 32 x 32 inputs, 1 x 1 for 16 x 16
(the original's fixed 2 x 2 average pool becomes a global mean, identical at 32 x 32).
"""

from __future__ import annotations

from torch import Tensor, nn

from sdd_search.models.base import DistillModel, init_fan_out_normal
from sdd_search.models.registry import register_model


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 conv, BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def conv_1x1_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv, BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> project (1x1, linear), residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        self.use_residual = stride == 1 and in_channels == out_channels
        hidden = in_channels * expand_ratio
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class CifarMobileNetV2(DistillModel):
    """MobileNetV2 for 32 x 32 inputs (total stride 16).

    Args:
        expansion: expansion ratio T of the inverted residual blocks (after the first).
        num_classes: K, the number of logits.
        width_mult: channel multiplier of the blocks; the last conv keeps 1280 channels unless
            width_mult > 1.
    """

    def __init__(self, expansion: int, num_classes: int, width_mult: float = 1.0) -> None:
        super().__init__()
        # (expansion ratio, output channels, blocks, stride of the first block)
        block_settings = [
            (1, 16, 1, 1),
            (expansion, 24, 2, 1),
            (expansion, 32, 3, 2),
            (expansion, 64, 4, 2),
            (expansion, 96, 3, 1),
            (expansion, 160, 3, 2),
            (expansion, 320, 1, 1),
        ]
        in_channels = int(32 * width_mult)
        self.conv1 = conv_bn_relu(3, in_channels, 2)
        self.blocks = nn.ModuleList()
        for expand_ratio, channels, num_blocks, first_stride in block_settings:
            out_channels = int(channels * width_mult)
            layers = []
            for stride in [first_stride] + [1] * (num_blocks - 1):
                layers.append(InvertedResidual(in_channels, out_channels, stride, expand_ratio))
                in_channels = out_channels
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn_relu(in_channels, self.last_channel)
        self.num_features = self.last_channel
        self.num_classes = num_classes
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))

        init_fan_out_normal(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> conv2's output after its ReLU."""
        out = self.conv1(x)
        for block in self.blocks:
            out = block(out)
        return self.conv2(out)

    def get_classifier(self) -> nn.Module:
        """``Sequential(Linear)``, as in the original."""
        return self.classifier


@register_model
def mobilenetv2(num_classes: int) -> CifarMobileNetV2:
    """MobileNetV2 with T=6 and width 0.5 (mdistiller's ``mobile_half``, the paper's student)."""
    return CifarMobileNetV2(expansion=6, num_classes=num_classes, width_mult=0.5)
