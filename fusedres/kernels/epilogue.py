"""The forward epilogue of a batch norm, with the residual add and ReLU fused in, and its
launcher.

    y = act( f_n * (z*scale + shift) + skip ),   act = ReLU or identity
    skip = 0 | r | zd*scale_d + shift_d       (none, identity, projection shortcut's own BN)

f_n is an optional per-sample factor (stochastic depth: keep/keep_prob), or f_nc a
per-(sample, channel) one: a squeeze-excite / ECA gate g[n, c] (times f_n), which is
constant over H*W and so rides on the same load (``FACTOR_PER_CHANNEL``). Training passes
the scale and shift of bn_stats. In eval mode (``running``) the kernel derives them itself
from the BN's parameters, scale = gamma/sqrt(running_var + eps), shift = beta -
running_mean*scale, and the first program of each channel block stores the (mean, rstd,
scale, shift) it used for the backward: one launch per BN and no other op. With
``write_mask`` it also stores which outputs pass a gradient through the ReLU as one bit
per element, so the backward never reads the output tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import config
from ..layout import is_channels_last, mask_shape, memory_format, stats_dtype
from ..reference import running_stats
from .bn_math import (bn_apply, branch_factor, load_tile, mask_sample_base, program_tile,
                      relu, relu_keep, store_bits, store_tile)
from .config import SAMPLE_COUNTS, tile_config
from .launch import (acc_dtype, bind_launch, branch_factor_arg, in_layout, num_sms, scratch,
                     shape3, template)

Tensor = torch.Tensor


@triton.jit
def norm_coefficients(c, cmask, write, scale_ptr, shift_ptr, weight_ptr, bias_ptr,
                      running_mean_ptr, running_var_ptr, stats_ptr, C, eps, running,
                      has_weight, has_bias, ACC_DTYPE: tl.constexpr):
    """Per-channel (scale, shift) of one BN, [BLOCK_C, 1]: given (batch statistics), or
    derived from the running statistics (``running``), then stored as stats [4, C] rows
    (mean, rstd, scale, shift) where ``write``."""
    if running != 0:
        mean = tl.load(running_mean_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)
        var = tl.load(running_var_ptr + c, mask=cmask, other=1.0).to(ACC_DTYPE)
        if ACC_DTYPE == tl.float64:
            rstd = 1.0 / tl.sqrt(var + eps)
        else:
            rstd = 1.0 / tl.sqrt_rn(var + eps)
        w = tl.load(weight_ptr + c, mask=cmask & (has_weight != 0), other=1.0).to(ACC_DTYPE)
        b = tl.load(bias_ptr + c, mask=cmask & (has_bias != 0), other=0.0).to(ACC_DTYPE)
        scale = w * rstd
        shift = b - mean * scale
        wm = cmask & write
        tl.store(stats_ptr + c, mean, mask=wm)
        tl.store(stats_ptr + C + c, rstd, mask=wm)
        tl.store(stats_ptr + 2 * C + c, scale, mask=wm)
        tl.store(stats_ptr + 3 * C + c, shift, mask=wm)
    else:
        scale = tl.load(scale_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)
        shift = tl.load(shift_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)
    return scale[:, None], shift[:, None]


@triton.jit(do_not_specialize=SAMPLE_COUNTS)
def _bn_act_fwd_kernel(
    z_ptr,           # [N, C, H, W] conv output
    y_ptr,           # [N, C, H, W] out, same layout and dtype as z
    scale_ptr,       # [C] fp32 gamma*rstd (batch statistics); STATS_ROWS: the [4, C] statistics
    shift_ptr,       # [C] fp32 beta - mean*scale (STATS_ROWS: unread)
    weight_ptr,      # [C] gamma (running, has_weight)
    bias_ptr,        # [C] beta (running, has_bias)
    running_mean_ptr,  # [C] (running)
    running_var_ptr,   # [C] (running)
    stats_ptr,       # [4, C] out (running): mean, rstd, scale, shift it used
    skip_ptr,        # [N, C, H, W] residual (SKIP 1) or projection conv output (SKIP 2)
    skip_scale_ptr,  # [C] the projection BN's, as above (SKIP 2; STATS_ROWS likewise)
    skip_shift_ptr,
    skip_weight_ptr,
    skip_bias_ptr,
    skip_running_mean_ptr,
    skip_running_var_ptr,
    skip_stats_ptr,
    factor_ptr,      # [N] or [N, C] branch factor (has_factor; FACTOR_PER_CHANNEL)
    mask_ptr,        # packed ReLU bits (write_mask): [N, C, ceil(HW/8)] or [N, HW, ceil(C/8)]
    N, C, HW_Q,      # H*W / HW_VEC
    N_PER_PROG,
    eps,
    skip_eps,
    running,         # normalise with the running statistics (eval)
    has_weight,
    has_bias,
    skip_running,
    skip_has_weight,
    skip_has_bias,
    has_factor,
    do_relu,
    write_mask,
    SKIP: tl.constexpr,          # 0 none, 1 tensor, 2 normalised tensor
    STATS_ROWS: tl.constexpr,    # batch statistics as bn_stats's [4, C] rows, not [C] tensors
    FACTOR_PER_CHANNEL: tl.constexpr,  # factor [N, C]: a vector load in the loop, not a scalar
    HW_VEC: tl.constexpr,      # a power of two dividing H*W, so NCHW rows load as vectors
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    # Cheap flags are run-time scalars (a switched-off operand is a predicated-off load that
    # moves no bytes); only SKIP, which changes what the loop loads, is a constexpr. That
    # keeps the variants few.
    HW = HW_Q * HW_VEC  # H*W, with the factor the compiler can see (JIT hints stop at 16)
    n_start, c0, s0, c, s, valid, offs = program_tile(C, HW, N_PER_PROG, BLOCK_C, BLOCK_HW,
                                                      CHANNELS_LAST)
    cmask = c < C
    first = tl.program_id(0) == 0
    if STATS_ROWS:  # rows (mean, rstd, scale, shift): no [C] view made per call on the host
        shift_ptr = scale_ptr + 3 * C
        scale_ptr = scale_ptr + 2 * C
        skip_shift_ptr = skip_scale_ptr + 3 * C
        skip_scale_ptr = skip_scale_ptr + 2 * C
    scale, shift = norm_coefficients(c, cmask, first, scale_ptr, shift_ptr, weight_ptr,
                                     bias_ptr, running_mean_ptr, running_var_ptr, stats_ptr,
                                     C, eps, running, has_weight, has_bias, ACC_DTYPE)
    if SKIP == 2:
        skip_scale, skip_shift = norm_coefficients(
            c, cmask, first, skip_scale_ptr, skip_shift_ptr, skip_weight_ptr, skip_bias_ptr,
            skip_running_mean_ptr, skip_running_var_ptr, skip_stats_ptr, C, skip_eps,
            skip_running, skip_has_weight, skip_has_bias, ACC_DTYPE)

    for i in tl.range(0, tl.minimum(N - n_start, N_PER_PROG), num_stages=NUM_STAGES):
        n = n_start + i
        z = load_tile(z_ptr, n, offs, valid, C, HW)
        v = bn_apply(z.to(ACC_DTYPE), scale, shift)
        v = v * branch_factor(factor_ptr, n, c, cmask, C, has_factor, FACTOR_PER_CHANNEL,
                              ACC_DTYPE)
        if SKIP == 1:
            v += load_tile(skip_ptr, n, offs, valid, C, HW).to(ACC_DTYPE)
        if SKIP == 2:
            v += bn_apply(load_tile(skip_ptr, n, offs, valid, C, HW).to(ACC_DTYPE),
                          skip_scale, skip_shift)
        out = tl.where(do_relu != 0, relu(v), v)
        store_tile(y_ptr, n, offs, out.to(z.dtype), valid, C, HW)
        if write_mask != 0:
            store_bits(mask_sample_base(mask_ptr, n, C, HW, CHANNELS_LAST),
                       relu_keep(v) & valid, c0, s0, C, HW, True, BLOCK_C, BLOCK_HW,
                       CHANNELS_LAST)


def _norm_args(dev, sdt, running, scale, shift, weight, bias, running_mean, running_var,
               stats):
    """Pointer arguments of one BN: the batch statistics' scale/shift, or the running
    statistics to derive them from, with ``stats`` [4, C] the tensor they are stored in."""
    if not running:
        sc = scratch(dev, sdt)
        return (scale, shift, sc, sc, sc, sc, sc)
    if running_mean is None or running_var is None:
        raise ValueError("bn_act_fwd: without scale/shift (eval mode) running_mean and "
                         f"running_var are needed, got {type(running_mean).__name__} and "
                         f"{type(running_var).__name__}")
    param = weight if weight is not None else running_mean
    return (stats, stats, param if weight is None else weight, param if bias is None else bias,
            running_mean, running_var, stats)


# Positions in the kernel's argument list that change from call to call.
_Z, _Y, _SCALE, _SHIFT, _STATS, _SKIP, _SKIP_SCALE, _SKIP_SHIFT, _SKIP_STATS, _FACTOR, _MASK = (
    0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18)


class BoundFwd:
    """bn_act_fwd with its decisions and every tensor that stays put bound once: the tile
    and grid, the flags, the stand-ins, and in eval mode the BN's parameters and running
    statistics. A call then allocates its outputs, fills in the tensors that change (z,
    skip, the batch statistics, the factor) and launches. bn_act_fwd binds one per call;
    a cached block plan keeps one per call site (fusedres.ops.bind_bn_act_fwd), which is
    most of a block call's host time saved.

    ``keep_stats`` False: the statistics an eval-mode call derives go to a buffer of the
    binding's own (nothing reads them: a forward without autograd) and are returned as None.
    ``stats_rows``: each call passes the batch statistics as bn_stats's [4, C] tensor, in
    both the scale and the shift argument (the kernel reads its rows), not as [C] views.
    """

    def __init__(self, z: Tensor, scale, shift, weight, bias, running_mean, running_var,
                 eps: float, skip, skip_scale, skip_shift, skip_weight, skip_bias,
                 skip_running_mean, skip_running_var, skip_eps: float, skip_norm: bool,
                 factor, relu: bool, write_mask: bool, keep_stats: bool = True,
                 stats_rows: bool = False):
        N, C, HW = shape3(z)
        cl = is_channels_last(z)
        self.fmt = torch.channels_last if cl else torch.contiguous_format
        self.shape, self.stride, self.dtype = z.shape, z.stride(), z.dtype
        dev = self.device = z.device
        self.sdt = sdt = stats_dtype(z)
        self.C = C
        self.mask_shape = mask_shape(z) if write_mask else None
        # (what each call's eval statistics are allocated like)
        self.stats_like = template(dev, (4, C), sdt)
        skip_mode = 0 if skip is None else (2 if skip_norm else 1)
        self.skip_mode = skip_mode
        self.running = scale is None
        self.skip_running = skip_mode == 2 and skip_scale is None
        self.keep_stats = keep_stats
        # (what call_if_fits serves: batch statistics passed as [4, C] rows)
        self.batch_only = not self.running and not self.skip_running and stats_rows
        # (eval without keep_stats: the derived statistics land in a buffer of our own)
        own = None if keep_stats else torch.empty((4, C), device=dev, dtype=sdt)
        # The template holds no tensor of this call (a plan keeps it for good): the batch
        # statistics, z, y, skip and factor are filled in by each call.
        sc = scratch(dev, sdt)
        main = _norm_args(dev, sdt, self.running, sc, sc, weight, bias, running_mean,
                          running_var, own)
        side = (_norm_args(dev, sdt, self.skip_running, sc, sc, skip_weight, skip_bias,
                           skip_running_mean, skip_running_var, own)
                if skip_mode == 2 else main)
        cfg = tile_config(N, C, HW, cl, "elementwise", num_sms(dev), config.INTERPRET_TILES,
                          z.element_size())
        flags = (int(self.running), int(self.running and weight is not None),
                 int(self.running and bias is not None))
        side_flags = ((int(self.skip_running), int(self.skip_running and skip_weight is not None),
                       int(self.skip_running and skip_bias is not None))
                      if skip_mode == 2 else (0, 0, 0))
        self.factor_dim = None if factor is None else factor.dim()
        self.args = [None, None, *main, None, *side, None, scratch(dev, torch.uint8),
                     N, C, HW // cfg.HW_VEC, cfg.N_PER_PROG, float(eps), float(skip_eps),
                     *flags, *side_flags, int(factor is not None), int(relu), int(write_mask)]
        self.launch = bind_launch(
            _bn_act_fwd_kernel, cfg.grid, SKIP=skip_mode, STATS_ROWS=stats_rows,
            FACTOR_PER_CHANNEL=self.factor_dim == 2,
            HW_VEC=cfg.HW_VEC, CHANNELS_LAST=cl, BLOCK_C=cfg.BLOCK_C, BLOCK_HW=cfg.BLOCK_HW,
            NUM_STAGES=cfg.num_stages, ACC_DTYPE=acc_dtype(z), num_warps=cfg.num_warps)

    def fits(self, z: Tensor, factor: Optional[Tensor]) -> bool:
        """z and the factor's kind ([N], [N, C] or none) as this binding was made for: a
        cached plan's guard against a call it did not foresee (it then takes bn_act_fwd)."""
        return (z.shape == self.shape and z.stride() == self.stride and z.dtype == self.dtype
                and (None if factor is None else factor.dim()) == self.factor_dim)

    def call_if_fits(self, z: Tensor, st, skip, st_d, factor) -> Optional[tuple]:
        """(y, mask) of a ``stats_rows`` binding with batch statistics, st (and st_d) the
        [4, C] rows, with ``fits`` in it: None where z or the factor does not fit. A cached
        block's forward calls this once per epilogue (each layer of calls cost host time:
        bench/bench_host.py)."""
        if not (self.batch_only and z.shape == self.shape and z.stride() == self.stride
                and z.dtype == self.dtype
                and (None if factor is None else factor.dim()) == self.factor_dim):
            return None
        a = self.args.copy()  # (a copy: two threads may run one plan)
        a[_Z] = z
        # (z is in the binding's own dense layout: empty_like keeps its strides)
        y = a[_Y] = torch.empty_like(z)
        a[_SCALE] = a[_SHIFT] = st
        skip_mode = self.skip_mode
        if skip_mode:  # (z's shape: with z's strides it is in z's layout)
            a[_SKIP] = skip if skip.stride() == self.stride else \
                skip.contiguous(memory_format=self.fmt)
            if skip_mode == 2:
                a[_SKIP_SCALE] = a[_SKIP_SHIFT] = st_d
        else:
            a[_SKIP] = z  # (a stand-in: never read)
        a[_FACTOR] = branch_factor_arg(factor, z) if factor is not None else z
        mask = None
        if self.mask_shape is not None:
            mask = a[_MASK] = torch.empty(self.mask_shape, device=self.device,
                                          dtype=torch.uint8)
        self.launch(*a)
        return y, mask

    def __call__(self, z: Tensor, scale, shift, skip, skip_scale, skip_shift, factor):
        """(y, mask, stats, skip_stats), None for what this call does not make: the mask
        without write_mask, the statistics without an eval-mode BN or keep_stats."""
        a = self.args.copy()  # (a copy: two threads may run one plan)
        a[_Z] = z
        y = a[_Y] = torch.empty_like(z, memory_format=self.fmt)
        stats = skip_stats = mask = None
        if not self.running:
            a[_SCALE], a[_SHIFT] = scale, shift
        elif self.keep_stats:
            stats = a[_SCALE] = a[_SHIFT] = a[_STATS] = torch.empty_like(self.stats_like)
        if self.skip_mode:
            a[_SKIP] = skip if skip.is_contiguous(memory_format=self.fmt) else \
                skip.contiguous(memory_format=self.fmt)
        else:
            a[_SKIP] = z  # (a stand-in: never read)
        if self.skip_mode == 2:
            if not self.skip_running:
                a[_SKIP_SCALE], a[_SKIP_SHIFT] = skip_scale, skip_shift
            elif self.keep_stats:
                skip_stats = torch.empty_like(self.stats_like)
                a[_SKIP_SCALE] = a[_SKIP_SHIFT] = a[_SKIP_STATS] = skip_stats
        a[_FACTOR] = branch_factor_arg(factor, z) if factor is not None else z
        if self.mask_shape is not None:
            mask = a[_MASK] = torch.empty(self.mask_shape, device=self.device,
                                          dtype=torch.uint8)
        self.launch(*a)
        return y, mask, stats, skip_stats


