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


def bn_stats(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             running_mean: Optional[Tensor], running_var: Optional[Tensor],
             num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float):
    """Batch statistics of x per channel; updates the running statistics if given.

    Returns (mean, rstd, scale, shift), each [C] in fp32 (fp64 for fp64 x)."""
    N, C, HW = _shape(x)
    sdt = stats_dtype(x)
    dev = x.device
    mean = torch.empty(C, device=dev, dtype=sdt)
    rstd = torch.empty(C, device=dev, dtype=sdt)
    scale = torch.empty(C, device=dev, dtype=sdt)
    shift = torch.empty(C, device=dev, dtype=sdt)
    update = running_mean is not None
    if update and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if x.numel() == 0:  # as PyTorch: statistics untouched, the batch still counted
        mean.zero_(); rstd.fill_(1.0); scale.zero_(); shift.zero_()
        return mean, rstd, scale, shift
    cl = is_channels_last(x)
    x = _in_layout(x, cl)
    interp = interpreting()
    cfg = tile_config(N, C, HW, cl, True, _num_sms(dev), interp, x.dtype == torch.float64,
                      stats=True)
    P = cfg.num_partials
    part_mean = torch.empty((P, C), device=dev, dtype=sdt)
    part_m2 = torch.empty((P, C), device=dev, dtype=sdt)
    part_count = torch.empty((P,), device=dev, dtype=sdt)
    _launch(_bn_stats_partial_kernel, cfg.grid, x, part_mean, part_m2, part_count, N, C, HW,
            cfg.N_PER_PROG, CHANNELS_LAST=cl, BLOCK_C=cfg.BLOCK_C, BLOCK_HW=cfg.BLOCK_HW,
            ACC_DTYPE=_acc(x), num_warps=cfg.num_warps)
    block_p, block_c = finalize_config(C, P, interp)
    cumulative = update and momentum is None
    present = [t for t in (running_mean, weight, bias) if t is not None]
    param = present[0] if present else mean  # BN tensors share one dtype (checked above us)
    _launch(_bn_stats_finalize_kernel, (triton.cdiv(C, block_c),),
            part_mean, part_m2, part_count,
            param if weight is None else weight, param if bias is None else bias,
            running_mean if update else param, running_var if update else param,
            num_batches_tracked if cumulative else _scratch(dev, torch.int64),
            mean, rstd, scale, shift, P, C,
            *_hi_lo(0.0 if momentum is None else float(momentum)), float(eps),
            int(weight is not None), int(bias is not None), int(update), int(cumulative),
            BLOCK_P=block_p, BLOCK_C=block_c, ACC_DTYPE=_acc(x), num_warps=NUM_WARPS)
    return mean, rstd, scale, shift


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
    cl = is_channels_last(z)
    z = _in_layout(z, cl)
    dy = _in_layout(dy.to(z.dtype), cl)
    zd = _in_layout(zd, cl)
    dz_add = _in_layout(dz_add, cl)
    fmt = torch.channels_last if cl else torch.contiguous_format
    dz = torch.empty_like(z, memory_format=fmt)
    dskip = (torch.empty_like(z, memory_format=fmt) if skip_mode == 2 else
             torch.empty_like(dy, memory_format=fmt) if skip_mode == 1 else z.new_empty(0))
    skip_bn = skip_mode == 2
    reduce = batch_stats or need_sums or (skip_bn and batch_stats_d)
    K = 4 if skip_bn else 2
    sdt = stats_dtype(z)
    sums = torch.empty((K, C), device=z.device, dtype=sdt) if reduce else z.new_empty(0, dtype=sdt)
    if z.numel() == 0:
        return dz, dskip, sums
    dev = z.device
    interp = interpreting()
    acc = _acc(z)
    factor = None if factor is None else factor.to(z.dtype)
    bits = mask if mask_mode == 2 else _scratch(dev, torch.uint8)
    fac = factor if factor is not None else z
    common = dict(CHANNELS_LAST=cl, ACC_DTYPE=acc)
    if reduce:
        rcfg = tile_config(N, C, HW, cl, True, _num_sms(dev), interp, z.dtype == torch.float64)
        P = rcfg.num_partials
        part = torch.empty((K, P, C), device=dev, dtype=sdt)
        _launch(_bn_act_bwd_reduce_kernel, rcfg.grid, dy, z, mean, rstd, scale, shift, bits, fac,
                zd if skip_bn else z, mean_d if skip_bn else mean, rstd_d if skip_bn else rstd,
                part, N, C, HW, P, rcfg.N_PER_PROG, int(mask_mode == 0), int(factor is not None),
                FROM_BITS=mask_mode == 2, SKIP_BN=skip_bn, BLOCK_C=rcfg.BLOCK_C, BLOCK_HW=rcfg.BLOCK_HW,
                num_warps=rcfg.num_warps, **common)
        block_p, block_c = finalize_config(C, P, interp)
        _launch(_sum_partials_kernel, (triton.cdiv(C, block_c), K), part, sums, P, C,
                BLOCK_P=block_p, BLOCK_C=block_c, ACC_DTYPE=acc, num_warps=NUM_WARPS)
    cfg = tile_config(N, C, HW, cl, False, _num_sms(dev), interp, z.dtype == torch.float64)
    _launch(_bn_act_bwd_apply_kernel, cfg.grid, dy, z, mean, rstd, scale, shift, bits, fac,
            sums if reduce else mean,
            zd if skip_bn else z, mean_d if skip_bn else mean, rstd_d if skip_bn else rstd,
            scale_d if skip_bn else scale, dz_add if dz_add is not None else z,
            dz, dskip if skip_mode else dz, 1.0 / (N * HW), N, C, HW, cfg.N_PER_PROG,
            int(mask_mode == 0), int(factor is not None), int(batch_stats),
            int(skip_bn and batch_stats_d), int(dz_add is not None),
            FROM_BITS=mask_mode == 2, SKIP=skip_mode, BLOCK_C=cfg.BLOCK_C, BLOCK_HW=cfg.BLOCK_HW, num_warps=cfg.num_warps, **common)
    return dz, dskip, sums
