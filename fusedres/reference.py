"""fusedres in plain PyTorch: the oracle for every test and the baseline for benchmarks.

Two levels, both free of Triton and of the rest of fusedres:

* The fused primitives (``bn_stats``, ``bn_act_fwd``, ``bn_act_bwd`` and the pieces
  synchronised batch norm and gated blocks call: ``bn_moments``, ``bn_stats_from_moments``,
  ``bn_stats_pool``, ``bn_pool``, ``bn_act_bwd_reduce``, ``bn_act_bwd_apply``) with exactly
  the arguments and results of the Triton launchers (fusedres.kernels) and of csrc_ref. The
  autograd Function runs on these when the backend is "reference" (CPU tensors by default).
* Residual blocks written the way torchvision and timm write them (``BasicBlock``,
  ``Bottleneck``, ``PreActBasicBlock``, ``PreActBottleneck``), with torchvision's
  constructor and attribute names, so a state_dict moves between them and the fused blocks.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layout import is_channels_last, memory_format, stats_dtype

# ---------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------


def _per_channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _acc(t: Tensor) -> Tensor:
    return t.to(stats_dtype(t))


def _branch_factor(factor: Tensor, dtype: torch.dtype) -> Tensor:
    """The branch factor, [N] (per sample) or [N, C] (per sample and channel: a gate),
    as an [N, 1 or C, 1, 1] multiplier."""
    C = factor.shape[1] if factor.dim() == 2 else 1  # (not -1: N may be 0)
    return factor.to(dtype).reshape(factor.shape[0], C, 1, 1)


def pack_relu_mask(keep: Tensor) -> Tensor:
    """Pack a bool [N, C, H, W] tensor 8 to a byte along its contiguous axis (layout.mask_shape)."""
    N, C, H, W = keep.shape
    weights = (1 << torch.arange(8, device=keep.device, dtype=torch.int32))
    if is_channels_last(keep):
        b = keep.permute(0, 2, 3, 1).reshape(N, H * W, C)
        b = F.pad(b.to(torch.int32), (0, (-C) % 8))
    else:
        b = keep.reshape(N, C, H * W)
        b = F.pad(b.to(torch.int32), (0, (-(H * W)) % 8))
    b = b.view(b.shape[0], b.shape[1], b.shape[2] // 8, 8)
    return (b * weights).sum(-1).to(torch.uint8).contiguous()


def unpack_relu_mask(mask: Tensor, like: Tensor) -> Tensor:
    """Inverse of pack_relu_mask for a tensor shaped and laid out as ``like``."""
    N, C, H, W = like.shape
    bits = (mask.to(torch.int32).unsqueeze(-1) >> torch.arange(8, device=mask.device)) & 1
    bits = bits.flatten(-2).bool()
    if is_channels_last(like):
        return bits[:, :, :C].reshape(N, H, W, C).permute(0, 3, 1, 2)
    return bits[:, :, :H * W].reshape(N, C, H, W)


def bn_stats(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             running_mean: Optional[Tensor], running_var: Optional[Tensor],
             num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float):
    """Batch mean, rstd, scale = gamma*rstd, shift = beta - mean*scale per channel, as one
    [4, C] tensor with those rows; updates the running statistics (and counts the batch)
    when running_mean is given."""
    C = x.shape[1]
    sdt = stats_dtype(x)
    update = running_mean is not None
    if update and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if x.numel() == 0:
        zeros = x.new_zeros(C, dtype=sdt)
        return torch.stack([zeros, torch.ones_like(zeros), zeros, zeros])
    var, mean = torch.var_mean(_acc(x), dim=(0, 2, 3), correction=0)
    rstd = torch.rsqrt(var + eps)
    scale = rstd * weight.to(sdt) if weight is not None else rstd.clone()
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(sdt)
    if update:
        count = x.numel() // C
        if momentum is None:  # cumulative average, factor computed on the device
            f = 1.0 / num_batches_tracked.to(sdt)
        else:
            f = momentum
        new_mean = (1 - f) * running_mean.to(sdt) + f * mean
        new_var = (1 - f) * running_var.to(sdt) + f * var * (count / (count - 1))
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    return torch.stack([mean, rstd, scale, shift])


def bn_pool(x: Tensor) -> Tensor:
    """mean over H*W of x per (sample, channel), [N, C] in the statistics dtype (zeros
    where H*W is 0): a squeeze-excite / ECA gate's pooled input in eval mode."""
    N, C, H, W = x.shape
    if H * W == 0:
        return x.new_zeros((N, C), dtype=stats_dtype(x))
    return _acc(x).mean((2, 3))