def bn_act_fwd(z: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
               weight: Optional[Tensor], bias: Optional[Tensor],
               running_mean: Optional[Tensor], running_var: Optional[Tensor], eps: float,
               skip: Optional[Tensor], skip_scale: Optional[Tensor],
               skip_shift: Optional[Tensor], skip_weight: Optional[Tensor],
               skip_bias: Optional[Tensor], skip_running_mean: Optional[Tensor],
               skip_running_var: Optional[Tensor], skip_eps: float, skip_norm: bool,
               factor: Optional[Tensor], relu: bool, write_mask: bool):
    """y = act(factor[n(, c)]*(z*scale + shift) + skip), skip = r | zd*skip_scale + skip_shift;
    ``factor`` [N] or [N, C].

    ``scale`` None: eval, the kernel derives scale and shift from weight, bias and the
    running statistics (likewise ``skip_scale`` None for the projection BN, ``skip_norm``).
    Returns (y, mask, stats, skip_stats): y in z's dtype and memory format; mask the packed
    ReLU bits (mask_shape(z), uint8) when ``write_mask``, else an empty uint8 tensor;
    stats / skip_stats the [4, C] (mean, rstd, scale, shift) derived in eval mode, else
    empty."""
    z = in_layout(z, is_channels_last(z))
    sdt = stats_dtype(z)
    if z.numel() == 0:  # (rare: no launch, torch ops derive what eval mode returns)
        return _empty_call(z, scale, weight, bias, running_mean, running_var, eps, skip_norm,
                           skip_scale, skip_weight, skip_bias, skip_running_mean,
                           skip_running_var, skip_eps, write_mask)
    y, mask, stats, skip_stats = BoundFwd(
        z, scale, shift, weight, bias, running_mean, running_var, eps, skip, skip_scale,
        skip_shift, skip_weight, skip_bias, skip_running_mean, skip_running_var, skip_eps,
        skip_norm, factor, relu, write_mask)(z, scale, shift, skip, skip_scale, skip_shift,
                                             factor)
    dev = z.device
    return (y, mask if mask is not None else torch.empty((0,), device=dev, dtype=torch.uint8),
            stats if stats is not None else z.new_empty((0,), dtype=sdt),
            skip_stats if skip_stats is not None else z.new_empty((0,), dtype=sdt))


def _empty_call(z, scale, weight, bias, running_mean, running_var, eps, skip_norm,
                skip_scale, skip_weight, skip_bias, skip_running_mean, skip_running_var,
                skip_eps, write_mask):
    """bn_act_fwd of an empty z: what eval mode returns, from torch ops."""
    sdt = stats_dtype(z)
    y = torch.empty_like(z, memory_format=memory_format(z))
    mask = z.new_empty(mask_shape(z) if write_mask else (0,), dtype=torch.uint8)
    stats = skip_stats = z.new_empty((0,), dtype=sdt)
    if scale is None:
        stats = running_stats(weight, bias, running_mean, running_var, eps, sdt)
    if skip_norm and skip_scale is None:
        skip_stats = running_stats(skip_weight, skip_bias, skip_running_mean,
                                   skip_running_var, skip_eps, sdt)
    return y, mask, stats, skip_stats
