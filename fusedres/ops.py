"""torch.library custom ops over the fused primitives.

Each op dispatches at run time to the backend of its tensors (backend.py). Fake (meta)
kernels give torch.compile the output shapes, so a model with fused blocks traces without
graph breaks; ``bn_stats`` declares the running statistics it updates in place.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backend import implementation
from .layout import mask_shape, memory_format, stats_dtype
from .records import ActOut, BNParams, BNStats, BwdArgs, BwdOut, Norm


@torch.library.custom_op("fusedres::bn_stats",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def bn_stats(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             running_mean: Optional[Tensor], running_var: Optional[Tensor],
             num_batches_tracked: Optional[Tensor], momentum: Optional[float],
             eps: float) -> Tensor:
    """Per-channel batch statistics, [4, C] rows (mean, rstd, scale, shift); updates the
    running statistics and counts the batch in num_batches_tracked."""
    return implementation(x.device).bn_stats(
        x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps)


@bn_stats.register_fake
def _(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    return x.new_empty((4, x.shape[1]), dtype=stats_dtype(x))


@torch.library.custom_op("fusedres::bn_stats_pool",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def bn_stats_pool(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                  eps: float) -> tuple[Tensor, Tensor]:
    """bn_stats ([4, C], the same running-statistics update) and the mean over H*W of x
    per (sample, channel), [N, C]: a gated block's pooled input, from the same pass."""
    return tuple(implementation(x.device).bn_stats_pool(
        x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps))


