"""CIFAR Wide ResNets (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2), ported from mdistiller.

Source: megvii-research/mdistiller, mdistiller/models/cifar/wrn.py. Module names match the
original (``convShortcut`` included) so its checkpoints load with ``load_state_dict``. The
blocks are pre-activation; the feature map is ``relu(bn1(block3(x)))`` (8 x 8 for 32 x 32).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from sdd_search.models.base import DistillModel
from sdd_search.models.registry import register_model


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus a 1x1 shortcut conv when the
    channel count changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(
            in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (  # mdistiller's name, kept so its checkpoints load
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # With equal channels the shortcut is the raw input; otherwise the conv sees the
        # activated input, as in the original.
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A stage of ``num_layers`` wide blocks; the first one changes channels and stride."""

    def __init__(
        self, num_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    drop_rate,
                )
                for i in range(num_layers)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(DistillModel):
    """WRN-depth-width for 32 x 32 inputs.

    Args:
        depth: total layers, 6n+4 (16, 40, ...).
        num_classes: K, the number of logits.
        widen_factor: channel multiplier of the three stages (16k, 32k, 64k).
        drop_rate: dropout probability inside each block (0 in the paper's recipes).
    """

    def __init__(
        self, depth: int, num_classes: int, widen_factor: int = 1, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Wide ResNet depth must be 6n+4 (16, 40, ...), got {depth}")
        blocks_per_stage = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(blocks_per_stage, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(blocks_per_stage, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(blocks_per_stage, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.num_features = channels[3]
        self.num_classes = num_classes
        self.fc = nn.Linear(channels[3], num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He init with fan_out, exactly as mdistiller writes it.
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> ``relu(bn1(block3 output))``."""
        out = self.conv1(x)
        out = self.block1(out)
        out = self.block2(out)
        out = self.block3(out)
        return self.relu(self.bn1(out))

    def get_classifier(self) -> nn.Module:
        """The final ``nn.Linear``."""
        return self.fc


@register_model
def wrn_16_1(num_classes: int) -> WideResNet:
    """WRN-16-1."""
    return WideResNet(depth=16, num_classes=num_classes, widen_factor=1)


@register_model
def wrn_16_2(num_classes: int) -> WideResNet:
    """WRN-16-2."""
    return WideResNet(depth=16, num_classes=num_classes, widen_factor=2)


@register_model
def wrn_40_1(num_classes: int) -> WideResNet:
    """WRN-40-1."""
    return WideResNet(depth=40, num_classes=num_classes, widen_factor=1)


@register_model
def wrn_40_2(num_classes: int) -> WideResNet:
    """WRN-40-2."""
    return WideResNet(depth=40, num_classes=num_classes, widen_factor=2)
