"""CIFAR ShuffleNetV1 (groups 3, stages of 240/480/960 channels), ported from mdistiller.

Source: megvii-research/mdistiller, mdistiller/models/cifar/ShuffleNetv1.py (``ShuffleV1``).
Module names match the original so its checkpoints load with ``load_state_dict``; like the
original, weights keep PyTorch's default initialisation. The feature map is layer3's output
after the ReLU that ends its last block (4 x 4 for 32 x 32 inputs, 2 x 2 for 16 x 16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdd_search.models.base import DistillModel
from sdd_search.models.registry import register_model


class ChannelShuffle(nn.Module):
    """Interleave channel groups: [N, g*c, H, W] -> [N, g, c, H, W] -> [N, c, g, H, W] -> back."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        grouped = x.reshape(batch, self.groups, channels // self.groups, height, width)
        return grouped.permute(0, 2, 1, 3, 4).reshape(batch, channels, height, width)


class ShuffleBottleneck(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1, then add (stride 1) or
    concatenate an average-pooled shortcut (stride 2), then ReLU."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        # The very first block sees the 24-channel stem, too few channels to group.
        first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(
            in_planes, mid_planes, kernel_size=1, groups=first_groups, bias=False
        )
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ChannelShuffle(groups=first_groups)
        self.conv2 = nn.Conv2d(
            mid_planes,
            mid_planes,
            kernel_size=3,
            stride=stride,
            padding=1,
            groups=mid_planes,
            bias=False,
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = (
            nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        return F.relu(torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut)


class CifarShuffleNetV1(DistillModel):
    """ShuffleNetV1 for 32 x 32 inputs: a 1x1 stem and three stages, each starting at stride 2.

    Args:
        out_planes: output channels of the three stages.
        num_blocks: blocks per stage.
        groups: groups of the 1x1 convolutions.
        num_classes: K, the number of logits.
    """

    def __init__(
        self, out_planes: list[int], num_blocks: list[int], groups: int, num_classes: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.num_features = out_planes[2]
        self.num_classes = num_classes
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            stride = 2 if i == 0 else 1
            # The first block concatenates its shortcut, so its own branch makes the rest.
            concatenated_planes = self.in_planes if i == 0 else 0
            layers.append(
                ShuffleBottleneck(self.in_planes, out_planes - concatenated_planes, stride, groups)
            )
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> layer3's output after its final ReLU."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        return self.layer3(out)

    def get_classifier(self) -> nn.Module:
        """The final ``nn.Linear``."""
        return self.linear


@register_model
def shufflenetv1(num_classes: int) -> CifarShuffleNetV1:
    """ShuffleNetV1 with groups 3, stages of 240/480/960 channels and 4/8/4 blocks (``ShuffleV1``)."""
    return CifarShuffleNetV1([240, 480, 960], [4, 8, 4], groups=3, num_classes=num_classes)