@bn_stats_pool.register_fake
def _(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    sdt = stats_dtype(x)
    return x.new_empty((4, x.shape[1]), dtype=sdt), x.new_empty(x.shape[:2], dtype=sdt)


@torch.library.custom_op("fusedres::bn_pool", mutates_args=())
def bn_pool(x: Tensor) -> Tensor:
    """The mean over H*W of x per (sample, channel), [N, C] (a gated block in eval mode)."""
    return implementation(x.device).bn_pool(x)


@bn_pool.register_fake
def _(x):
    return x.new_empty(x.shape[:2], dtype=stats_dtype(x))


@torch.library.custom_op("fusedres::bn_act_fwd", mutates_args=())
def bn_act_fwd(z: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
               weight: Optional[Tensor], bias: Optional[Tensor],
               running_mean: Optional[Tensor], running_var: Optional[Tensor], eps: float,
               skip: Optional[Tensor], skip_scale: Optional[Tensor],
               skip_shift: Optional[Tensor], skip_weight: Optional[Tensor],
               skip_bias: Optional[Tensor], skip_running_mean: Optional[Tensor],
               skip_running_var: Optional[Tensor], skip_eps: float, skip_norm: bool,
               factor: Optional[Tensor], relu: bool,
               write_mask: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = act(factor[n(, c)]*(z*scale + shift) + skip) (factor [N] or [N, C]), its packed
    ReLU mask, and in eval mode (scale None: derived from the running statistics) the
    [4, C] statistics it used."""
    return tuple(implementation(z.device).bn_act_fwd(
        z, scale, shift, weight, bias, running_mean, running_var, eps, skip, skip_scale,
        skip_shift, skip_weight, skip_bias, skip_running_mean, skip_running_var, skip_eps,
        skip_norm, factor, relu, write_mask))


@bn_act_fwd.register_fake
def _(z, scale, shift, weight, bias, running_mean, running_var, eps, skip, skip_scale,
      skip_shift, skip_weight, skip_bias, skip_running_mean, skip_running_var, skip_eps,
      skip_norm, factor, relu, write_mask):
    y = torch.empty_like(z, memory_format=memory_format(z))
    mask = z.new_empty(mask_shape(z) if write_mask else (0,), dtype=torch.uint8)
    C, sdt = z.shape[1], stats_dtype(z)
    stats = z.new_empty((4, C) if scale is None else (0,), dtype=sdt)
    skip_stats = z.new_empty((4, C) if skip_norm and skip_scale is None else (0,), dtype=sdt)
    return y, mask, stats, skip_stats


@torch.library.custom_op("fusedres::bn_act_bwd", mutates_args=())
def bn_act_bwd(dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor, shift: Tensor,
               mask: Optional[Tensor], mask_mode: int, factor: Optional[Tensor],
               skip_mode: int, zd: Optional[Tensor], mean_d: Optional[Tensor],
               rstd_d: Optional[Tensor], scale_d: Optional[Tensor], batch_stats: bool,
               batch_stats_d: bool, need_sums: bool,
               dz_add: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of bn_act_fwd: (dz, dskip or dzd, per-channel sums)."""
    return tuple(implementation(z.device).bn_act_bwd(
        dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd, mean_d,
        rstd_d, scale_d, batch_stats, batch_stats_d, need_sums, dz_add))


@bn_act_bwd.register_fake
def _bn_act_bwd_fake(dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd,
                     mean_d, rstd_d, scale_d, batch_stats, batch_stats_d, need_sums, dz_add):
    fmt = memory_format(z)
    dz = torch.empty_like(z, memory_format=fmt)
    if skip_mode == 1:
        dskip = torch.empty_like(dy, memory_format=fmt)
    elif skip_mode == 2:
        dskip = torch.empty_like(z, memory_format=fmt)
    else:
        dskip = z.new_empty(0)
    reduce = batch_stats or need_sums or (skip_mode == 2 and batch_stats_d)
    K = 4 if skip_mode == 2 else 2
    sums = z.new_empty((K, z.shape[1]) if reduce else (0,), dtype=stats_dtype(z))
    return dz, dskip, sums


# Synchronised batch norm splits bn_stats and bn_act_bwd where the ranks exchange data.


@torch.library.custom_op("fusedres::bn_moments", mutates_args=())
def bn_moments(x: Tensor) -> Tensor:
    """This process's (count, mean, M2) per channel, [3, C]."""
    return implementation(x.device).bn_moments(x)


@bn_moments.register_fake
def _(x):
    return x.new_empty((3, x.shape[1]), dtype=stats_dtype(x))


@torch.library.custom_op("fusedres::bn_stats_from_moments",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def bn_stats_from_moments(moments: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                          eps: float) -> Tensor:
    """bn_stats ([4, C]) of the union of the batches whose moments are stacked as [R, 3, C]."""
    return implementation(moments.device).bn_stats_from_moments(
        moments, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps)


@bn_stats_from_moments.register_fake
def _(moments, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    return moments.new_empty((4, moments.shape[2]))


@torch.library.custom_op("fusedres::bn_act_bwd_reduce", mutates_args=())
def bn_act_bwd_reduce(dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
                      shift: Tensor, mask: Optional[Tensor], mask_mode: int,
                      factor: Optional[Tensor], skip_mode: int, zd: Optional[Tensor],
                      mean_d: Optional[Tensor], rstd_d: Optional[Tensor],
                      per_sample: bool = False) -> Tensor:
    """The per-channel sums of bn_act_bwd, [2 or 4, C]; summed over H*W only,
    [2 or 4, N, C], when ``per_sample``."""
    return implementation(z.device).bn_act_bwd_reduce(
        dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd, mean_d, rstd_d,
        per_sample)


@bn_act_bwd_reduce.register_fake
def _(dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd, mean_d, rstd_d,
      per_sample=False):
    K = 4 if skip_mode == 2 else 2
    shape = (K, z.shape[0], z.shape[1]) if per_sample else (K, z.shape[1])
    return z.new_empty(shape, dtype=stats_dtype(z))


@torch.library.custom_op("fusedres::bn_act_bwd_apply", mutates_args=())
def bn_act_bwd_apply(dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
                     shift: Tensor, mask: Optional[Tensor], mask_mode: int,
                     factor: Optional[Tensor], skip_mode: int, zd: Optional[Tensor],
                     mean_d: Optional[Tensor], rstd_d: Optional[Tensor],
                     scale_d: Optional[Tensor], batch_stats: bool, batch_stats_d: bool,
                     dz_add: Optional[Tensor], mean_sums: Tensor,
                     du_add: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """dz and dskip of bn_act_bwd given the per-channel means of its sums; ``du_add``
    [N, C] is added to g_b before the BN backward (a gate's pooling gradient)."""
    return tuple(implementation(z.device).bn_act_bwd_apply(
        dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd, mean_d,
        rstd_d, scale_d, batch_stats, batch_stats_d, dz_add, mean_sums, du_add))


@bn_act_bwd_apply.register_fake
def _(dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd, mean_d, rstd_d,
      scale_d, batch_stats, batch_stats_d, dz_add, mean_sums, du_add=None):
    dz, dskip, _ = _bn_act_bwd_fake(  # the shapes of bn_act_bwd's first two results
        dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd, mean_d,
        rstd_d, scale_d, False, False, False, dz_add)
    return dz, dskip


# --------------------------------------------------------------------------------------
# What the autograd Functions call: the named records of fusedres.records, flattened here
# (the one place the flat schema lives) for the custom ops while torch.compile traces, and
# for the backend directly in eager mode (the dispatcher's Python overhead is tens of
# microseconds a call, as much as a small block's kernels take on a GPU).
# --------------------------------------------------------------------------------------


def _backend(device: torch.device):
    """The backend module for ``device``, or None while torch.compile traces (then the
    custom ops are called, so that the graph holds them)."""
    if torch.compiler.is_compiling():
        return None
    return implementation(device)


def run_bn_stats(x: Tensor, p: BNParams, momentum: Optional[float], eps: float) -> BNStats:
    """Batch statistics of x; updates p's running statistics (and counts the batch) when
    p.running_mean is set. One launch on the triton backend."""
    impl = _backend(x.device)
    fn = impl.bn_stats if impl is not None else bn_stats
    return BNStats(*fn(x, *p, momentum, eps).unbind(0))


def run_bn_stats_pool(x: Tensor, p: BNParams, momentum: Optional[float],
                      eps: float) -> tuple[BNStats, Tensor]:
    """run_bn_stats and the mean over H*W of x per (sample, channel), [N, C] in the
    statistics dtype, from the same pass over x (one launch on the triton backend)."""
    impl = _backend(x.device)
    fn = impl.bn_stats_pool if impl is not None else bn_stats_pool
    stats, pooled = fn(x, *p, momentum, eps)
    return BNStats(*stats.unbind(0)), pooled


def run_bn_pool(x: Tensor) -> Tensor:
    """The mean over H*W of x per (sample, channel), [N, C]: eval's pooling read."""
    impl = _backend(x.device)
    return impl.bn_pool(x) if impl is not None else bn_pool(x)


def run_bn_moments(x: Tensor) -> Tensor:
    """This process's (count, mean, M2) per channel, [3, C]."""
    impl = _backend(x.device)
    return impl.bn_moments(x) if impl is not None else bn_moments(x)


def run_bn_stats_from_moments(moments: Tensor, p: BNParams, momentum: Optional[float],
                              eps: float) -> BNStats:
    """bn_stats of the union of the batches whose moments are stacked as [R, 3, C]."""
    impl = _backend(moments.device)
    fn = impl.bn_stats_from_moments if impl is not None else bn_stats_from_moments
    return BNStats(*fn(moments, *p, momentum, eps).unbind(0))


def _flat_norm(norm: Optional[Norm]) -> tuple:
    """(scale, shift, weight, bias, running_mean, running_var, eps) of one Norm: the batch
    statistics' scale/shift, or (eval) the parameters the epilogue derives them from."""
    if norm is None:
        return None, None, None, None, None, None, 0.0
    p = norm.params
    if norm.stats is not None:
        return norm.stats.scale, norm.stats.shift, None, None, None, None, norm.eps
    return None, None, p.weight, p.bias, p.running_mean, p.running_var, norm.eps


def run_bn_act_fwd(z: Tensor, norm: Norm, skip: Optional[Tensor], skip_norm: Optional[Norm],
                   factor: Optional[Tensor], relu: bool, write_mask: bool) -> ActOut:
    """y = act(factor[n(, c)]*bn(z) + skip), skip = r | bn_d(zd); see records.ActOut. In eval
    mode (Norm.stats None) the epilogue derives the statistics: one launch, no other op."""
    impl = _backend(z.device)
    fn = impl.bn_act_fwd if impl is not None else bn_act_fwd
    y, mask, st, st_d = fn(z, *_flat_norm(norm), skip, *_flat_norm(skip_norm),
                           skip_norm is not None, factor, relu, write_mask)
    stats = norm.stats if norm.stats is not None else BNStats(*st.unbind(0))
    if skip_norm is None:
        return ActOut(y, mask, stats, None)
    return ActOut(y, mask, stats,
                  skip_norm.stats if skip_norm.stats is not None else BNStats(*st_d.unbind(0)))


def backend_of(t: Tensor):
    """The backend module a call on ``t``'s device runs on (None while torch.compile
    traces): what a cached plan's bindings are made for."""
    return _backend(t.device)


def _in_own_layout(t: Tensor) -> bool:
    """``t`` dense in the layout the kernels read it in (a binding is made only for such a
    tensor, and ``fits`` then holds calls to its strides)."""
    return t.is_contiguous(memory_format=memory_format(t))


def bind_bn_stats(impl, x: Tensor, p: BNParams, momentum: Optional[float], eps: float):
    """run_bn_stats for one call site of a cached block plan, on backend ``impl``, bound
    once: ``stats(x) -> BNStats`` (the triton backend binds its launch,
    kernels.stats.BoundStats; the others take run_bn_stats)."""
    def run(x):
        return run_bn_stats(x, p, momentum, eps)

    bound_cls = getattr(impl, "BoundStats", None)
    if bound_cls is None or x.numel() == 0 or not _in_own_layout(x):
        return run
    bound = bound_cls(x, *p, momentum, eps)

    def stats(x):
        if not bound.fits(x):
            return run(x)
        return BNStats(*bound(x)[0].unbind(0))
    return stats


def bind_bn_act_fwd(impl, z: Tensor, norm: Norm, skip: Optional[Tensor],
                    skip_norm: Optional[Norm], factor: Optional[Tensor], relu: bool,
                    write_mask: bool, keep_stats: bool):
    """run_bn_act_fwd for one call site of a cached block plan, on backend ``impl``,
    bound once: ``fwd(z, norm, skip, skip_norm, factor) -> ActOut``. The triton backend
    binds its launch (kernels.epilogue.BoundFwd: a call allocates and launches); the others
    take run_bn_act_fwd. Without ``keep_stats`` the ActOut of an eval-mode BN has stats
    None (a forward without autograd reads none)."""
    def run(z, norm, skip, skip_norm, factor):
        return run_bn_act_fwd(z, norm, skip, skip_norm, factor, relu, write_mask)

    bound_cls = getattr(impl, "BoundFwd", None)
    if bound_cls is None or z.numel() == 0 or not _in_own_layout(z):
        return run
    bound = bound_cls(z, *_flat_norm(norm), skip, *_flat_norm(skip_norm),
                      skip_norm is not None, factor, relu, write_mask, keep_stats)
    # the statistics' kind (batch or running) is part of the binding
    running = norm.stats is None
    skip_running = skip_norm is not None and skip_norm.stats is None

    def fwd(z, norm, skip, skip_norm, factor):
        st = norm.stats
        st_d = skip_norm.stats if skip_norm is not None else None
        if (not bound.fits(z, factor) or (st is None) != running
                or (skip_norm is not None and (st_d is None) != skip_running)):
            return run(z, norm, skip, skip_norm, factor)
        y, mask, s, s_d = bound(z, None if st is None else st.scale,
                                None if st is None else st.shift, skip,
                                None if st_d is None else st_d.scale,
                                None if st_d is None else st_d.shift, factor)
        if st is None and s is not None:
            st = BNStats(*s.unbind(0))
        if st_d is None and s_d is not None:
            st_d = BNStats(*s_d.unbind(0))
        return ActOut(y, mask, st, st_d)
    return fwd


def _flat_head(a: BwdArgs) -> tuple:
    """The arguments bn_act_bwd, its reduce and its apply half share, flat."""
    st, sd = a.stats, a.stats_d
    return (a.dy, a.z, st.mean, st.rstd, st.scale, st.shift, a.mask, a.mask_mode, a.factor,
            a.skip_mode, a.zd, None if sd is None else sd.mean, None if sd is None else sd.rstd)


def run_bn_act_bwd(a: BwdArgs, need_sums: bool) -> BwdOut:
    """Backward of bn_act_fwd for one BN (and the projection BN when skip_mode == 2).
    The fused backward takes no du_add: a gated block runs reduce and apply."""
    if a.du_add is not None:
        raise ValueError("run_bn_act_bwd(a): a.du_add must be None (a gated block's "
                         "backward runs run_bn_act_bwd_reduce and run_bn_act_bwd_apply), got "
                         f"a tensor of shape {tuple(a.du_add.shape)}")
    impl = _backend(a.z.device)
    fn = impl.bn_act_bwd if impl is not None else bn_act_bwd
    scale_d = None if a.stats_d is None else a.stats_d.scale
    return BwdOut(*fn(*_flat_head(a), scale_d, a.batch_stats, a.batch_stats_d, need_sums,
                      a.dz_add))


def bind_bn_act_bwd(impl, a: BwdArgs, need_sums: bool):
    """run_bn_act_bwd for one call site of a cached block plan, on backend ``impl``, bound
    once: ``bwd(args) -> BwdOut`` (the triton backend binds kernels.backward.BoundBwd; the
    others, and calls it does not fit, take run_bn_act_bwd)."""
    def run(a):
        return run_bn_act_bwd(a, need_sums)

    bound_cls = getattr(impl, "BoundBwd", None)
    if bound_cls is None or a.du_add is not None or not _in_own_layout(a.z):
        return run
    bound = bound_cls(a.z, a.mask_mode, a.factor, a.skip_mode, a.zd, a.batch_stats,
                      a.batch_stats_d, need_sums, a.dz_add)

    def bwd(a):
        if not bound.fits(a.dy, a.z, a.factor, a.zd, a.dz_add):
            return run(a)
        st, sd = a.stats, a.stats_d
        dz, dskip, sums = bound(a.dy, a.z, st.mean, st.rstd, st.scale, st.shift, a.mask,
                                a.factor, a.zd, None if sd is None else sd.mean,
                                None if sd is None else sd.rstd,
                                None if sd is None else sd.scale, a.dz_add)
        return BwdOut(dz, dskip, sums)  # (None for what was not made)
    return bwd


def run_bn_act_bwd_reduce(a: BwdArgs, per_sample: bool = False) -> Tensor:
    """The per-channel sums of the backward, [2 or 4, C]; [2 or 4, N, C] summed over H*W
    only when ``per_sample``."""
    impl = _backend(a.z.device)
    fn = impl.bn_act_bwd_reduce if impl is not None else bn_act_bwd_reduce
    return fn(*_flat_head(a), per_sample)


def run_bn_act_bwd_apply(a: BwdArgs, mean_sums: Tensor) -> tuple[Tensor, Tensor]:
    """(dz, dskip) of the backward given the per-channel means of its sums, with
    a.du_add added to g_b before the BN backward."""
    impl = _backend(a.z.device)
    fn = impl.bn_act_bwd_apply if impl is not None else bn_act_bwd_apply
    scale_d = None if a.stats_d is None else a.stats_d.scale
    return tuple(fn(*_flat_head(a), scale_d, a.batch_stats, a.batch_stats_d, a.dz_add,
                    mean_sums, a.du_add))
