"""The uniform model API every network in :mod:`sdd_search.models` answers.

SDD needs two things from a classifier: its last feature map (B x C x H x W, after the final
activation, before global pooling) and its head (a module mapping pooled vectors ``(..., C)``
to logits ``(..., K)``). :class:`DistillModel` exposes both with timm's names:
``forward_features``, ``get_classifier``, ``forward_head``; ``forward`` gives the logits alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from sdd_search.sdd import cell_logits


def global_average_pool(features: Tensor) -> Tensor:
    """Average a feature map B x C x H x W over its spatial dims into B x C vectors.

    A plain mean over (H, W) rather than ``nn.AvgPool2d``: it works for any map size and for
    channels_last tensors alike.
    """
    return features.mean((2, 3))


class DistillModel(nn.Module):
    """A classifier split into a feature extractor and a head over globally pooled features.

    Subclasses implement :meth:`forward_features` and :meth:`get_classifier` and set
    ``num_classes`` (K) and ``num_features`` (C, the channels of the feature map).

    ``forward(x)`` returns the global logits B x K, as timm's models do; SDD's training step
    takes the feature map from :meth:`forward_features` and pools it itself
    (:meth:`forward_cells`), so cell 0 costs no second pass.
    """

    num_classes: int
    num_features: int

    def forward_features(self, x: Tensor) -> Tensor:
        """Images B x 3 x H x W -> the last feature map B x C x H' x W'."""
        raise NotImplementedError

    def get_classifier(self) -> nn.Module:
        """The head: a module mapping pooled feature vectors (..., C) to logits (..., K)."""
        raise NotImplementedError

    def forward_head(self, features: Tensor) -> Tensor:
        """Feature map B x C x H x W -> global logits B x K (mean-pool, then the head)."""
        return self.get_classifier()(global_average_pool(features))

    def forward(self, x: Tensor) -> Tensor:
        """Images B x 3 x H x W -> global logits B x K."""
        return self.forward_head(self.forward_features(x))

    def forward_cells(self, x: Tensor, scales: Sequence[int] = (1, 2, 4)) -> Tensor:
        """Images B x 3 x H x W -> SDD's cell logits B x N x K, N = sum(m * m) over ``scales``.

        Cells are ordered by scale, then row-major (:func:`sdd_search.sdd.cell_logits`); with
        ``scales`` starting at 1, cell 0 is the global cell and equals ``forward(x)``.
        """
        return cell_logits(self.forward_features(x), self.get_classifier(), scales)


def init_fan_out_normal(model: nn.Module) -> None:
    """mdistiller's VGG/MobileNetV2 init: conv N(0, sqrt(2/fan_out)), BN (1, 0), linear N(0, 0.01)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
