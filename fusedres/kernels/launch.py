"""Launchers: plain functions that check layouts, pick tiles (config.py) and launch.

They take and return torch tensors; nothing above this layer sees a pointer. The same
three functions exist in fusedres.reference (plain PyTorch) and fusedres.csrc (C++/CUDA),
with the same arguments and results, so the autograd Function is backend-agnostic.
"""
from __future__ import annotations

import collections
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .backward import (_bn_act_bwd_apply_kernel, _bn_act_bwd_reduce_kernel,
                       _sum_partials_kernel)
from ..layout import is_channels_last, mask_shape, stats_dtype
from .config import MAX_REGISTERS, NUM_WARPS, finalize_config, interpreting, tile_config
from .epilogue import _bn_act_fwd_kernel
from .stats import _bn_stats_finalize_kernel, _bn_stats_partial_kernel

#: Kernel launches since import, by kernel name: tests use it to prove the kernels ran.
LAUNCHES: collections.Counter = collections.Counter()

Tensor = torch.Tensor


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 1


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch(kernel, grid, *args, **kwargs):
    LAUNCHES[kernel.fn.__name__] += 1
    if not interpreting():
        kwargs["maxnreg"] = MAX_REGISTERS
    kernel[grid](*args, **kwargs)


def _in_layout(t: Optional[Tensor], channels_last: bool) -> Optional[Tensor]:
    """``t`` in the given layout; copies only a tensor that is in neither (rare: a strided view)."""
    if t is None:
        return None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


_SCRATCH: dict = {}


def _scratch(device: torch.device, dtype: torch.dtype) -> Tensor:
    """A one-element tensor standing in for an absent operand: its loads are predicated
    off, and a fixed dtype keeps the compiled variant the same with and without it."""
    key = (device, dtype)
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.zeros(1, device=device, dtype=dtype)
    return _SCRATCH[key]


def _hi_lo(v: float) -> tuple[float, float]:
    """A double as two fp32 scalars (Triton passes float arguments as fp32)."""
    hi = float(torch.tensor(v, dtype=torch.float32))
    return hi, float(torch.tensor(v - hi, dtype=torch.float32))


