"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4), ported from mdistiller.

Source: megvii-research/mdistiller, mdistiller/models/cifar/resnet.py. Module names match the
original so its checkpoints load with ``load_state_dict``. The feature map is layer3's output,
after the ReLU that ends its last block (8 x 8 for 32 x 32 inputs).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from sdd_search.models.base import DistillModel
from sdd_search.models.registry import register_model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection, ReLU after the sum."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + residual)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels) bottleneck with a residual connection."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + residual)


class CifarResNet(DistillModel):
    """ResNet for 32 x 32 inputs: a 3x3 stem and three stages at strides 1, 2, 2.

    Args:
        depth: total layers, 6n+2 for basic blocks (8, 14, 20, ...) or 9n+2 for bottlenecks.
        num_filters: channels of the stem and of the three stages, e.g. [16, 16, 32, 64].
        block_name: ``"basicblock"`` or ``"bottleneck"``.
        num_classes: K, the number of logits.
    """

    def __init__(
        self,
        depth: int,
        num_filters: list[int],
        block_name: str = "basicblock",
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        block: type[BasicBlock] | type[Bottleneck]
        if block_name.lower() == "basicblock":
            if (depth - 2) % 6 != 0:
                raise ValueError(
                    f"basic-block ResNet depth must be 6n+2 (20, 32, ...), got {depth}"
                )
            blocks_per_stage = (depth - 2) // 6
            block = BasicBlock
        elif block_name.lower() == "bottleneck":
            if (depth - 2) % 9 != 0:
                raise ValueError(f"bottleneck ResNet depth must be 9n+2 (29, 47, ...), got {depth}")
            blocks_per_stage = (depth - 2) // 9
            block = Bottleneck
        else:
            raise ValueError(f"block_name must be 'basicblock' or 'bottleneck', got {block_name!r}")

        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, num_filters[1], blocks_per_stage)
        self.layer2 = self._make_layer(block, num_filters[2], blocks_per_stage, stride=2)
        self.layer3 = self._make_layer(block, num_filters[3], blocks_per_stage, stride=2)
        self.num_features = num_filters[3] * block.expansion
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes,
                    planes * block.expansion,
                    kernel_size=1,
                    stride=stride,
                    bias=False,
                ),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> layer3's output after its final ReLU."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        return self.layer3(x)

    def get_classifier(self) -> nn.Module:
        """The final ``nn.Linear``."""
        return self.fc


@register_model
def resnet8(num_classes: int) -> CifarResNet:
    """ResNet-8 (basic blocks, 16/16/32/64 channels)."""
    return CifarResNet(8, [16, 16, 32, 64], "basicblock", num_classes=num_classes)


@register_model
def resnet14(num_classes: int) -> CifarResNet:
    """ResNet-14 (basic blocks, 16/16/32/64 channels)."""
    return CifarResNet(14, [16, 16, 32, 64], "basicblock", num_classes=num_classes)


@register_model
def resnet20(num_classes: int) -> CifarResNet:
    """ResNet-20 (basic blocks, 16/16/32/64 channels)."""
    return CifarResNet(20, [16, 16, 32, 64], "basicblock", num_classes=num_classes)


@register_model
def resnet32(num_classes: int) -> CifarResNet:
    """ResNet-32 (basic blocks, 16/16/32/64 channels)."""
    return CifarResNet(32, [16, 16, 32, 64], "basicblock", num_classes=num_classes)


@register_model
def resnet44(num_classes: int) -> CifarResNet:
    """ResNet-44 (basic blocks, 16/16/32/64 channels)."""
    return CifarResNet(44, [16, 16, 32, 64], "basicblock", num_classes=num_classes)


@register_model
def resnet56(num_classes: int) -> CifarResNet:
    """ResNet-56 (basic blocks, 16/16/32/64 channels)."""
    return CifarResNet(56, [16, 16, 32, 64], "basicblock", num_classes=num_classes)


@register_model
def resnet110(num_classes: int) -> CifarResNet:
    """ResNet-110 (basic blocks, 16/16/32/64 channels)."""
    return CifarResNet(110, [16, 16, 32, 64], "basicblock", num_classes=num_classes)


@register_model
def resnet8x4(num_classes: int) -> CifarResNet:
    """ResNet-8 four times wider (basic blocks, 32/64/128/256 channels)."""
    return CifarResNet(8, [32, 64, 128, 256], "basicblock", num_classes=num_classes)


@register_model
def resnet32x4(num_classes: int) -> CifarResNet:
    """ResNet-32 four times wider (basic blocks, 32/64/128/256 channels)."""
    return CifarResNet(32, [32, 64, 128, 256], "basicblock", num_classes=num_classes)