def bn_stats_pool(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                  eps: float):
    """bn_stats (the same [4, C] statistics and running-statistics update) and
    bn_pool(x), [N, C]: what a gated block's training forward needs from one pass over x."""
    return (bn_stats(x, weight, bias, running_mean, running_var, num_batches_tracked,
                     momentum, eps), bn_pool(x))


def bn_moments(x: Tensor) -> Tensor:
    """This process's share of the batch statistics, in the form ranks exchange under
    synchronised batch norm: [3, C] rows (count, mean, M2) per channel, M2 the sum of
    squared deviations from the mean; zeros for an empty x."""
    C = x.shape[1]
    if x.numel() == 0:
        return x.new_zeros((3, C), dtype=stats_dtype(x))
    var, mean = torch.var_mean(_acc(x), dim=(0, 2, 3), correction=0)
    count = x.numel() // C
    return torch.stack([torch.full_like(mean, count), mean, var * count])


def bn_stats_from_moments(moments: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                          eps: float):
    """bn_stats of the union of R batches given their bn_moments stacked as [R, 3, C]
    (rows with count 0 take no part), [4, C] as bn_stats: the same results and running-statistics update as
    bn_stats on the concatenated batch, and as bn_stats on an empty batch if all are empty."""
    sdt = moments.dtype
    count, mean_r, m2_r = moments[:, 0], moments[:, 1], moments[:, 2]
    n = count.sum(0)
    empty = n == 0
    mean = (count * mean_r).sum(0) / n.clamp(min=1)
    m2 = m2_r.sum(0) + (count * (mean_r - mean) ** 2).sum(0)
    rstd = torch.where(empty, 1.0, torch.rsqrt(m2 / n.clamp(min=1) + eps))
    scale = rstd * weight.to(sdt) if weight is not None else rstd.clone()
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(sdt)
    scale, shift = torch.where(empty, 0.0, scale), torch.where(empty, 0.0, shift)
    if running_mean is not None:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        f = 1.0 / num_batches_tracked.to(sdt) if momentum is None else momentum
        new_mean = (1 - f) * running_mean.to(sdt) + f * mean
        new_var = (1 - f) * running_var.to(sdt) + f * m2 / (n - 1)
        running_mean.copy_(torch.where(empty, running_mean.to(sdt), new_mean))
        running_var.copy_(torch.where(empty, running_var.to(sdt), new_var))
    return torch.stack([mean, rstd, scale, shift])


def running_stats(weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                  running_var: Tensor, eps: float, sdt: torch.dtype) -> Tensor:
    """What eval mode normalises with, [4, C] rows (mean, rstd, scale, shift): the running
    statistics, scale = gamma*rsqrt(running_var + eps), shift = beta - running_mean*scale."""
    mean = running_mean.to(sdt)
    rstd = torch.rsqrt(running_var.to(sdt) + eps)
    scale = rstd * weight.to(sdt) if weight is not None else rstd
    shift = (bias.to(sdt) - mean * scale) if bias is not None else -mean * scale
    return torch.stack([mean, rstd, scale, shift])