def _acc(t: Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _shape(t: Tensor):
    N, C, H, W = t.shape
    return N, C, H * W


def _partial_stats(x: Tensor):
    """(part_mean [P, C], part_m2 [P, C], part_count [P]) of a non-empty x: one Welford
    summary per program of the first statistics kernel."""
    N, C, HW = _shape(x)
    sdt = stats_dtype(x)
    dev = x.device
    cl = is_channels_last(x)
    x = _in_layout(x, cl)
    cfg = tile_config(N, C, HW, cl, True, _num_sms(dev), interpreting(), x.dtype == torch.float64,
                      stats=True)
    P = cfg.num_partials
    part_mean = torch.empty((P, C), device=dev, dtype=sdt)
    part_m2 = torch.empty((P, C), device=dev, dtype=sdt)
    part_count = torch.empty((P,), device=dev, dtype=sdt)
    _launch(_bn_stats_partial_kernel, cfg.grid, x, part_mean, part_m2, part_count, N, C, HW,
            cfg.N_PER_PROG, CHANNELS_LAST=cl, BLOCK_C=cfg.BLOCK_C, BLOCK_HW=cfg.BLOCK_HW,
            ACC_DTYPE=_acc(x), num_warps=cfg.num_warps)
    return part_mean, part_m2, part_count


def _finalize(part_mean: Tensor, part_m2: Tensor, part_count: Tensor, P: int, C: int,
              stride_p: int, count_stride: int, weight, bias, running_mean, running_var,
              num_batches_tracked, momentum, eps, moments: Optional[Tensor] = None):
    """Merge P (count, mean, M2) partials per channel into (mean, rstd, scale, shift),
    updating the running statistics if given; also writes the merged moments if given."""
    sdt, dev = part_mean.dtype, part_mean.device
    mean, rstd, scale, shift = (torch.empty(C, device=dev, dtype=sdt) for _ in range(4))
    update = running_mean is not None
    cumulative = update and momentum is None
    present = [t for t in (running_mean, weight, bias) if t is not None]
    param = present[0] if present else mean  # BN tensors share one dtype (checked above us)
    block_p, block_c = finalize_config(C, P, interpreting())
    acc = tl.float64 if sdt == torch.float64 else tl.float32
    _launch(_bn_stats_finalize_kernel, (triton.cdiv(C, block_c),),
            part_mean, part_m2, part_count,
            param if weight is None else weight, param if bias is None else bias,
            running_mean if update else param, running_var if update else param,
            num_batches_tracked if cumulative else _scratch(dev, torch.int64),
            mean, rstd, scale, shift, moments if moments is not None else mean,
            P, C, stride_p, count_stride,
            *_hi_lo(0.0 if momentum is None else float(momentum)), float(eps),
            int(weight is not None), int(bias is not None), int(update), int(cumulative),
            int(moments is not None), BLOCK_P=block_p, BLOCK_C=block_c, ACC_DTYPE=acc,
            num_warps=NUM_WARPS)
    return mean, rstd, scale, shift


def bn_stats(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             running_mean: Optional[Tensor], running_var: Optional[Tensor],
             num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float):
    """Batch statistics of x per channel; updates the running statistics if given.

    Returns (mean, rstd, scale, shift), each [C] in fp32 (fp64 for fp64 x)."""
    C = x.shape[1]
    if running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if x.numel() == 0:  # as PyTorch: statistics untouched, the batch still counted
        sdt = stats_dtype(x)
        zeros = torch.zeros(C, device=x.device, dtype=sdt)
        return zeros, torch.ones_like(zeros), zeros.clone(), zeros.clone()
    part_mean, part_m2, part_count = _partial_stats(x)
    return _finalize(part_mean, part_m2, part_count, part_count.shape[0], C, C, 1, weight,
                     bias, running_mean, running_var, num_batches_tracked, momentum, eps)


def bn_moments(x: Tensor) -> Tensor:
    """This process's (count, mean, M2) per channel as [3, C], for the ranks to exchange
    under synchronised batch norm; zeros for an empty x. See fusedres.reference."""
    C = x.shape[1]
    if x.numel() == 0:
        return torch.zeros((3, C), device=x.device, dtype=stats_dtype(x))
    moments = torch.empty((3, C), device=x.device, dtype=stats_dtype(x))  # the kernel fills it
    part_mean, part_m2, part_count = _partial_stats(x)
    # (the normalisation it also writes is unused; eps 1 keeps it finite)
    _finalize(part_mean, part_m2, part_count, part_count.shape[0], C, C, 1, None, None, None,
              None, None, 0.0, 1.0, moments=moments)
    return moments


def bn_stats_from_moments(moments: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                          eps: float):
    """bn_stats of the union of R batches from their bn_moments stacked as [R, 3, C]."""
    R, _, C = moments.shape
    moments = moments.contiguous()
    if running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return _finalize(moments[:, 1], moments[:, 2], moments[:, 0, 0], R, C, 3 * C, 3 * C,
                     weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                     eps)


def bn_act_fwd(z: Tensor, scale: Tensor, shift: Tensor, skip: Optional[Tensor],
               skip_scale: Optional[Tensor], skip_shift: Optional[Tensor],
               factor: Optional[Tensor], relu: bool, write_mask: bool):
    """y = act(factor[n]*(z*scale + shift) + skip), skip = r | zd*skip_scale + skip_shift.

    Returns (y, mask): y in z's dtype and memory format; mask the packed ReLU bits
    (mask_shape(z), uint8) when ``write_mask``, else an empty uint8 tensor."""
    N, C, HW = _shape(z)
    cl = is_channels_last(z)
    z = _in_layout(z, cl)
    skip = _in_layout(skip, cl)
    y = torch.empty_like(z, memory_format=torch.channels_last if cl else torch.contiguous_format)
    mask = torch.empty(mask_shape(z) if write_mask else (0,), device=z.device, dtype=torch.uint8)
    if z.numel() == 0:
        return y, mask
    skip_mode = 0 if skip is None else (2 if skip_scale is not None else 1)
    factor = None if factor is None else factor.to(z.dtype)
    cfg = tile_config(N, C, HW, cl, False, _num_sms(z.device), interpreting(),
                      z.dtype == torch.float64)
    _launch(_bn_act_fwd_kernel, cfg.grid, z, y, scale, shift,
            skip if skip is not None else z,
            skip_scale if skip_mode == 2 else scale, skip_shift if skip_mode == 2 else shift,
            factor if factor is not None else z,
            mask if write_mask else _scratch(z.device, torch.uint8),
            N, C, HW, cfg.N_PER_PROG, int(factor is not None), int(relu), int(write_mask),
            SKIP=skip_mode, CHANNELS_LAST=cl, BLOCK_C=cfg.BLOCK_C, BLOCK_HW=cfg.BLOCK_HW,
            ACC_DTYPE=_acc(z), num_warps=cfg.num_warps)
    return y, mask


def _bwd_prepare(dy, z, zd, dz_add, factor):
    cl = is_channels_last(z)
    z = _in_layout(z, cl)
    return (cl, _in_layout(dy.to(z.dtype), cl), z, _in_layout(zd, cl), _in_layout(dz_add, cl),
            None if factor is None else factor.to(z.dtype))


def _bwd_reduce(cl, dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd,
                mean_d, rstd_d) -> Tensor:
    """The [K, C] sums of the backward (K = 4 with a projection BN) of non-empty tensors."""
    N, C, HW = _shape(z)
    dev = z.device
    interp = interpreting()
    acc = _acc(z)
    sdt = stats_dtype(z)
    skip_bn = skip_mode == 2
    K = 4 if skip_bn else 2
    sums = torch.empty((K, C), device=dev, dtype=sdt)
    rcfg = tile_config(N, C, HW, cl, True, _num_sms(dev), interp, z.dtype == torch.float64)
    P = rcfg.num_partials
    part = torch.empty((K, P, C), device=dev, dtype=sdt)
    _launch(_bn_act_bwd_reduce_kernel, rcfg.grid, dy, z, mean, rstd, scale, shift,
            mask if mask_mode == 2 else _scratch(dev, torch.uint8),
            factor if factor is not None else z,
            zd if skip_bn else z, mean_d if skip_bn else mean, rstd_d if skip_bn else rstd,
            part, N, C, HW, P, rcfg.N_PER_PROG, int(mask_mode == 0), int(factor is not None),
            FROM_BITS=mask_mode == 2, SKIP_BN=skip_bn, CHANNELS_LAST=cl, BLOCK_C=rcfg.BLOCK_C,
            BLOCK_HW=rcfg.BLOCK_HW, ACC_DTYPE=acc, num_warps=rcfg.num_warps)
    block_p, block_c = finalize_config(C, P, interp)
    _launch(_sum_partials_kernel, (triton.cdiv(C, block_c), K), part, sums, P, C,
            BLOCK_P=block_p, BLOCK_C=block_c, ACC_DTYPE=acc, num_warps=NUM_WARPS)
    return sums


def _bwd_apply(cl, dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd,
               mean_d, rstd_d, scale_d, batch_stats, batch_stats_d, dz_add, sums, inv_count):
    """(dz, dskip): the elementwise pass, with sums * inv_count the per-channel means."""
    N, C, HW = _shape(z)
    dev = z.device
    fmt = torch.channels_last if cl else torch.contiguous_format
    dz = torch.empty_like(z, memory_format=fmt)
    dskip = (torch.empty_like(z, memory_format=fmt) if skip_mode == 2 else
             torch.empty_like(dy, memory_format=fmt) if skip_mode == 1 else z.new_empty(0))
    if z.numel() == 0:
        return dz, dskip
    skip_bn = skip_mode == 2
    cfg = tile_config(N, C, HW, cl, False, _num_sms(dev), interpreting(), z.dtype == torch.float64)
    _launch(_bn_act_bwd_apply_kernel, cfg.grid, dy, z, mean, rstd, scale, shift,
            mask if mask_mode == 2 else _scratch(dev, torch.uint8),
            factor if factor is not None else z,
            sums if sums is not None and sums.numel() else mean,
            zd if skip_bn else z, mean_d if skip_bn else mean, rstd_d if skip_bn else rstd,
            scale_d if skip_bn else scale, dz_add if dz_add is not None else z,
            dz, dskip if skip_mode else dz, inv_count, N, C, HW, cfg.N_PER_PROG,
            int(mask_mode == 0), int(factor is not None), int(batch_stats),
            int(skip_bn and batch_stats_d), int(dz_add is not None),
            FROM_BITS=mask_mode == 2, SKIP=skip_mode, CHANNELS_LAST=cl, BLOCK_C=cfg.BLOCK_C,
            BLOCK_HW=cfg.BLOCK_HW, ACC_DTYPE=_acc(z), num_warps=cfg.num_warps)
    return dz, dskip


def bn_act_bwd(dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor, shift: Tensor,
               mask: Optional[Tensor], mask_mode: int, factor: Optional[Tensor],
               skip_mode: int, zd: Optional[Tensor], mean_d: Optional[Tensor],
               rstd_d: Optional[Tensor], scale_d: Optional[Tensor],
               batch_stats: bool, batch_stats_d: bool, need_sums: bool,
               dz_add: Optional[Tensor]):
    """Backward of bn_act_fwd for one BN (and the projection BN when skip_mode == 2).

    mask_mode: 0 no ReLU, 1 recompute the ReLU from z*scale + shift, 2 packed bits.
    skip_mode: 0 none, 1 identity (returns dskip = g), 2 projection BN over zd (returns dzd).
    need_sums: the per-channel sums are wanted even without batch statistics (dgamma, dbeta).
    Returns (dz, dskip, sums): dskip empty for skip_mode 0; sums [2 or 4, C] =
    (dbeta, dgamma[, dbeta_d, dgamma_d]) in the statistics dtype, empty when not computed."""
    N, C, HW = _shape(z)
    cl, dy, z, zd, dz_add, factor = _bwd_prepare(dy, z, zd, dz_add, factor)
    reduce = batch_stats or need_sums or (skip_mode == 2 and batch_stats_d)
    K = 4 if skip_mode == 2 else 2
    sdt = stats_dtype(z)
    if reduce and z.numel():
        sums = _bwd_reduce(cl, dy, z, mean, rstd, scale, shift, mask, mask_mode, factor,
                           skip_mode, zd, mean_d, rstd_d)
    else:
        sums = torch.zeros((K, C) if reduce else (0,), device=z.device, dtype=sdt)
    dz, dskip = _bwd_apply(cl, dy, z, mean, rstd, scale, shift, mask, mask_mode, factor,
                           skip_mode, zd, mean_d, rstd_d, scale_d, batch_stats, batch_stats_d,
                           dz_add, sums if reduce else None, 1.0 / max(N * HW, 1))
    return dz, dskip, sums


def bn_act_bwd_reduce(dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
                      shift: Tensor, mask: Optional[Tensor], mask_mode: int,
                      factor: Optional[Tensor], skip_mode: int, zd: Optional[Tensor],
                      mean_d: Optional[Tensor], rstd_d: Optional[Tensor]) -> Tensor:
    """The per-channel sums of bn_act_bwd alone, [2 or 4, C]; zeros for an empty z."""
    cl, dy, z, zd, _, factor = _bwd_prepare(dy, z, zd, None, factor)
    if z.numel() == 0:
        return torch.zeros((4 if skip_mode == 2 else 2, z.shape[1]), device=z.device,
                           dtype=stats_dtype(z))
    return _bwd_reduce(cl, dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode,
                       zd, mean_d, rstd_d)


def bn_act_bwd_apply(dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
                     shift: Tensor, mask: Optional[Tensor], mask_mode: int,
                     factor: Optional[Tensor], skip_mode: int, zd: Optional[Tensor],
                     mean_d: Optional[Tensor], rstd_d: Optional[Tensor],
                     scale_d: Optional[Tensor], batch_stats: bool, batch_stats_d: bool,
                     dz_add: Optional[Tensor], mean_sums: Tensor):
    """The elementwise pass of bn_act_bwd with given per-channel means of the sums
    (bn_act_bwd_reduce's rows divided by the count, all ranks' under synchronised batch
    norm). Returns (dz, dskip)."""
    cl, dy, z, zd, dz_add, factor = _bwd_prepare(dy, z, zd, dz_add, factor)
    return _bwd_apply(cl, dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode,
                      zd, mean_d, rstd_d, scale_d, batch_stats, batch_stats_d, dz_add,
                      mean_sums.contiguous(), 1.0)
