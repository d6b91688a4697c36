"""CIFAR ShuffleNetV2 (net size 1: stages of 116/232/464 channels, 1024-channel last conv),
ported from mdistiller.

Source: megvii-research/mdistiller, mdistiller/models/cifar/ShuffleNetv2.py (``ShuffleV2``).
Module names match the original so its checkpoints load with ``load_state_dict``; like the
original, weights keep PyTorch's default initialisation. The feature map is
``relu(bn2(conv2(layer3 output)))`` (4 x 4 for 32 x 32 inputs, 2 x 2 for 16 x 16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdd_search.models.base import DistillModel
from sdd_search.models.registry import register_model
from sdd_search.models.shufflenetv1 import ChannelShuffle

# Per net size: stage channels + last conv channels, and blocks per stage.
SHUFFLENETV2_CONFIGS: dict[float, dict[str, tuple[int, ...]]] = {
    0.2: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 3, 3)},
    0.3: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 7, 3)},
    0.5: {"out_channels": (48, 96, 192, 1024), "num_blocks": (3, 7, 3)},
    1: {"out_channels": (116, 232, 464, 1024), "num_blocks": (3, 7, 3)},
    1.5: {"out_channels": (176, 352, 704, 1024), "num_blocks": (3, 7, 3)},
    2: {"out_channels": (224, 488, 976, 2048), "num_blocks": (3, 7, 3)},
}


class ChannelSplit(nn.Module):
    """Split channels into the first ``ratio`` share and the rest."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        split_at = int(x.size(1) * self.ratio)
        return x[:, :split_at], x[:, split_at:]


class ShuffleV2Block(nn.Module):
    """Split; the second half goes 1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU; concat; shuffle."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = ChannelSplit(split_ratio)
        branch_channels = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(branch_channels, branch_channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(branch_channels)
        self.conv2 = nn.Conv2d(
            branch_channels,
            branch_channels,
            kernel_size=3,
            stride=1,
            padding=1,
            groups=branch_channels,
            bias=False,
        )
        self.bn2 = nn.BatchNorm2d(branch_channels)
        self.conv3 = nn.Conv2d(branch_channels, branch_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_channels)
        self.shuffle = ChannelShuffle(groups=2)

    def forward(self, x: Tensor) -> Tensor:
        kept, branch = self.split(x)
        out = F.relu(self.bn1(self.conv1(branch)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([kept, out], 1))


class ShuffleV2DownBlock(nn.Module):
    """Stride-2 block: two branches (depthwise-then-1x1, and 1x1-depthwise-1x1), concatenated
    and shuffled."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid_channels = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(
            in_channels,
            in_channels,
            kernel_size=3,
            stride=2,
            padding=1,
            groups=in_channels,
            bias=False,
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid_channels)
        self.conv4 = nn.Conv2d(
            mid_channels,
            mid_channels,
            kernel_size=3,
            stride=2,
            padding=1,
            groups=mid_channels,
            bias=False,
        )
        self.bn4 = nn.BatchNorm2d(mid_channels)
        self.conv5 = nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid_channels)
        self.shuffle = ChannelShuffle(groups=2)

    def forward(self, x: Tensor) -> Tensor:
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


class CifarShuffleNetV2(DistillModel):
    """ShuffleNetV2 for 32 x 32 inputs: a 1x1 stem, three stages at stride 2, a 1x1 conv.

    Args:
        net_size: a key of :data:`SHUFFLENETV2_CONFIGS` (1 for the paper's student).
        num_classes: K, the number of logits.
    """

    def __init__(self, net_size: float, num_classes: int) -> None:
        super().__init__()
        out_channels = SHUFFLENETV2_CONFIGS[net_size]["out_channels"]
        num_blocks = SHUFFLENETV2_CONFIGS[net_size]["num_blocks"]
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.num_features = out_channels[3]
        self.num_classes = num_classes
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [ShuffleV2DownBlock(self.in_channels, out_channels)]
        layers += [ShuffleV2Block(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> ``relu(bn2(conv2(layer3 output)))``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        return F.relu(self.bn2(self.conv2(out)))

    def get_classifier(self) -> nn.Module:
        """The final ``nn.Linear``."""
        return self.linear


@register_model
def shufflenetv2(num_classes: int) -> CifarShuffleNetV2:
    """ShuffleNetV2 at net size 1 (mdistiller's ``ShuffleV2``)."""
    return CifarShuffleNetV2(net_size=1, num_classes=num_classes)
