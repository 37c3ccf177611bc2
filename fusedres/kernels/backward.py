"""Backward of the fused epilogue: batch norm (+ ReLU, + residual, + projection BN), and
its launchers.

With g = where(relu passed, dy, 0), g_b = f_n * g on the branch and xhat = (z - mean)*rstd:

    dbeta = sum g_b       dgamma = sum g_b*xhat
    dz    = scale * (g_b - dbeta/M - xhat * dgamma/M)       (batch statistics; M = N*H*W)
          = scale*g_b - b - k*(z - mean)                     (b, k per channel: bn_math)
    dz    = scale * g_b                                      (running statistics)
    dskip = g   (identity shortcut)     dzd: the same formula with g and the projection BN

Two launches: ``_bn_act_bwd_reduce_kernel`` writes per-program partial sums, and the last
program of each channel block (a ticket on a zeroed counter) adds them up in partial-index
order, so the sums are the same bit for bit every run; ``_bn_act_bwd_apply_kernel`` then
writes dz (and dzd or dskip). The ReLU mask is recomputed from z and the saved scale/shift
(inner BN+ReLU) or read from the forward's packed bits (after a residual add), so no
activation is saved for the backward. Synchronised batch norm calls the two halves itself,
with an all-reduce of the sums between.

The factor is f_n ([N], stochastic depth) or f_nc ([N, C], FACTOR_PER_CHANNEL). A squeeze-
excite / ECA gated block (gate_api.md) has out = relu(f_n*g_nc*u + skip) with u = z*scale +
shift and g = sigma(gate(p)), p_nc = mean_hw u = scale*m_nc + shift (m = mean_hw z). With
delta = dy through the ReLU and A_nc = sum_hw delta, B_nc = sum_hw delta*xhat (the reduce
with PER_SAMPLE and no factor):

    dL/dg_nc = f_n * sum_hw delta*u = f_n*(gamma*B + beta*A)      (u = gamma*xhat + beta)
    du       = f_n*g_nc*delta + dp_nc/HW      (u feeds the product and the pool: p = mean_hw u)
    dbeta    = sum du      = sum_n (f*g*A + dp)
    dgamma   = sum du*xhat = sum_n (f*g*B + dp*(m - mean)*rstd)     (mean_hw xhat)
    dz       = scale * (du - dbeta/M - xhat * dgamma/M)

so the apply kernel is the one above with g_b = f*g*delta plus du_add = dp/HW (HAS_DU_ADD),
and mean_sums = (dbeta, dgamma)/M, which the block computes on [N, C] (all-reduced first
under synchronised batch norm). The skip's gradient is delta, as without a gate.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import config
from ..layout import is_channels_last, stats_dtype
from .bn_math import (bn_apply, bn_grad_coefficients, bn_input_grad, branch_factor,
                      group_ticket, load_tile, mask_sample_base, program_tile, relu_grad,
                      relu_keep, store_tile, sum_partials, unpack_bits)
from .config import SAMPLE_COUNTS, tile_config
from .launch import (Tickets, Workspace, acc_dtype, as_dtype, bind_launch,
                     branch_factor_arg, in_layout, num_sms, scratch, shape3, template)

Tensor = torch.Tensor

@triton.jit
def _grad_through_relu(dy, z, scale, shift, mask_ptr, n, c, s, C, HW, valid, no_relu,
                       FROM_BITS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                       CHANNELS_LAST: tl.constexpr):
    """g = where(relu passed, dy, 0), the ReLU read from the forward's packed bits
    (FROM_BITS) or recomputed from z*scale + shift; no_relu: the block had none, g = dy."""
    if FROM_BITS:
        keep = unpack_bits(mask_sample_base(mask_ptr, n, C, HW, CHANNELS_LAST), c, s, C, HW,
                           valid, BLOCK_C, BLOCK_HW, CHANNELS_LAST)
    else:
        keep = relu_keep(bn_apply(z, scale, shift))
    return tl.where(valid, relu_grad(dy, keep | no_relu), 0.0)


@triton.jit(do_not_specialize=SAMPLE_COUNTS)
def _bn_act_bwd_reduce_kernel(
    dy_ptr,          # [N, C, H, W] gradient of the epilogue's output
    z_ptr,           # [N, C, H, W] conv output the BN normalised
    mean_ptr,        # [C] statistics the forward used (STATS_ROWS: its [4, C] rows)
    rstd_ptr,        # [C] (STATS_ROWS: unread, as scale_ptr and shift_ptr)
    scale_ptr,       # [C] gamma*rstd
    shift_ptr,       # [C]
    mask_ptr,        # packed ReLU bits (FROM_BITS)
    factor_ptr,      # [N] or [N, C] branch factor (has_factor; FACTOR_PER_CHANNEL)
    zd_ptr,          # [N, C, H, W] projection conv output (SKIP_BN)
    mean_d_ptr,      # [C] (SKIP_BN; STATS_ROWS: the projection BN's [4, C] rows)
    rstd_d_ptr,      # [C] (SKIP_BN; STATS_ROWS: unread)
    part_ptr,        # scratch: partial sums g_b, g_b*xhat[, g, g*xhat_d]: [K, P, C], or
                     # [K, N, S, C] per sample and position block (PER_SAMPLE)
    counter_ptr,     # [channel blocks] int32 (PER_SAMPLE: [sample chunks x channel blocks]), zero; left zero
    sums_ptr,        # [K, C] out: the sums; [K, N, C] summed over H*W only (PER_SAMPLE)
    N, C, HW_Q, P,   # HW_Q = H*W / HW_VEC
    N_PER_PROG,
    no_relu,         # mask_mode 0: no ReLU to go through
    has_factor,
    FROM_BITS: tl.constexpr,   # mask_mode 2: ReLU from packed bits, else recomputed from z
    STATS_ROWS: tl.constexpr,  # the statistics as bn_stats's [4, C] rows (mean_ptr, mean_d_ptr)
    SKIP_BN: tl.constexpr,     # also reduce for the projection BN
    PER_SAMPLE: tl.constexpr,  # per-(sample, channel) sums (a gate's A and B): other stores
    FACTOR_PER_CHANNEL: tl.constexpr,  # factor [N, C]: a vector load in the loop
    HW_VEC: tl.constexpr,      # a power of two dividing H*W, so NCHW rows load as vectors
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_P: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    HW = HW_Q * HW_VEC  # H*W, with the factor the compiler can see (JIT hints stop at 16)
    n_start, c0, s0, c, s, valid, offs = program_tile(C, HW, N_PER_PROG, BLOCK_C, BLOCK_HW,
                                                      CHANNELS_LAST)
    cmask = c < C
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    has_factor = has_factor != 0
    no_relu = no_relu != 0

    if STATS_ROWS:  # rows (mean, rstd, scale, shift): no [C] view made per call on the host
        rstd_ptr = mean_ptr + C
        scale_ptr = mean_ptr + 2 * C
        shift_ptr = mean_ptr + 3 * C
        rstd_d_ptr = mean_d_ptr + C
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
    rstd = tl.load(rstd_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
    scale = tl.load(scale_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
    shift = tl.load(shift_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
    if SKIP_BN:
        mean_d = tl.load(mean_d_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
        rstd_d = tl.load(rstd_d_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]

    acc_g = tl.zeros([BLOCK_C, BLOCK_HW], ACC_DTYPE)
    acc_gx = tl.zeros([BLOCK_C, BLOCK_HW], ACC_DTYPE)
    if SKIP_BN:
        acc_gs = tl.zeros([BLOCK_C, BLOCK_HW], ACC_DTYPE)
        acc_gsx = tl.zeros([BLOCK_C, BLOCK_HW], ACC_DTYPE)
    n_here = tl.minimum(N - n_start, N_PER_PROG)
    num_s_blocks = tl.cdiv(HW, BLOCK_HW)
    s_blk = pid_p % num_s_blocks
    NSC = tl.cast(N, tl.int64) * num_s_blocks * C  # one row of the per-sample partials
    for i in tl.range(0, n_here, num_stages=NUM_STAGES):
        n = n_start + i
        dy = load_tile(dy_ptr, n, offs, valid, C, HW).to(ACC_DTYPE)
        z = load_tile(z_ptr, n, offs, valid, C, HW).to(ACC_DTYPE)
        g = _grad_through_relu(dy, z, scale, shift, mask_ptr, n, c, s, C, HW, valid, no_relu,
                               FROM_BITS, BLOCK_C, BLOCK_HW, CHANNELS_LAST)
        g_b = g * branch_factor(factor_ptr, n, c, cmask, C, has_factor, FACTOR_PER_CHANNEL,
                                ACC_DTYPE)
        if SKIP_BN:
            zd = load_tile(zd_ptr, n, offs, valid, C, HW).to(ACC_DTYPE)
        if PER_SAMPLE:
            # this sample's sums over the tile's positions: [K, N, S, C] partials
            row = (tl.cast(n, tl.int64) * num_s_blocks + s_blk) * C + c
            tl.store(part_ptr + row, tl.sum(g_b, axis=1), mask=cmask)
            tl.store(part_ptr + NSC + row, tl.sum(g_b * ((z - mean) * rstd), axis=1), mask=cmask)
            if SKIP_BN:
                tl.store(part_ptr + 2 * NSC + row, tl.sum(g, axis=1), mask=cmask)
                tl.store(part_ptr + 3 * NSC + row, tl.sum(g * ((zd - mean_d) * rstd_d), axis=1),
                         mask=cmask)
        else:
            acc_g += g_b
            acc_gx += g_b * ((z - mean) * rstd)
            if SKIP_BN:
                acc_gs += g
                acc_gsx += g * ((zd - mean_d) * rstd_d)

    if PER_SAMPLE:
        # The last of the S programs of this (sample chunk, channel block) adds up the S
        # position blocks of each of its samples, in position-block order.
        tl.debug_barrier()
        chunk = pid_p // num_s_blocks
        if group_ticket(counter_ptr, chunk * tl.num_programs(1) + pid_c, num_s_blocks):
            for i in tl.range(0, n_here):
                for k in tl.static_range(4 if SKIP_BN else 2):
                    sum_partials(part_ptr, sums_ptr, k * N + n_start + i, num_s_blocks, C, c,
                                 cmask, 1.0, BLOCK_P, BLOCK_C, ACC_DTYPE)
    else:
        row = pid_p * C + c
        tl.store(part_ptr + row, tl.sum(acc_g, axis=1), mask=cmask)
        tl.store(part_ptr + P * C + row, tl.sum(acc_gx, axis=1), mask=cmask)
        if SKIP_BN:
            tl.store(part_ptr + 2 * P * C + row, tl.sum(acc_gs, axis=1), mask=cmask)
            tl.store(part_ptr + 3 * P * C + row, tl.sum(acc_gsx, axis=1), mask=cmask)

        # Publish the partial (every thread's stores, then one release), take a ticket; the
        # last program of the channel block adds the P partials up in index order.
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr + pid_c, 1, sem="acq_rel")
        if ticket == P - 1:
            for k in tl.static_range(4 if SKIP_BN else 2):
                sum_partials(part_ptr, sums_ptr, k, P, C, c, cmask, 1.0, BLOCK_P, BLOCK_C,
                             ACC_DTYPE)
            tl.atomic_xchg(counter_ptr + pid_c, 0)


@triton.jit(do_not_specialize=SAMPLE_COUNTS)
def _bn_act_bwd_apply_kernel(
    dy_ptr,          # [N, C, H, W]
    z_ptr,           # [N, C, H, W]
    mean_ptr,        # [C] (STATS_ROWS: the [4, C] rows, as in the reduction)
    rstd_ptr,        # [C]
    scale_ptr,       # [C] gamma*rstd
    shift_ptr,       # [C]
    mask_ptr,        # packed ReLU bits (FROM_BITS)
    factor_ptr,      # [N] or [N, C] (has_factor; FACTOR_PER_CHANNEL)
    du_add_ptr,      # [N, C] statistics dtype, added to g_b before the BN backward (HAS_DU_ADD)
    sums_ptr,        # [K, C] sum g_b, g_b*xhat[, g, g*xhat_d] (batch_stats / batch_stats_d)
    zd_ptr,          # [N, C, H, W] (SKIP 2)
    mean_d_ptr,      # [C] (SKIP 2; STATS_ROWS: the projection BN's [4, C] rows)
    rstd_d_ptr,      # [C] (SKIP 2; STATS_ROWS: unread)
    scale_d_ptr,     # [C] (SKIP 2; STATS_ROWS: unread)
    dz_add_ptr,      # [N, C, H, W] a gradient to add to dz (has_dz_add)
    dz_ptr,          # [N, C, H, W] out
    dskip_ptr,       # [N, C, H, W] out: g (SKIP 1) or dzd (SKIP 2)
    inv_count,       # 1/M
    N, C, HW_Q,      # H*W / HW_VEC
    N_PER_PROG,
    no_relu,         # mask_mode 0: no ReLU to go through
    has_factor,
    batch_stats,     # the main BN normalised with batch statistics
    batch_stats_d,   # the projection BN did
    FROM_BITS: tl.constexpr,   # mask_mode 2: ReLU from packed bits, else recomputed from z
    STATS_ROWS: tl.constexpr,  # the statistics as bn_stats's [4, C] rows (mean_ptr, mean_d_ptr)
    SKIP: tl.constexpr,        # 0 none, 1 write dskip = g, 2 write dzd
    HAS_DZ_ADD: tl.constexpr,  # add dz_add to dz (a load in the loop: a constexpr)
    HAS_DU_ADD: tl.constexpr,  # add du_add[n, c] to g_b (likewise)
    FACTOR_PER_CHANNEL: tl.constexpr,  # factor [N, C]: a vector load in the loop
    HW_VEC: tl.constexpr,      # a power of two dividing H*W, so NCHW rows load as vectors
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    HW = HW_Q * HW_VEC  # H*W, with the factor the compiler can see (JIT hints stop at 16)
    n_start, c0, s0, c, s, valid, offs = program_tile(C, HW, N_PER_PROG, BLOCK_C, BLOCK_HW,
                                                      CHANNELS_LAST)
    cmask = c < C
    has_factor = has_factor != 0
    no_relu = no_relu != 0
    batch_stats = batch_stats != 0
    batch_stats_d = batch_stats_d != 0

    if STATS_ROWS:
        rstd_ptr = mean_ptr + C
        scale_ptr = mean_ptr + 2 * C
        shift_ptr = mean_ptr + 3 * C
        rstd_d_ptr = mean_d_ptr + C
        scale_d_ptr = mean_d_ptr + 2 * C
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
    rstd = tl.load(rstd_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
    scale = tl.load(scale_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
    shift = tl.load(shift_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
    b, k = bn_grad_coefficients(
        scale, rstd, tl.load(sums_ptr + c, mask=cmask & batch_stats, other=0.0).to(ACC_DTYPE)[:, None],
        tl.load(sums_ptr + C + c, mask=cmask & batch_stats, other=0.0).to(ACC_DTYPE)[:, None], inv_count)
    if SKIP == 2:
        mean_d = tl.load(mean_d_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
        rstd_d = tl.load(rstd_d_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
        scale_d = tl.load(scale_d_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
        stats_d = cmask & batch_stats_d
        b_d, k_d = bn_grad_coefficients(
            scale_d, rstd_d, tl.load(sums_ptr + 2 * C + c, mask=stats_d, other=0.0).to(ACC_DTYPE)[:, None],
            tl.load(sums_ptr + 3 * C + c, mask=stats_d, other=0.0).to(ACC_DTYPE)[:, None], inv_count)

    for i in tl.range(0, tl.minimum(N - n_start, N_PER_PROG), num_stages=NUM_STAGES):
        n = n_start + i
        dy_raw = load_tile(dy_ptr, n, offs, valid, C, HW)
        z_raw = load_tile(z_ptr, n, offs, valid, C, HW)
        z = z_raw.to(ACC_DTYPE)
        g = _grad_through_relu(dy_raw.to(ACC_DTYPE), z, scale, shift, mask_ptr, n, c, s, C, HW,
                               valid, no_relu, FROM_BITS, BLOCK_C, BLOCK_HW, CHANNELS_LAST)
        g_b = g * branch_factor(factor_ptr, n, c, cmask, C, has_factor, FACTOR_PER_CHANNEL,
                                ACC_DTYPE)
        if HAS_DU_ADD:  # du = g_b + du_add[n, c]: a gate's pooling gradient dp/HW
            g_b += tl.load(du_add_ptr + n * C + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
        dz = bn_input_grad(scale, g_b, z, mean, b, k, batch_stats)
        if HAS_DZ_ADD:
            dz += load_tile(dz_add_ptr, n, offs, valid, C, HW).to(ACC_DTYPE)
        store_tile(dz_ptr, n, offs, dz.to(z_raw.dtype), valid, C, HW)
        if SKIP == 1:
            store_tile(dskip_ptr, n, offs, g.to(dy_raw.dtype), valid, C, HW)
        if SKIP == 2:
            zd = load_tile(zd_ptr, n, offs, valid, C, HW).to(ACC_DTYPE)
            dzd = bn_input_grad(scale_d, g, zd, mean_d, b_d, k_d, batch_stats_d)
            store_tile(dskip_ptr, n, offs, dzd.to(z_raw.dtype), valid, C, HW)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _bwd_prepare(dy, z, zd, dz_add, factor):
    cl = is_channels_last(z)
    z = in_layout(z, cl)
    return (cl, in_layout(as_dtype(dy, z.dtype), cl), z, in_layout(zd, cl),
            in_layout(dz_add, cl), branch_factor_arg(factor, z))


class _ReducePass:
    """The reduction launch bound for z's shape, layout and dtype and the call's flags:
    ``(..., sums)`` fills ``sums`` [K, C] (K = 4 with a projection BN), or [K, N, C] with
    ``per_sample``, for a non-empty z."""

    def __init__(self, z: Tensor, cl: bool, mask_mode: int, factor_dim: Optional[int],
                 skip_mode: int, K: int, per_sample: bool = False, stats_rows: bool = False):
        N, C, HW = shape3(z)
        dev = self.device = z.device
        self.skip_bn = skip_mode == 2
        self.sdt = stats_dtype(z)
        cfg = tile_config(N, C, HW, cl, "reduce", num_sms(dev), config.INTERPRET_TILES,
                          z.element_size())
        P = cfg.grid[0]
        if per_sample:  # [K, N, S, C] per sample and position block; a ticket per sample chunk
            S = -(-HW // cfg.BLOCK_HW)
            self.part_shape = (K, N, S, C)
            n_counters = cfg.grid[0] // S * cfg.grid[1]
        else:
            self.part_shape = (K, P, C)
            n_counters = cfg.grid[1]
        self.tickets = Tickets(dev, n_counters)
        self.part = Workspace("partials", dev, self.part_shape, self.sdt)
        self.mask_standin = scratch(dev, torch.uint8)
        self.use_mask = mask_mode == 2
        self.scalars = (N, C, HW // cfg.HW_VEC, P, cfg.N_PER_PROG, int(mask_mode == 0),
                        int(factor_dim is not None))
        self.launch = bind_launch(
            _bn_act_bwd_reduce_kernel, cfg.grid, FROM_BITS=mask_mode == 2,
            STATS_ROWS=stats_rows, SKIP_BN=self.skip_bn,
            PER_SAMPLE=per_sample, FACTOR_PER_CHANNEL=factor_dim == 2, HW_VEC=cfg.HW_VEC,
            CHANNELS_LAST=cl, BLOCK_C=cfg.BLOCK_C, BLOCK_HW=cfg.BLOCK_HW, BLOCK_P=cfg.BLOCK_P,
            NUM_STAGES=cfg.num_stages, ACC_DTYPE=acc_dtype(z), num_warps=cfg.num_warps)

    def __call__(self, dy, z, mean, rstd, scale, shift, mask, factor, zd, mean_d, rstd_d,
                 sums: Tensor) -> Tensor:
        part = self.part.get()
        skip_bn = self.skip_bn
        self.launch(dy, z, mean, rstd, scale, shift,
                    mask if self.use_mask else self.mask_standin,
                    factor if factor is not None else z,
                    zd if skip_bn else z, mean_d if skip_bn else mean,
                    rstd_d if skip_bn else rstd, part, self.tickets.get(), sums, *self.scalars)
        return sums


class _ApplyPass:
    """The elementwise launch bound likewise: ``(..., sums, inv_count, du_add)`` returns
    (dz, dskip) with sums * inv_count the per-channel means, du_add [N, C] added to g_b."""

    def __init__(self, z: Tensor, cl: bool, mask_mode: int, factor_dim: Optional[int],
                 skip_mode: int, batch_stats: bool, batch_stats_d: bool, has_dz_add: bool,
                 has_du_add: bool, stats_rows: bool = False):
        N, C, HW = shape3(z)
        dev = z.device
        self.fmt = torch.channels_last if cl else torch.contiguous_format
        self.skip_mode, self.skip_bn = skip_mode, skip_mode == 2
        self.empty = z.numel() == 0
        if self.empty:  # (outputs allocated, nothing launched)
            return
        self.mask_standin = scratch(dev, torch.uint8)
        self.use_mask = mask_mode == 2
        cfg = tile_config(N, C, HW, cl, "elementwise", num_sms(dev), config.INTERPRET_TILES,
                          z.element_size())
        self.scalars = (N, C, HW // cfg.HW_VEC, cfg.N_PER_PROG, int(mask_mode == 0),
                        int(factor_dim is not None), int(batch_stats),
                        int(self.skip_bn and batch_stats_d))
        self.launch = bind_launch(
            _bn_act_bwd_apply_kernel, cfg.grid, FROM_BITS=mask_mode == 2,
            STATS_ROWS=stats_rows, SKIP=skip_mode,
            HAS_DZ_ADD=has_dz_add, HAS_DU_ADD=has_du_add,
            FACTOR_PER_CHANNEL=factor_dim == 2, HW_VEC=cfg.HW_VEC, CHANNELS_LAST=cl,
            BLOCK_C=cfg.BLOCK_C, BLOCK_HW=cfg.BLOCK_HW, NUM_STAGES=cfg.num_stages,
            ACC_DTYPE=acc_dtype(z), num_warps=cfg.num_warps)

    def __call__(self, dy, z, mean, rstd, scale, shift, mask, factor, zd, mean_d, rstd_d,
                 scale_d, dz_add, sums, inv_count: float, du_add=None):
        fmt, skip_mode = self.fmt, self.skip_mode
        dz = torch.empty_like(z, memory_format=fmt)
        dskip = (torch.empty_like(z, memory_format=fmt) if skip_mode == 2 else
                 torch.empty_like(dy, memory_format=fmt) if skip_mode == 1 else None)
        if self.empty:
            return dz, dskip
        skip_bn = self.skip_bn
        self.launch(dy, z, mean, rstd, scale, shift,
                    mask if self.use_mask else self.mask_standin,
                    factor if factor is not None else z,
                    du_add if du_add is not None else mean,
                    sums if sums is not None and sums.numel() else mean,
                    zd if skip_bn else z, mean_d if skip_bn else mean,
                    rstd_d if skip_bn else rstd, scale_d if skip_bn else scale,
                    dz_add if dz_add is not None else z,
                    dz, dskip if skip_mode else dz, inv_count, *self.scalars)
        return dz, dskip


def _factor_dim(factor: Optional[Tensor]) -> Optional[int]:
    return None if factor is None else factor.dim()


class BoundBwd:
    """bn_act_bwd with what does not change from call to call decided once (which
    launches, their tiles, grids and flags, the count), for tensors already in z's layout
    and dtype (``fits`` says; bn_act_bwd converts first). bn_act_bwd binds one per call; a
    cached block plan keeps one per call site (fusedres.ops.bind_bn_act_bwd).
    ``stats_rows``: each call passes each BN's statistics as bn_stats's [4, C] tensor, in
    all four of its arguments (mean_d's three likewise), not as [C] views."""

    def __init__(self, z: Tensor, mask_mode: int, factor: Optional[Tensor],
                 skip_mode: int, zd: Optional[Tensor], batch_stats: bool,
                 batch_stats_d: bool, need_sums: bool, dz_add: Optional[Tensor],
                 stats_rows: bool = False):
        N, C, HW = shape3(z)
        cl = is_channels_last(z)
        self.shape, self.stride, self.dtype = z.shape, z.stride(), z.dtype
        self.device = z.device
        self.stats_rows = stats_rows  # (call_if_fits serves only such a binding)
        fdim = self.factor_dim = _factor_dim(factor)
        self.has_zd, self.has_dz_add = zd is not None, dz_add is not None
        self.skip_mode = skip_mode
        reduce = batch_stats or need_sums or (skip_mode == 2 and batch_stats_d)
        self.sdt = stats_dtype(z)
        self.sums_shape = ((4 if skip_mode == 2 else 2), C)
        self.sums_like = template(z.device, self.sums_shape, self.sdt)
        self.inv_count = 1.0 / max(N * HW, 1)
        self.empty = z.numel() == 0
        self.reduce = (_ReducePass(z, cl, mask_mode, fdim, skip_mode, self.sums_shape[0],
                                   stats_rows=stats_rows)
                       if reduce and not self.empty else None)
        self.need_zero_sums = reduce and self.empty
        self.apply = _ApplyPass(z, cl, mask_mode, fdim, skip_mode, batch_stats,
                                batch_stats_d, dz_add is not None, False, stats_rows)

    def fits(self, dy: Tensor, z: Tensor, factor, zd, dz_add) -> bool:
        """The call's operands as this binding was made for, each in z's layout (dy in its
        dtype too): what bn_act_bwd would otherwise convert."""
        stride = self.stride
        return (z.shape == self.shape and z.stride() == stride and z.dtype == self.dtype
                and dy.stride() == stride and dy.dtype == self.dtype
                and (None if factor is None else factor.dim()) == self.factor_dim
                and (zd.stride() == stride if self.has_zd else zd is None)
                and (dz_add.stride() == stride if self.has_dz_add else dz_add is None))

    def call_if_fits(self, dy, z, st, mask, factor, zd, st_d, dz_add):
        """``__call__`` of a ``stats_rows`` binding in one Python call, with ``fits`` in
        it: st (and st_d) the [4, C] statistics; None where the operands do not fit. A
        cached block's backward calls this once per BN: each layer of calls between it
        and the two launches cost a few microseconds of host time (bench/bench_host.py)."""
        stride = self.stride
        if not (self.stats_rows and z.shape == self.shape and z.stride() == stride
                and z.dtype == self.dtype and dy.stride() == stride and dy.dtype == self.dtype
                and (None if factor is None else factor.dim()) == self.factor_dim
                and (zd.stride() == stride if self.has_zd else zd is None)
                and (dz_add.stride() == stride if self.has_dz_add else dz_add is None)):
            return None
        if factor is not None:
            factor = branch_factor_arg(factor, z)
        fz = factor if factor is not None else z
        red, app = self.reduce, self.apply
        skip_bn = app.skip_bn
        zd_, st_d_ = (zd, st_d) if skip_bn else (z, st)
        sums = None
        if red is not None:
            sums = torch.empty_like(self.sums_like)
            red.launch(dy, z, st, st, st, st, mask if red.use_mask else red.mask_standin, fz,
                       zd_, st_d_, st_d_, red.part.get(), red.tickets.get(), sums,
                       *red.scalars)
        elif self.need_zero_sums:
            sums = torch.zeros(self.sums_shape, device=self.device, dtype=self.sdt)
        # (z is in the binding's own dense layout (fits): empty_like keeps its strides)
        dz = torch.empty_like(z)
        skip_mode = app.skip_mode
        dskip = torch.empty_like(z) if skip_mode else None
        if app.empty:
            return dz, dskip, sums
        app.launch(dy, z, st, st, st, st, mask if app.use_mask else app.mask_standin, fz, st,
                   sums if sums is not None else st, zd_, st_d_, st_d_, st_d_,
                   dz_add if dz_add is not None else z, dz, dskip if skip_mode else dz,
                   self.inv_count, *app.scalars)
        return dz, dskip, sums

    def __call__(self, dy, z, mean, rstd, scale, shift, mask, factor, zd, mean_d, rstd_d,
                 scale_d, dz_add):
        """(dz, dskip, sums); dskip None for skip_mode 0, sums None when not computed."""
        if factor is not None:
            factor = branch_factor_arg(factor, z)
        sums = None
        if self.reduce is not None:
            sums = self.reduce(dy, z, mean, rstd, scale, shift, mask, factor, zd, mean_d,
                               rstd_d, torch.empty_like(self.sums_like))
        elif self.need_zero_sums:
            sums = torch.zeros(self.sums_shape, device=self.device, dtype=self.sdt)
        dz, dskip = self.apply(dy, z, mean, rstd, scale, shift, mask, factor, zd, mean_d,
                               rstd_d, scale_d, dz_add, sums, self.inv_count)
        return dz, dskip, sums


def bn_act_bwd(dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor, shift: Tensor,
               mask: Optional[Tensor], mask_mode: int, factor: Optional[Tensor],
               skip_mode: int, zd: Optional[Tensor], mean_d: Optional[Tensor],
               rstd_d: Optional[Tensor], scale_d: Optional[Tensor],
               batch_stats: bool, batch_stats_d: bool, need_sums: bool,
               dz_add: Optional[Tensor]):
    """Backward of bn_act_fwd for one BN (and the projection BN when skip_mode == 2): two
    launches, the sums then the elementwise pass (one when no sum is needed).

    mask_mode: 0 no ReLU, 1 recompute the ReLU from z*scale + shift, 2 packed bits.
    skip_mode: 0 none, 1 identity (returns dskip = g), 2 projection BN over zd (returns dzd).
    need_sums: the per-channel sums are wanted even without batch statistics (dgamma, dbeta).
    Returns (dz, dskip, sums): dskip empty for skip_mode 0; sums [2 or 4, C] =
    (dbeta, dgamma[, dbeta_d, dgamma_d]) in the statistics dtype, empty when not computed."""
    _, dy, z, zd, dz_add, factor = _bwd_prepare(dy, z, zd, dz_add, factor)
    dz, dskip, sums = BoundBwd(z, mask_mode, factor, skip_mode, zd, batch_stats,
                               batch_stats_d, need_sums, dz_add)(
        dy, z, mean, rstd, scale, shift, mask, factor, zd, mean_d, rstd_d, scale_d, dz_add)
    return (dz, dskip if dskip is not None else z.new_empty(0),
            sums if sums is not None else z.new_empty((0,), dtype=stats_dtype(z)))


def bn_act_bwd_reduce(dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
                      shift: Tensor, mask: Optional[Tensor], mask_mode: int,
                      factor: Optional[Tensor], skip_mode: int, zd: Optional[Tensor],
                      mean_d: Optional[Tensor], rstd_d: Optional[Tensor],
                      per_sample: bool = False) -> Tensor:
    """The per-channel sums of bn_act_bwd alone, [2 or 4, C]; zeros for an empty z.
    ``per_sample``: summed over H*W only, [2 or 4, N, C]."""
    cl, dy, z, zd, _, factor = _bwd_prepare(dy, z, zd, None, factor)
    K = 4 if skip_mode == 2 else 2
    shape = (K, z.shape[0], z.shape[1]) if per_sample else (K, z.shape[1])
    if z.numel() == 0:
        return torch.zeros(shape, device=z.device, dtype=stats_dtype(z))
    return _ReducePass(z, cl, mask_mode, _factor_dim(factor), skip_mode, K, per_sample)(
        dy, z, mean, rstd, scale, shift, mask, factor, zd, mean_d, rstd_d,
        torch.empty(shape, device=z.device, dtype=stats_dtype(z)))


def bn_act_bwd_apply(dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
                     shift: Tensor, mask: Optional[Tensor], mask_mode: int,
                     factor: Optional[Tensor], skip_mode: int, zd: Optional[Tensor],
                     mean_d: Optional[Tensor], rstd_d: Optional[Tensor],
                     scale_d: Optional[Tensor], batch_stats: bool, batch_stats_d: bool,
                     dz_add: Optional[Tensor], mean_sums: Tensor,
                     du_add: Optional[Tensor] = None):
    """The elementwise pass of bn_act_bwd with given per-channel means of the sums
    (bn_act_bwd_reduce's rows divided by the count, all ranks' under synchronised batch
    norm); du_add [N, C] added to g_b before the BN backward. Returns (dz, dskip)."""
    cl, dy, z, zd, dz_add, factor = _bwd_prepare(dy, z, zd, dz_add, factor)
    if du_add is not None:
        N, C = z.shape[:2]
        if tuple(du_add.shape) != (N, C):
            raise ValueError(f"bn_act_bwd_apply(du_add): expected shape ({N}, {C}), got "
                             f"{tuple(du_add.shape)}")
        du_add = as_dtype(du_add, stats_dtype(z)).contiguous()
    dz, dskip = _ApplyPass(z, cl, mask_mode, _factor_dim(factor), skip_mode, batch_stats,
                           batch_stats_d, dz_add is not None, du_add is not None)(
        dy, z, mean, rstd, scale, shift, mask, factor, zd, mean_d, rstd_d, scale_d, dz_add,
        in_layout(mean_sums, False), 1.0, du_add)
    return dz, (dskip if dskip is not None else z.new_empty(0))