def bn_act_fwd(z: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
               weight: Optional[Tensor], bias: Optional[Tensor],
               running_mean: Optional[Tensor], running_var: Optional[Tensor], eps: float,
               skip: Optional[Tensor], skip_scale: Optional[Tensor],
               skip_shift: Optional[Tensor], skip_weight: Optional[Tensor],
               skip_bias: Optional[Tensor], skip_running_mean: Optional[Tensor],
               skip_running_var: Optional[Tensor], skip_eps: float, skip_norm: bool,
               factor: Optional[Tensor], relu: bool, write_mask: bool):
    """y = act(factor[n(, c)]*(z*scale + shift) + skip), skip = r | zd*skip_scale + skip_shift
    (``skip_norm``); ``factor`` [N] or [N, C]. ``scale`` None (eval): scale and shift from running_stats(weight, bias,
    running_mean, running_var, eps); likewise ``skip_scale`` None for the projection BN.
    Returns (y, packed ReLU mask or an empty uint8 tensor, stats, skip_stats): the [4, C]
    running_stats derived in eval mode, else empty tensors."""
    sdt = stats_dtype(z)
    stats, skip_stats = z.new_empty((0,), dtype=sdt), z.new_empty((0,), dtype=sdt)
    if scale is None:
        stats = running_stats(weight, bias, running_mean, running_var, eps, sdt)
        scale, shift = stats[2], stats[3]
    v = _acc(z) * _per_channel(scale) + _per_channel(shift)
    if factor is not None:
        v = v * _branch_factor(factor, v.dtype)
    if skip is not None:
        if skip_norm:
            if skip_scale is None:
                skip_stats = running_stats(skip_weight, skip_bias, skip_running_mean,
                                           skip_running_var, skip_eps, sdt)
                skip_scale, skip_shift = skip_stats[2], skip_stats[3]
            v = v + (_acc(skip) * _per_channel(skip_scale) + _per_channel(skip_shift))
        else:
            v = v + _acc(skip)
    out = torch.where(v < 0, 0.0, v) if relu else v
    y = out.to(z.dtype).contiguous(memory_format=memory_format(z))
    if write_mask:
        mask = pack_relu_mask(~(v <= 0).contiguous(memory_format=memory_format(z)))
    else:
        mask = z.new_empty((0,), dtype=torch.uint8)
    return y, mask, stats, skip_stats


def _grad_terms(dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd,
                mean_d, rstd_d):
    """(g, g_b, xhat, xhat_d): dy through the ReLU, times the branch factor, the normalised
    z, and the normalised zd of a projection BN (None without one)."""
    g = _acc(dy)
    if mask_mode == 1:
        keep = ~((_acc(z) * _per_channel(scale) + _per_channel(shift)) <= 0)
        g = torch.where(keep, g, 0.0)
    elif mask_mode == 2:
        g = torch.where(unpack_relu_mask(mask, z), g, 0.0)
    g_b = g * _branch_factor(factor, g.dtype) if factor is not None else g
    xhat = (_acc(z) - _per_channel(mean)) * _per_channel(rstd)
    xhat_d = (_acc(zd) - _per_channel(mean_d)) * _per_channel(rstd_d) if skip_mode == 2 else None
    return g, g_b, xhat, xhat_d


def _sums(g, g_b, xhat, xhat_d, per_sample: bool = False) -> Tensor:
    dims = (2, 3) if per_sample else (0, 2, 3)
    sums = [g_b.sum(dims), (g_b * xhat).sum(dims)]
    if xhat_d is not None:
        sums += [g.sum(dims), (g * xhat_d).sum(dims)]
    return torch.stack(sums)


