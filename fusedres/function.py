"""FusedResidualBlock: a whole residual block as one autograd Function.

Convolutions run through ATen (cuDNN on a GPU); everything between them (batch norm,
ReLU, the residual add, the projection shortcut's batch norm, stochastic depth) runs
through the fused ops of fusedres.ops. Post-activation blocks (torchvision, timm ResNet):

    a_i = relu(bn_i(conv_i(a_{i-1})))   for every conv but the last, a_0 = x
    out = relu(f_n * bn_k(conv_k(a_{k-1})) + skip),  skip = x | bn_d(conv_d(pool(x)))

Pre-activation blocks (ResNet v2, timm resnetv2):

    p = relu(bn_1(x)),  h_i = conv_i(relu(bn_i(h_{i-1}))) ...,
    out = f_n * conv_k(...) + skip,  skip = x | conv_d(pool(p))

Saved for the backward: the block input, each conv output, per-channel statistics and the
last ReLU as a bit mask; the inner activations too unless ``recompute`` is set. Running
statistics are updated in the forward, on the device (no host synchronisation).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import distributed, ops
from .layout import memory_format, stats_dtype

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class ConvSpec:
    """A bias-free 2-D convolution's hyper-parameters."""
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    @staticmethod
    def of(conv: nn.Conv2d) -> "ConvSpec":
        return ConvSpec(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


@dataclass(frozen=True)
class BNSpec:
    """How one batch norm behaves in this call."""
    batch_stats: bool          # normalise with the batch's statistics (else the running ones)
    update: bool               # update running_mean / running_var / num_batches_tracked
    momentum: Optional[float]  # None: cumulative average
    eps: float
    sync: bool = False         # batch statistics over all ranks of the block's group


@dataclass(frozen=True)
class BlockSpec:
    """The static structure of a block; its tensors travel separately (see flatten)."""
    preact: bool
    convs: tuple               # ConvSpec per main-path conv
    bns: tuple                 # BNSpec per main-path BN (after conv i, or before it if preact)
    proj: Optional[ConvSpec] = None
    proj_pool: int = 0         # >0: AvgPool2d(k, k, ceil_mode=True, count_include_pad=False) first
    proj_bn: Optional[BNSpec] = None
    recompute: bool = False
    skip: bool = True          # False: the plain (no-shortcut) form of the block
    group: Any = dataclasses.field(default=None, compare=False)  # process group of the BNs with sync


def bn_spec_and_tensors(bn: nn.Module):
    """(BNSpec, (weight, bias, running_mean, running_var, num_batches_tracked)) of a norm
    layer: nn.BatchNorm2d and its subclasses follow their own training flag; a norm with
    running statistics and no momentum (torchvision's FrozenBatchNorm2d) is always in eval."""
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        has_running = bn.track_running_stats and bn.running_mean is not None
        spec = BNSpec(batch_stats=bn.training or not has_running,
                      update=bn.training and has_running,
                      momentum=None if bn.momentum is None else float(bn.momentum),
                      eps=float(bn.eps))
        return spec, (bn.weight, bn.bias, bn.running_mean if has_running else None,
                      bn.running_var if has_running else None,
                      bn.num_batches_tracked if has_running else None)
    if all(hasattr(bn, a) for a in ("weight", "bias", "running_mean", "running_var", "eps")):
        return (BNSpec(False, False, None, float(bn.eps)),
                (bn.weight, bn.bias, bn.running_mean, bn.running_var, None))
    raise TypeError(f"norm layer must be a BatchNorm2d or FrozenBatchNorm2d, got {type(bn).__name__}")


def _unflatten(spec: BlockSpec, tensors: Sequence[Optional[Tensor]]):
    k = len(spec.convs)
    weights = list(tensors[:k])
    bns = [tuple(tensors[k + 5 * i: k + 5 * i + 5]) for i in range(k)]
    return weights, bns, tensors[6 * k], tuple(tensors[6 * k + 1: 6 * k + 6])


def _tensor_index(spec: BlockSpec, what: str, i: int = 0, field: int = 0) -> int:
    """Position in the flat tensor list: 'w' conv i, 'bn' BN i field, 'wd', 'bnd' field."""
    k = len(spec.convs)
    return {"w": i, "bn": k + 5 * i + field, "wd": 6 * k, "bnd": 6 * k + 1 + field}[what]


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------


def _conv(x: Tensor, w: Tensor, cs: ConvSpec) -> Tensor:
    x = x.to(w.dtype)  # autocast, pre-activation: the first BN ran in x's own dtype
    return torch.ops.aten.convolution(x, w, None, list(cs.stride), list(cs.padding),
                                      list(cs.dilation), False, [0, 0], cs.groups)


def _conv_backward(dout: Tensor, inp: Tensor, w: Tensor, cs: ConvSpec, need_in: bool,
                   need_w: bool):
    if not (need_in or need_w):
        return None, None
    gi, gw, _ = torch.ops.aten.convolution_backward(
        dout.to(w.dtype), inp.to(w.dtype), w, None, list(cs.stride), list(cs.padding), list(cs.dilation), False,
        [0, 0], cs.groups, [need_in, need_w, False])
    return gi, gw


def _pool(x: Tensor, k: int) -> Tensor:
    if k == 0:
        return x
    return torch.ops.aten.avg_pool2d(x, [k, k], [k, k], [0, 0], True, False, None)


def _pool_backward(g: Tensor, x: Tensor, k: int) -> Tensor:
    if k == 0:
        return g
    return torch.ops.aten.avg_pool2d_backward(g, x, [k, k], [k, k], [0, 0], True, False, None)


def _bn_params(z: Tensor, t, bs: BNSpec, group=None):
    """(mean, rstd, scale, shift, count) of one BN: batch statistics through the fused op
    (which also updates the running statistics), or the running statistics in eval mode.
    ``count`` is the number of values per channel over all ranks (a [1] tensor) when the BN
    synchronises (distributed.py), else None."""
    w, b, rm, rv, nbt = t
    running = (rm, rv, nbt) if bs.update else (None, None, None)
    if bs.sync:
        gathered = distributed.gather_moments(ops.run_bn_moments(z), group)
        st = ops.run_bn_stats_from_moments(gathered, w, b, *running, bs.momentum, bs.eps)
        return (*st, distributed.global_count(gathered))
    if bs.batch_stats:
        return (*ops.run_bn_stats(z, w, b, *running, bs.momentum, bs.eps), None)
    sdt = stats_dtype(z)
    mean = rm.to(sdt)
    rstd = torch.rsqrt(rv.to(sdt) + bs.eps)
    scale = rstd * w.to(sdt) if w is not None else rstd
    shift = b.to(sdt) - mean * scale if b is not None else -mean * scale
    return mean, rstd, scale, shift, None


def _bn_relu(z: Tensor, st) -> Tensor:
    return ops.run_bn_act_fwd(z, st[2], st[3], None, None, None, None, True, False)[0]


def _same_layout(t: Tensor, like: Tensor) -> Tensor:
    return t.contiguous(memory_format=memory_format(like))


# --------------------------------------------------------------------------------------
# Forward and backward
# --------------------------------------------------------------------------------------


def _forward(spec: BlockSpec, x: Tensor, factor: Optional[Tensor], tensors, save: bool):
    """Run the block; returns (out, saved) with ``saved`` a dict of what backward needs."""
    W, B, Wd, Bd = _unflatten(spec, tensors)
    k = len(spec.convs)
    zs, acts, stats = [], [], []
    saved = {}
    # Keep conv outputs and activations only when the backward needs them: in inference
    # each is freed as soon as the next one exists, as in eager PyTorch.
    if not spec.preact:
        h = x
        for i in range(k):
            z = _conv(h, W[i], spec.convs[i])
            st = _bn_params(z, B[i], spec.bns[i], spec.group)
            if save:
                zs.append(z)
                stats.append(st)
            if i < k - 1:
                h = _bn_relu(z, st)
                if save:
                    acts.append(h)
        del h
        if spec.proj is not None:
            xp = _pool(x, spec.proj_pool)
            zd = _conv(xp, Wd, spec.proj)
            std = _bn_params(zd, Bd, spec.proj_bn, spec.group)
            out, mask = ops.run_bn_act_fwd(z, st[2], st[3], _same_layout(zd, z),
                                           std[2], std[3], factor, True, save)
            if save:
                saved.update(xp=xp if spec.proj_pool else None, zd=zd, stats_d=std)
        else:
            residual = _same_layout(x, z) if spec.skip else None
            out, mask = ops.run_bn_act_fwd(z, st[2], st[3], residual, None, None, factor, True,
                                           save)
        saved["mask"] = mask
    else:
        st = _bn_params(x, B[0], spec.bns[0], spec.group)
        stats.append(st)
        a0 = h = _bn_relu(x, st)
        if save:
            acts.append(h)
        for i in range(k):
            z = _conv(h, W[i], spec.convs[i])
            if save:
                zs.append(z)
            if i < k - 1:
                st = _bn_params(z, B[i + 1], spec.bns[i + 1], spec.group)
                h = _bn_relu(z, st)
                if save:
                    stats.append(st)
                    acts.append(h)
        del h
        if spec.proj is not None:
            xp = _pool(a0, spec.proj_pool)
            skip = _conv(xp, Wd, spec.proj)
            if save:
                saved.update(xp=xp if spec.proj_pool else None)
        else:
            skip = x if spec.skip else None
        del a0
        if factor is not None:
            z = z * factor.to(z.dtype).view(-1, 1, 1, 1)
        out = z + _same_layout(skip, z) if skip is not None else z
    if save:
        saved.update(zs=zs, stats=stats,
                     acts=[] if spec.recompute else acts)
    return out, saved


_STATS = 5  # (mean, rstd, scale, shift, count) per BN: see _bn_params


def _bn_act_bwd(group, counts, *args):
    """ops.run_bn_act_bwd; where a BN synchronises (its global count in ``counts``, one per
    BN the call covers), its reduction and elementwise pass with the ranks' sums between."""
    if all(c is None for c in counts):
        return ops.run_bn_act_bwd(*args)
    head, (scale_d, batch_stats, batch_stats_d), dz_add = args[:13], args[13:16], args[17]
    z = head[1]
    sums = ops.run_bn_act_bwd_reduce(*head)
    means = distributed.mean_sums(sums, counts, z.numel() // max(z.shape[1], 1), group)
    dz, dskip = ops.run_bn_act_bwd_apply(*head, scale_d, batch_stats, batch_stats_d, dz_add,
                                         means)
    return dz, dskip, sums


def _needs(ctx, spec: BlockSpec, what: str, i: int = 0, field: int = 0) -> bool:
    return ctx.needs_input_grad[3 + _tensor_index(spec, what, i, field)]


class FusedResidualBlock(torch.autograd.Function):
    """``FusedResidualBlock.apply(spec, x, factor, *tensors)``: one residual block.

    ``spec`` is a BlockSpec; ``factor`` an optional [N] per-sample branch factor
    (stochastic depth); ``tensors`` the flat list of conv weights and BN tensors
    (see flatten). Prefer ``fused_residual_block``, which builds both from modules, checks
    them and handles autocast. The backward is once-differentiable."""

    @staticmethod
    def forward(ctx, spec: BlockSpec, x: Tensor, factor: Optional[Tensor], *tensors):
        out, saved = _forward(spec, x, factor, tensors, save=True)
        ctx.spec = spec
        # Only conv weights are saved: the running statistics change in place every
        # forward, and the BN backward needs nothing of its parameters but their dtype.
        ctx.dtypes = [None if t is None else t.dtype for t in tensors]
        W, _, Wd, _ = _unflatten(spec, tensors)
        layout, flat = [], []
        for name, val in saved.items():
            if name == "stats":
                layout.append((name, len(val)))
                flat.extend(t for st in val for t in st)
            elif isinstance(val, (list, tuple)):
                layout.append((name, len(val)))
                flat.extend(val)
            else:
                layout.append((name, None))
                flat.append(val)
        ctx.layout = layout
        ctx.save_for_backward(x, factor, Wd, *W, *flat)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        spec: BlockSpec = ctx.spec
        k = len(spec.convs)
        x, factor, Wd, *rest = ctx.saved_tensors
        W, rest = rest[:k], rest[k:]
        saved = {}
        for name, n in ctx.layout:
            if n is None:
                saved[name] = rest.pop(0)
            elif name == "stats":
                items = [rest.pop(0) for _ in range(_STATS * n)]
                saved[name] = [tuple(items[_STATS * j: _STATS * j + _STATS]) for j in range(n)]
            else:
                saved[name] = [rest.pop(0) for _ in range(n)]
        grads = [None] * len(ctx.dtypes)
        if spec.preact:
            dx = _backward_preact(ctx, spec, dout, x, factor, W, Wd, saved, grads)
        else:
            dx = _backward_post(ctx, spec, dout, x, factor, W, Wd, saved, grads)
        return (None, dx, None, *grads)


def _set_bn_grads(ctx, spec, grads, sums, what, i=0, offset=0):
    """dgamma = sum g*xhat and dbeta = sum g, in each parameter's dtype."""
    for field, row in ((0, offset + 1), (1, offset)):
        j = _tensor_index(spec, what, i, field)
        if ctx.dtypes[j] is not None and ctx.needs_input_grad[3 + j]:
            grads[j] = sums[row].to(ctx.dtypes[j])


def _bn_needs_sums(ctx, spec, what, i=0) -> bool:
    return _needs(ctx, spec, what, i, 0) or _needs(ctx, spec, what, i, 1)


def _inner_act(spec, saved, i: int, source: Tensor) -> Tensor:
    """Inner activation i, saved or (recompute=True) recomputed from its BN input."""
    if not spec.recompute:
        return saved["acts"][i]
    return _bn_relu(source, saved["stats"][i])


def _backward_post(ctx, spec, dout, x, factor, W, Wd, saved, grads):
    k = len(spec.convs)
    zs, stats = saved["zs"], saved["stats"]
    need_x = ctx.needs_input_grad[1]
    st = stats[-1]
    last_bn = spec.bns[-1]
    if spec.proj is not None:
        std = saved["stats_d"]
        dz, dskip, sums = _bn_act_bwd(
            spec.group, (st[4], std[4]),
            dout, zs[-1], st[0], st[1], st[2], st[3], saved["mask"], 2, factor, 2,
            saved["zd"], std[0], std[1], std[2], last_bn.batch_stats, spec.proj_bn.batch_stats,
            _bn_needs_sums(ctx, spec, "bn", k - 1) or _bn_needs_sums(ctx, spec, "bnd"), None)
        if sums.numel():
            _set_bn_grads(ctx, spec, grads, sums, "bnd", offset=2)
    else:
        dz, dskip, sums = _bn_act_bwd(
            spec.group, (st[4],),
            dout, zs[-1], st[0], st[1], st[2], st[3], saved["mask"], 2, factor, int(spec.skip),
            None, None, None, None, last_bn.batch_stats, False,
            _bn_needs_sums(ctx, spec, "bn", k - 1), None)
    if sums.numel():
        _set_bn_grads(ctx, spec, grads, sums, "bn", k - 1)

    gin = None
    for i in reversed(range(k)):
        inp = x if i == 0 else _inner_act(spec, saved, i - 1, zs[i - 1])
        need_in = i > 0 or need_x
        gin, gw = _conv_backward(dz, inp, W[i], spec.convs[i], need_in, _needs(ctx, spec, "w", i))
        if gw is not None and _needs(ctx, spec, "w", i):
            grads[_tensor_index(spec, "w", i)] = gw
        if i > 0:
            st = stats[i - 1]
            dz, _, sums = _bn_act_bwd(
                spec.group, (st[4],),
                gin, zs[i - 1], st[0], st[1], st[2], st[3], None, 1, None, 0, None, None, None,
                None, spec.bns[i - 1].batch_stats, False,
                _bn_needs_sums(ctx, spec, "bn", i - 1), None)
            if sums.numel():
                _set_bn_grads(ctx, spec, grads, sums, "bn", i - 1)

    dx = gin if need_x else None
    if spec.proj is not None:
        xp = saved["xp"] if spec.proj_pool else x
        gxp, gwd = _conv_backward(dskip, xp, Wd, spec.proj, need_x, _needs(ctx, spec, "wd"))
        if gwd is not None and _needs(ctx, spec, "wd"):
            grads[_tensor_index(spec, "wd")] = gwd
        if need_x:
            dx = dx + _pool_backward(gxp, x, spec.proj_pool)
    elif need_x and spec.skip:
        dx = dx + dskip
    return dx


def _backward_preact(ctx, spec, dout, x, factor, W, Wd, saved, grads):
    k = len(spec.convs)
    zs, stats = saved["zs"], saved["stats"]
    need_x = ctx.needs_input_grad[1]
    dout = dout.contiguous(memory_format=memory_format(zs[-1]))
    dz = dout * factor.to(dout.dtype).view(-1, 1, 1, 1) if factor is not None else dout
    need_first = need_x or _bn_needs_sums(ctx, spec, "bn", 0)
    a0 = _inner_act(spec, saved, 0, x)
    gin = None
    for i in reversed(range(k)):
        inp = a0 if i == 0 else _inner_act(spec, saved, i, zs[i - 1])
        need_in = i > 0 or need_first
        gin, gw = _conv_backward(dz, inp, W[i], spec.convs[i], need_in, _needs(ctx, spec, "w", i))
        if gw is not None and _needs(ctx, spec, "w", i):
            grads[_tensor_index(spec, "w", i)] = gw
        if i > 0:
            st = stats[i]
            dz, _, sums = _bn_act_bwd(
                spec.group, (st[4],),
                gin, zs[i - 1], st[0], st[1], st[2], st[3], None, 1, None, 0, None, None, None,
                None, spec.bns[i].batch_stats, False, _bn_needs_sums(ctx, spec, "bn", i), None)
            if sums.numel():
                _set_bn_grads(ctx, spec, grads, sums, "bn", i)
    if spec.proj is not None:
        xp = saved["xp"] if spec.proj_pool else a0
        gxp, gwd = _conv_backward(dout, xp, Wd, spec.proj, need_first, _needs(ctx, spec, "wd"))
        if gwd is not None and _needs(ctx, spec, "wd"):
            grads[_tensor_index(spec, "wd")] = gwd
        if need_first:
            gin = gin + _pool_backward(gxp, a0, spec.proj_pool)
    if not need_first:
        return None
    st = stats[0]
    dx, _, sums = _bn_act_bwd(
        spec.group, (st[4],),
        _same_layout(gin, x), x, st[0], st[1], st[2], st[3], None, 1, None, 0, None, None,
        None, None, spec.bns[0].batch_stats, False, _bn_needs_sums(ctx, spec, "bn", 0),
        _same_layout(dout, x) if spec.proj is None and spec.skip else None)
    if sums.numel():
        _set_bn_grads(ctx, spec, grads, sums, "bn", 0)
    return dx if need_x else None


# --------------------------------------------------------------------------------------
# The checked entry point
# --------------------------------------------------------------------------------------


def _conv_out_hw(h: int, w: int, conv: nn.Conv2d):
    kh, kw = conv.weight.shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    return ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def _pool_out_hw(h: int, w: int, k: int):
    if k == 0:
        return h, w
    return (-(-(h - k) // k) + 1, -(-(w - k) // k) + 1)


def _check_conv(name: str, conv, c_in: int, x: Tensor, act_dtype: torch.dtype, cast: bool):
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
    if conv.bias is not None:
        raise ValueError(f"{name} must have bias=False, got a bias of shape {tuple(conv.bias.shape)}")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"{name} must use explicit zero padding, got padding={conv.padding!r}, "
                         f"padding_mode={conv.padding_mode!r}")
    w = conv.weight
    if w.device != x.device:
        raise ValueError(f"{name}.weight must be on {x.device} like x, got {w.device}")
    if w.shape[1] * conv.groups != c_in:
        raise ValueError(f"{name} expects {w.shape[1] * conv.groups} input channels, "
                         f"got an input with {c_in}")
    if w.dtype != act_dtype and not (cast and w.is_floating_point()):
        raise TypeError(f"{name}.weight must have dtype {act_dtype} like x, got {w.dtype}")


def _check_norm(name: str, tensors, c: int, x: Tensor, act_dtype: torch.dtype, spec: BNSpec,
                in_size: tuple):
    """``tensors``: the norm's (weight, bias, running_mean, running_var, ...), as
    bn_spec_and_tensors gives them (read once a call: a module attribute costs microseconds)."""
    allowed = {act_dtype, torch.float32} if act_dtype in (torch.float16, torch.bfloat16) else {act_dtype}
    for field, t in zip(("weight", "bias", "running_mean", "running_var"), tensors[:4]):
        if t is None:
            continue
        if t.shape != (c,):
            raise ValueError(f"{name}.{field} must have shape ({c},) to match {c} channels, "
                             f"got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name}.{field} must be on {x.device} like x, got {t.device}")
        if t.dtype not in allowed:
            raise TypeError(f"{name}.{field} must have dtype {' or '.join(sorted(map(str, allowed)))} "
                            f"for {act_dtype} activations, got {t.dtype}")
    dtypes = {t.dtype for t in tensors[:4] if t is not None}
    if len(dtypes) > 1:
        raise TypeError(f"{name}'s parameters and running statistics must share one dtype, "
                        f"got {sorted(map(str, dtypes))}")
    if spec.batch_stats and not spec.sync:  # synchronised: the other ranks' values count too
        n, _, h, w = in_size
        if n * h * w == 1:  # PyTorch's own message (torch.nn.functional._verify_batch_size)
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {torch.Size(in_size)}")


def fused_residual_block(x: Tensor, convs: Sequence[nn.Conv2d], norms: Sequence[nn.Module],
                         downsample: Optional[tuple] = None, preact: bool = False,
                         drop_factor: Optional[Tensor] = None, recompute: bool = False,
                         skip: bool = True, process_group=None) -> Tensor:
    """Run one residual block through the fused kernels.

    Args:
        x: [N, C, H, W] input, NCHW or channels_last (the output keeps its memory format).
        convs: the main path's bias-free convolutions, 2 (basic) or 3 (bottleneck).
        norms: one norm layer per conv (nn.BatchNorm2d or a subclass, or torchvision's
            FrozenBatchNorm2d): after each conv, or before each conv when ``preact``.
            Each follows its own training flag, momentum and eps.
        downsample: the projection shortcut as (pool, conv, norm): ``pool`` 0 or the
            kernel of an average pool before the conv (timm's avg_down), ``norm`` None for
            pre-activation blocks. None for the identity shortcut.
        preact: pre-activation (ResNet v2) block, no ReLU after the add.
        drop_factor: optional [N] per-sample factor on the residual branch (stochastic depth).
        recompute: recompute the inner activations in the backward instead of saving them.
        skip: False for the plain form, the same block without its shortcut (as in the
            plain networks of the degradation experiment); ``downsample`` must then be None.
        process_group: synchronise the batch statistics of every norm in training mode
            over this torch.distributed group, as nn.SyncBatchNorm does. By default the
            norms decide: nn.SyncBatchNorm norms synchronise over their own group (all of a
            block's norms must then be SyncBatchNorm, with one group), others do not. No
            collective runs in eval mode or with one rank (fusedres.distributed).

    Under autocast, x and the conv weights are cast to the autocast dtype here, and batch
    norm keeps its parameters and statistics in their own dtype."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got {x.dim()}-D with shape {tuple(x.shape)}")
    if len(convs) not in (2, 3) or len(norms) != len(convs):
        raise ValueError(f"a block needs 2 or 3 convs and one norm per conv, got {len(convs)} "
                         f"convs and {len(norms)} norms")
    dev_type = x.device.type
    if torch.is_autocast_enabled(dev_type) and x.is_floating_point():
        # As eager under autocast: convolutions in the autocast dtype, batch norm in the
        # dtype of its input. A pre-activation block's first BN sees x itself, and its
        # identity shortcut adds x at full precision.
        dt = torch.get_autocast_dtype(dev_type)
        with torch.autocast(dev_type, enabled=False):
            return _run(x if preact else x.to(dt), convs, norms, downsample, preact,
                        drop_factor, recompute, dt, skip, process_group)
    return _run(x, convs, norms, downsample, preact, drop_factor, recompute, None, skip,
                process_group)


def _sync_specs(specs, norms, group):
    """Mark the BNs that synchronise: batch statistics in training mode, as nn.SyncBatchNorm."""
    if distributed.world_size(group) <= 1:
        return specs
    return [dataclasses.replace(s, sync=s.batch_stats and getattr(n, "training", False))
            for s, n in zip(specs, norms)]


def _run(x, convs, norms, downsample, preact, drop_factor, recompute, cast_dtype, skip=True,
         process_group=None):
    if x.dtype not in _FLOAT_TYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    act = cast_dtype or x.dtype  # dtype of the convolutions and of every BN after one
    weights = [c.weight if cast_dtype is None else c.weight.to(cast_dtype) for c in convs]
    n, c, h, w = x.shape
    bn_specs, bn_tensors = [], []
    for norm in norms:
        s, t = bn_spec_and_tensors(norm)
        bn_specs.append(s)
        bn_tensors.append(t)
    dnorm = downsample[2] if downsample is not None else None
    group = distributed.block_group([*norms, dnorm], process_group)
    bn_specs = _sync_specs(bn_specs, norms, group)

    # Check everything before any kernel runs, so an error leaves the statistics untouched.
    c_cur, hw = c, (h, w)
    if preact:
        _check_norm("norms[0]", bn_tensors[0], c, x, x.dtype, bn_specs[0], (n, c, h, w))
    for i, conv in enumerate(convs):
        _check_conv(f"convs[{i}]", conv, c_cur, x, act, cast_dtype is not None)
        hw = _conv_out_hw(*hw, conv)
        c_cur = conv.weight.shape[0]
        if not preact:
            _check_norm(f"norms[{i}]", bn_tensors[i], c_cur, x, act, bn_specs[i], (n, c_cur, *hw))
        elif i + 1 < len(convs):
            _check_norm(f"norms[{i + 1}]", bn_tensors[i + 1], c_cur, x, act, bn_specs[i + 1],
                        (n, c_cur, *hw))
    proj = proj_bn_spec = None
    pool = 0
    wd, bnd = None, (None,) * 5
    if downsample is not None and not skip:
        raise ValueError("skip=False (the plain form) takes no downsample, got one")
    if downsample is not None:
        pool, dconv, dnorm = downsample
        _check_conv("downsample conv", dconv, c, x, act, cast_dtype is not None)
        dhw = _conv_out_hw(*_pool_out_hw(h, w, pool), dconv)
        if dconv.weight.shape[0] != c_cur or dhw != hw:
            raise ValueError(f"the shortcut gives [{dconv.weight.shape[0]}, {dhw[0]}, {dhw[1]}] "
                             f"but the main path gives [{c_cur}, {hw[0]}, {hw[1]}]")
        proj = ConvSpec.of(dconv)
        wd = dconv.weight if cast_dtype is None else dconv.weight.to(cast_dtype)
        if dnorm is not None:
            proj_bn_spec, bnd = bn_spec_and_tensors(dnorm)
            proj_bn_spec = _sync_specs([proj_bn_spec], [dnorm], group)[0]
            _check_norm("downsample norm", bnd, c_cur, x, act, proj_bn_spec, (n, c_cur, *hw))
        elif not preact:
            raise ValueError("a post-activation block's projection shortcut needs a norm layer")
    elif skip and (c_cur != c or hw != (h, w)):
        raise ValueError(f"identity shortcut needs the main path to keep the shape [{c}, {h}, {w}], "
                         f"got [{c_cur}, {hw[0]}, {hw[1]}]: pass a downsample")
    if drop_factor is not None:
        if drop_factor.shape != (n,) or drop_factor.device != x.device:
            raise ValueError(f"drop_factor must have shape ({n},) on {x.device}, got "
                             f"{tuple(drop_factor.shape)} on {drop_factor.device}")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()

    spec = BlockSpec(preact=preact, convs=tuple(ConvSpec.of(cv) for cv in convs),
                     bns=tuple(bn_specs), proj=proj, proj_pool=pool, proj_bn=proj_bn_spec,
                     recompute=recompute, skip=skip,
                     group=group if any(b.sync for b in (*bn_specs, proj_bn_spec) if b) else None)
    tensors = [*weights, *[t for bt in bn_tensors for t in bt], wd, *bnd]
    grad_needed = torch.is_grad_enabled() and (
        x.requires_grad or any(t is not None and t.requires_grad for t in tensors)
        or (drop_factor is not None and drop_factor.requires_grad))
    if not grad_needed:
        return _forward(spec, x, drop_factor, tensors, save=False)[0]
    return FusedResidualBlock.apply(spec, x, drop_factor, *tensors)


# --------------------------------------------------------------------------------------
# A batch norm on its own (the stem's), synchronised: what nn.SyncBatchNorm computes, on
# the fused primitives, so that it also runs on CPU tensors (gloo)
# --------------------------------------------------------------------------------------


class FusedBatchNorm(torch.autograd.Function):
    """``FusedBatchNorm.apply(spec, group, x, weight, bias, running_mean, running_var,
    num_batches_tracked)``: y = bn(x), statistics synchronised over ``group`` when
    ``spec.sync``. Prefer ``fused_batch_norm``."""

    @staticmethod
    def forward(ctx, spec: BNSpec, group, x: Tensor, *tensors):
        st = _bn_params(x, tensors, spec, group)
        y, _ = ops.run_bn_act_fwd(x, st[2], st[3], None, None, None, None, False, False)
        ctx.spec, ctx.group = spec, group
        ctx.dtypes = [None if t is None else t.dtype for t in tensors[:2]]
        ctx.save_for_backward(x, *st)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, mean, rstd, scale, shift, count = ctx.saved_tensors
        need_params = any(ctx.needs_input_grad[3:5])
        head = (_same_layout(dy, x), x, mean, rstd, scale, shift, None, 0, None, 0, None, None,
                None)
        dx = None
        if ctx.needs_input_grad[2]:
            dx, _, sums = _bn_act_bwd(ctx.group, (count,), *head, None, ctx.spec.batch_stats,
                                      False, need_params, None)
        elif need_params:  # this rank's sums alone: no all_reduce, as nn.SyncBatchNorm
            sums = ops.run_bn_act_bwd_reduce(*head)
        grads = [None] * 5
        for i, row in ((0, 1), (1, 0)):  # dgamma = sum g*xhat, dbeta = sum g: this rank's
            if ctx.dtypes[i] is not None and ctx.needs_input_grad[3 + i]:
                grads[i] = sums[row].to(ctx.dtypes[i])
        return (None, None, dx, *grads)


def fused_batch_norm(x: Tensor, norm: nn.Module, process_group=None) -> Tensor:
    """``norm(x)`` for a 4-D x through the fused primitives, its batch statistics in
    training mode synchronised over ``process_group`` (default: ``norm``'s own if it is an
    nn.SyncBatchNorm), as nn.SyncBatchNorm computes them but also on CPU tensors."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D [N, C, H, W] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    group = distributed.block_group([norm], process_group)
    spec, tensors = bn_spec_and_tensors(norm)
    spec = _sync_specs([spec], [norm], group)[0]
    _check_norm("norm", tensors, x.shape[1], x, x.dtype, spec, tuple(x.shape))
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    return FusedBatchNorm.apply(spec, group if spec.sync else None, x, *tensors)
