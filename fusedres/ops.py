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


@torch.library.custom_op("fusedres::bn_stats",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def bn_stats(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             running_mean: Optional[Tensor], running_var: Optional[Tensor],
             num_batches_tracked: Optional[Tensor], momentum: Optional[float],
             eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-channel batch (mean, rstd, scale, shift); updates the running statistics."""
    return tuple(implementation(x.device).bn_stats(
        x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps))


@bn_stats.register_fake
def _(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    C = x.shape[1]
    return tuple(x.new_empty(C, dtype=stats_dtype(x)) for _ in range(4))


@torch.library.custom_op("fusedres::bn_act_fwd", mutates_args=())
def bn_act_fwd(z: Tensor, scale: Tensor, shift: Tensor, skip: Optional[Tensor],
               skip_scale: Optional[Tensor], skip_shift: Optional[Tensor],
               factor: Optional[Tensor], relu: bool, write_mask: bool) -> tuple[Tensor, Tensor]:
    """y = act(factor[n]*(z*scale + shift) + skip) and its packed ReLU mask."""
    return tuple(implementation(z.device).bn_act_fwd(
        z, scale, shift, skip, skip_scale, skip_shift, factor, relu, write_mask))


@bn_act_fwd.register_fake
def _(z, scale, shift, skip, skip_scale, skip_shift, factor, relu, write_mask):
    y = torch.empty_like(z, memory_format=memory_format(z))
    mask = z.new_empty(mask_shape(z) if write_mask else (0,), dtype=torch.uint8)
    return y, mask


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
                          eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """bn_stats of the union of the batches whose moments are stacked as [R, 3, C]."""
    return tuple(implementation(moments.device).bn_stats_from_moments(
        moments, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps))


@bn_stats_from_moments.register_fake
def _(moments, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    C = moments.shape[2]
    return tuple(moments.new_empty(C) for _ in range(4))


@torch.library.custom_op("fusedres::bn_act_bwd_reduce", mutates_args=())
def bn_act_bwd_reduce(dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
                      shift: Tensor, mask: Optional[Tensor], mask_mode: int,
                      factor: Optional[Tensor], skip_mode: int, zd: Optional[Tensor],
                      mean_d: Optional[Tensor], rstd_d: Optional[Tensor]) -> Tensor:
    """The per-channel sums of bn_act_bwd, [2 or 4, C]."""
    return implementation(z.device).bn_act_bwd_reduce(
        dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd, mean_d, rstd_d)


@bn_act_bwd_reduce.register_fake
def _(dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd, mean_d, rstd_d):
    return z.new_empty((4 if skip_mode == 2 else 2, z.shape[1]), dtype=stats_dtype(z))


@torch.library.custom_op("fusedres::bn_act_bwd_apply", mutates_args=())
def bn_act_bwd_apply(dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
                     shift: Tensor, mask: Optional[Tensor], mask_mode: int,
                     factor: Optional[Tensor], skip_mode: int, zd: Optional[Tensor],
                     mean_d: Optional[Tensor], rstd_d: Optional[Tensor],
                     scale_d: Optional[Tensor], batch_stats: bool, batch_stats_d: bool,
                     dz_add: Optional[Tensor], mean_sums: Tensor) -> tuple[Tensor, Tensor]:
    """dz and dskip of bn_act_bwd given the per-channel means of its sums."""
    return tuple(implementation(z.device).bn_act_bwd_apply(
        dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd, mean_d,
        rstd_d, scale_d, batch_stats, batch_stats_d, dz_add, mean_sums))


@bn_act_bwd_apply.register_fake
def _(dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd, mean_d, rstd_d,
      scale_d, batch_stats, batch_stats_d, dz_add, mean_sums):
    dz, dskip, _ = _bn_act_bwd_fake(  # the shapes of bn_act_bwd's first two results
        dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd, mean_d,
        rstd_d, scale_d, False, False, False, dz_add)
    return dz, dskip


# --------------------------------------------------------------------------------------
# What the autograd Function calls: the custom ops while torch.compile traces, the backend
# directly in eager mode (the dispatcher's Python overhead is tens of microseconds a call,
# as much as a small block's kernels take on a GPU).
# --------------------------------------------------------------------------------------


def _eager_or_traced(op, name: str):
    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return getattr(implementation(args[0].device), name)(*args)
    call.__name__ = name
    call.__doc__ = op.__doc__
    return call


run_bn_stats = _eager_or_traced(bn_stats, "bn_stats")
run_bn_act_fwd = _eager_or_traced(bn_act_fwd, "bn_act_fwd")
run_bn_act_bwd = _eager_or_traced(bn_act_bwd, "bn_act_bwd")
run_bn_moments = _eager_or_traced(bn_moments, "bn_moments")
run_bn_stats_from_moments = _eager_or_traced(bn_stats_from_moments, "bn_stats_from_moments")
run_bn_act_bwd_reduce = _eager_or_traced(bn_act_bwd_reduce, "bn_act_bwd_reduce")
run_bn_act_bwd_apply = _eager_or_traced(bn_act_bwd_apply, "bn_act_bwd_apply")
