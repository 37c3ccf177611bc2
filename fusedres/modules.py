"""Drop-in nn.Module blocks over FusedResidualBlock.

They subclass the plain-PyTorch blocks of fusedres.reference, which copy torchvision's
constructor, attribute names and errors, so state_dict keys match torchvision's and
``torchvision.models.resnet.ResNet(FusedBottleneck, [3, 4, 6, 3])`` builds a fused model.
Norm layers stay the modules they are; each follows its own ``.train()``/``.eval()``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import reference
from .function import fused_residual_block


def split_downsample(ds: Optional[nn.Module], preact: bool = False):
    """(pool, conv, norm) of a projection shortcut: Sequential(conv, norm) as torchvision
    builds it, Sequential(AvgPool2d, conv, norm) as timm's avg_down does, or a bare conv
    (pre-activation). Raises TypeError for anything else."""
    if ds is None:
        return None
    if isinstance(ds, nn.Conv2d):
        return (0, ds, None)
    mods = [m for m in (ds.children() if isinstance(ds, nn.Sequential) else [ds])
            if not isinstance(m, nn.Identity)]
    pool = 0
    if mods and isinstance(mods[0], nn.AvgPool2d):
        p = mods.pop(0)
        k = p.kernel_size if isinstance(p.kernel_size, int) else p.kernel_size[0]
        s = p.stride if isinstance(p.stride, int) else p.stride[0]
        if k != s or p.padding not in (0, (0, 0)) or not p.ceil_mode or p.count_include_pad:
            raise TypeError("only AvgPool2d(k, k, ceil_mode=True, count_include_pad=False) "
                            f"is supported before the shortcut conv, got {p}")
        pool = 1 if k == 1 else k
        pool = 0 if k == 1 else pool
    if len(mods) == 1 and isinstance(mods[0], nn.Conv2d):
        return (pool, mods[0], None)
    if len(mods) == 2 and isinstance(mods[0], nn.Conv2d):
        return (pool, mods[0], mods[1])
    raise TypeError(f"unsupported downsample module: {ds}")


class _FusedMixin:
    recompute: bool = False

    def _drop_factor(self, x: Tensor) -> Optional[Tensor]:
        rate = getattr(self, "drop_path_rate", 0.0)
        factor = reference.drop_path_factor(x, rate, self.training)
        return factor


class FusedBasicBlock(_FusedMixin, reference.BasicBlock):
    """torchvision's BasicBlock with its BN, ReLU and residual add fused."""

    def forward(self, x: Tensor) -> Tensor:
        return fused_residual_block(x, [self.conv1, self.conv2], [self.bn1, self.bn2],
                                    split_downsample(self.downsample), False,
                                    self._drop_factor(x), self.recompute)


class FusedBottleneck(_FusedMixin, reference.Bottleneck):
    """torchvision's Bottleneck with its BNs, ReLUs and residual add fused."""

    def forward(self, x: Tensor) -> Tensor:
        return fused_residual_block(x, [self.conv1, self.conv2, self.conv3],
                                    [self.bn1, self.bn2, self.bn3],
                                    split_downsample(self.downsample), False,
                                    self._drop_factor(x), self.recompute)


class FusedPreActBlock(_FusedMixin, reference.PreActBasicBlock):
    """Pre-activation (ResNet v2) basic block, fused."""

    def forward(self, x: Tensor) -> Tensor:
        return fused_residual_block(x, [self.conv1, self.conv2], [self.bn1, self.bn2],
                                    split_downsample(self.downsample, True), True,
                                    self._drop_factor(x), self.recompute)


class FusedPreActBottleneck(_FusedMixin, reference.PreActBottleneck):
    """Pre-activation (ResNet v2) bottleneck block, fused."""

    def forward(self, x: Tensor) -> Tensor:
        return fused_residual_block(x, [self.conv1, self.conv2, self.conv3],
                                    [self.bn1, self.bn2, self.bn3],
                                    split_downsample(self.downsample, True), True,
                                    self._drop_factor(x), self.recompute)