def _apply(terms, dy, z, zd, scale, scale_d, skip_mode, batch_stats, batch_stats_d, dz_add,
           mean_sums, du_add=None):
    g, g_b, xhat, xhat_d = terms
    fmt = memory_format(z)
    ms = mean_sums.to(g.dtype)
    du = g_b if du_add is None else g_b + du_add.to(g.dtype)[:, :, None, None]
    if batch_stats:
        dz = _per_channel(scale) * (du - _per_channel(ms[0]) - xhat * _per_channel(ms[1]))
    else:
        dz = _per_channel(scale) * du
    if dz_add is not None:
        dz = dz + _acc(dz_add)
    dz = dz.to(z.dtype).contiguous(memory_format=fmt)
    if skip_mode == 1:
        dskip = g.to(dy.dtype, copy=True).contiguous(memory_format=fmt)
    elif skip_mode == 2:
        if batch_stats_d:
            dzd = _per_channel(scale_d) * (g - _per_channel(ms[2]) - xhat_d * _per_channel(ms[3]))
        else:
            dzd = _per_channel(scale_d) * g
        dskip = dzd.to(zd.dtype).contiguous(memory_format=fmt)
    else:
        dskip = z.new_empty(0)
    return dz, dskip


def bn_act_bwd_reduce(dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
                      shift: Tensor, mask: Optional[Tensor], mask_mode: int,
                      factor: Optional[Tensor], skip_mode: int, zd: Optional[Tensor],
                      mean_d: Optional[Tensor], rstd_d: Optional[Tensor],
                      per_sample: bool = False):
    """The per-channel sums of the backward, [2 or 4, C] in the statistics dtype:
    (sum g_b, sum g_b*xhat[, sum g, sum g*xhat_d] when skip_mode == 2). Under synchronised
    batch norm these are what the ranks add up before bn_act_bwd_apply. ``per_sample``:
    the same rows summed over H*W only, [2 or 4, N, C] (a gated block's A and B)."""
    return _sums(*_grad_terms(dy, z, mean, rstd, scale, shift, mask, mask_mode, factor,
                              skip_mode, zd, mean_d, rstd_d), per_sample)


def bn_act_bwd_apply(dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
                     shift: Tensor, mask: Optional[Tensor], mask_mode: int,
                     factor: Optional[Tensor], skip_mode: int, zd: Optional[Tensor],
                     mean_d: Optional[Tensor], rstd_d: Optional[Tensor],
                     scale_d: Optional[Tensor], batch_stats: bool, batch_stats_d: bool,
                     dz_add: Optional[Tensor], mean_sums: Tensor,
                     du_add: Optional[Tensor] = None):
    """dz (and dskip or dzd) given ``mean_sums``: the rows of bn_act_bwd_reduce divided by
    the number of values per channel they were summed over (all ranks' under synchronised
    batch norm). Rows are read only where batch_stats / batch_stats_d. ``du_add`` [N, C]
    is added to g_b before the BN backward, du = g_b + du_add[n, c] (a gate's dp/HW);
    dskip / dzd use g and never see it. Returns (dz, dskip)."""
    terms = _grad_terms(dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode,
                        zd, mean_d, rstd_d)
    return _apply(terms, dy, z, zd, scale, scale_d, skip_mode, batch_stats, batch_stats_d,
                  dz_add, mean_sums, du_add)


