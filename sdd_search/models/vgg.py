"""CIFAR VGGs with batch norm (vgg8, vgg11, vgg13, vgg16, vgg19), ported from mdistiller.

Source: megvii-research/mdistiller, mdistiller/models/cifar/vgg.py (the ``vgg*_bn`` variants).
Module names match the original so its checkpoints load with ``load_state_dict``. Five conv
blocks; max-pooling after the first three (and after the fourth only for 64 x 64 inputs, as in
the original). The feature map is ``relu(block4(x))``: 4 x 4 for 32 x 32 inputs, 2 x 2 for
16 x 16.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from sdd_search.models.base import DistillModel, init_fan_out_normal
from sdd_search.models.registry import register_model

# Output channels of each conv in each of the five blocks, by VGG configuration.
VGG_CONFIGS: dict[str, list[list[int]]] = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [
        [64, 64],
        [128, 128],
        [256, 256, 256, 256],
        [512, 512, 512, 512],
        [512, 512, 512, 512],
    ],
}

# mdistiller pools after block3 only for TinyImageNet's 64 x 64 inputs.
_POOL_AFTER_BLOCK3_INPUT_SIZE = 64


def make_conv_block(channels: list[int], batch_norm: bool, in_channels: int) -> nn.Sequential:
    """Conv3x3(-BN)-ReLU layers, without the last ReLU (the caller applies it)."""
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        in_channels = out_channels
    return nn.Sequential(*layers[:-1])


class CifarVGG(DistillModel):
    """VGG for 32 x 32 inputs with a global-average-pool + linear head.

    Args:
        config: channels per conv per block, one of :data:`VGG_CONFIGS`.
        batch_norm: BN after every conv (True for every registered model).
        num_classes: K, the number of logits.
    """

    def __init__(self, config: list[list[int]], batch_norm: bool = True, num_classes: int = 100):
        super().__init__()
        self.block0 = make_conv_block(config[0], batch_norm, 3)
        self.block1 = make_conv_block(config[1], batch_norm, config[0][-1])
        self.block2 = make_conv_block(config[2], batch_norm, config[1][-1])
        self.block3 = make_conv_block(config[3], batch_norm, config[2][-1])
        self.block4 = make_conv_block(config[4], batch_norm, config[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.num_features = config[4][-1]
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes)

        init_fan_out_normal(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> ``relu(block4(...))``."""
        input_height = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if input_height == _POOL_AFTER_BLOCK3_INPUT_SIZE:
            x = self.pool3(x)
        return F.relu(self.block4(x))

    def get_classifier(self) -> nn.Module:
        """The final ``nn.Linear``."""
        return self.classifier


@register_model
def vgg8(num_classes: int) -> CifarVGG:
    """VGG-8 with batch norm (configuration "S", mdistiller's vgg8_bn)."""
    return CifarVGG(VGG_CONFIGS["S"], batch_norm=True, num_classes=num_classes)


@register_model
def vgg11(num_classes: int) -> CifarVGG:
    """VGG-11 with batch norm (configuration "A", mdistiller's vgg11_bn)."""
    return CifarVGG(VGG_CONFIGS["A"], batch_norm=True, num_classes=num_classes)


@register_model
def vgg13(num_classes: int) -> CifarVGG:
    """VGG-13 with batch norm (configuration "B", mdistiller's vgg13_bn)."""
    return CifarVGG(VGG_CONFIGS["B"], batch_norm=True, num_classes=num_classes)


@register_model
def vgg16(num_classes: int) -> CifarVGG:
    """VGG-16 with batch norm (configuration "D", mdistiller's vgg16_bn)."""
    return CifarVGG(VGG_CONFIGS["D"], batch_norm=True, num_classes=num_classes)


@register_model
def vgg19(num_classes: int) -> CifarVGG:
    """VGG-19 with batch norm (configuration "E", mdistiller's vgg19_bn)."""
    return CifarVGG(VGG_CONFIGS["E"], batch_norm=True, num_classes=num_classes)