def bn_act_bwd(dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor, shift: Tensor,
               mask: Optional[Tensor], mask_mode: int, factor: Optional[Tensor],
               skip_mode: int, zd: Optional[Tensor], mean_d: Optional[Tensor],
               rstd_d: Optional[Tensor], scale_d: Optional[Tensor],
               batch_stats: bool, batch_stats_d: bool, need_sums: bool,
               dz_add: Optional[Tensor]):
    """Backward of bn_act_fwd; see fusedres.kernels.backward.bn_act_bwd for the contract.
    It is bn_act_bwd_apply(..., bn_act_bwd_reduce(...) / M) with M = N*H*W, the terms
    computed once for both."""
    terms = _grad_terms(dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode,
                        zd, mean_d, rstd_d)
    if batch_stats or need_sums or (skip_mode == 2 and batch_stats_d):
        sums = _sums(*terms)
        mean_sums = sums / max(z.numel() // max(z.shape[1], 1), 1)
    else:
        sums = mean_sums = z.new_empty(0, dtype=stats_dtype(z))
    dz, dskip = _apply(terms, dy, z, zd, scale, scale_d, skip_mode, batch_stats, batch_stats_d,
                       dz_add, mean_sums)
    return dz, dskip, sums


# ---------------------------------------------------------------------------------------
# Blocks, written as torchvision (models/resnet.py) and timm (resnet.py, resnetv2.py) do
# ---------------------------------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def projection(inplanes: int, outplanes: int, stride: int = 1, avg_down: bool = False,
               norm_layer: Optional[Callable[..., nn.Module]] = None) -> nn.Sequential:
    """The projection shortcut bn(conv1x1(x)); ``avg_down`` puts a 2x2 average pool in
    front of a stride-1 conv instead of striding it (timm's "d" and "t" ResNets)."""
    norm_layer = norm_layer or nn.BatchNorm2d
    if avg_down and stride > 1:
        pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
        return nn.Sequential(pool, conv1x1(inplanes, outplanes), norm_layer(outplanes))
    return nn.Sequential(conv1x1(inplanes, outplanes, stride), norm_layer(outplanes))


def drop_path_factor(x: Tensor, drop_prob: float, training: bool) -> Optional[Tensor]:
    """Per-sample stochastic-depth factor keep/keep_prob drawn as timm draws it, or None."""
    if drop_prob == 0.0 or not training:
        return None
    keep_prob = 1 - drop_prob
    return x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep_prob).div_(keep_prob).view(-1)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + skip)."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self.drop_path_rate = 0.0

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        factor = drop_path_factor(out, self.drop_path_rate, self.training)
        if factor is not None:
            out = out * factor.view(-1, 1, 1, 1)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity  # in place, as torchvision: under autocast the sum stays low precision
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5: the stride on the 3x3 conv)."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.drop_path_rate = 0.0

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        factor = drop_path_factor(out, self.drop_path_rate, self.training)
        if factor is not None:
            out = out * factor.view(-1, 1, 1, 1)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity  # in place, as torchvision: under autocast the sum stays low precision
        return self.relu(out)


class _PreActBase(nn.Module):
    def _preact_forward(self, x: Tensor, convs, norms) -> Tensor:
        x_preact = self.relu(norms[0](x))
        shortcut = self.downsample(x_preact) if self.downsample is not None else x
        out = x_preact
        for i, conv in enumerate(convs):
            out = conv(out)
            if i + 1 < len(convs):
                out = self.relu(norms[i + 1](out))
        factor = drop_path_factor(out, self.drop_path_rate, self.training)
        if factor is not None:
            out = out * factor.view(-1, 1, 1, 1)
        return out + shortcut


class PreActBasicBlock(_PreActBase):
    """ResNet v2 basic block: conv2(relu(bn2(conv1(relu(bn1(x)))))) + skip,
    skip = x or conv1x1(relu(bn1(x))), no ReLU after the add."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = (conv1x1(inplanes, planes, stride)
                           if stride != 1 or inplanes != planes else None)
        self.stride = stride
        self.drop_path_rate = 0.0

    def forward(self, x: Tensor) -> Tensor:
        return self._preact_forward(x, [self.conv1, self.conv2], [self.bn1, self.bn2])


class PreActBottleneck(_PreActBase):
    """ResNet v2 bottleneck (timm's resnetv2 PreActBottleneck, bottle_ratio 0.25)."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = (conv1x1(inplanes, out_planes, stride)
                           if stride != 1 or inplanes != out_planes else None)
        self.stride = stride
        self.drop_path_rate = 0.0

    def forward(self, x: Tensor) -> Tensor:
        return self._preact_forward(x, [self.conv1, self.conv2, self.conv3],
                                    [self.bn1, self.bn2, self.bn3])
