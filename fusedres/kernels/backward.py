"""Backward of the fused epilogue: batch norm (+ ReLU, + residual, + projection BN).

With g = where(relu passed, dy, 0), g_b = f_n * g on the branch and xhat = (z - mean)*rstd:

    dbeta = sum g_b       dgamma = sum g_b*xhat
    dz    = scale * (g_b - dbeta/M - xhat * dgamma/M)       (batch statistics; M = N*H*W)
          = scale*g_b - b - k*(z - mean)                     (b, k per channel: bn_math)
    dz    = scale * g_b                                      (running statistics)
    dskip = g   (identity shortcut)     dzd: the same formula with g and the projection BN

Three passes, no atomics: ``_bn_act_bwd_reduce_kernel`` writes per-program partial sums,
``_sum_partials_kernel`` adds them up per channel in a fixed order, and
``_bn_act_bwd_apply_kernel`` writes dz (and dzd or dskip). The ReLU mask is recomputed from
z and the saved scale/shift (inner BN+ReLU) or read from the forward's packed bits (after a
residual add), so no activation is saved for the backward.
"""
import triton
import triton.language as tl

from .bn_math import (bn_apply, bn_grad_coefficients, bn_input_grad, mask_sample_base,
                      program_tile, relu_grad, relu_keep, sample_base, unpack_bits)

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


@triton.jit
def _bn_act_bwd_reduce_kernel(
    dy_ptr,          # [N, C, H, W] gradient of the epilogue's output
    z_ptr,           # [N, C, H, W] conv output the BN normalised
    mean_ptr,        # [C] statistics the forward used
    rstd_ptr,        # [C]
    scale_ptr,       # [C] gamma*rstd
    shift_ptr,       # [C]
    mask_ptr,        # packed ReLU bits (FROM_BITS)
    factor_ptr,      # [N] per-sample branch factor (has_factor)
    zd_ptr,          # [N, C, H, W] projection conv output (SKIP_BN)
    mean_d_ptr,      # [C] (SKIP_BN)
    rstd_d_ptr,      # [C] (SKIP_BN)
    part_ptr,        # [K, P, C] out: partial sum g_b, g_b*xhat[, g, g*xhat_d]
    N, C, HW, P,
    N_PER_PROG,
    no_relu,         # mask_mode 0: no ReLU to go through
    has_factor,
    FROM_BITS: tl.constexpr,   # mask_mode 2: ReLU from packed bits, else recomputed from z
    SKIP_BN: tl.constexpr,     # also reduce for the projection BN
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    n_start, c0, s0, c, s, valid, offs = program_tile(C, HW, N_PER_PROG, BLOCK_C, BLOCK_HW,
                                                      CHANNELS_LAST)
    cmask = c < C
    pid_p = tl.program_id(0)
    has_factor = has_factor != 0
    no_relu = no_relu != 0

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
    # while, not for-range: triton 3.6's interpreter cannot take a run-time bound
    i = 0
    while i < N_PER_PROG:
        n = n_start + i
        live = valid & (n < N)
        dy = tl.load(sample_base(dy_ptr, n, C, HW) + offs, mask=live, other=0.0).to(ACC_DTYPE)
        z = tl.load(sample_base(z_ptr, n, C, HW) + offs, mask=live, other=0.0).to(ACC_DTYPE)
        g = _grad_through_relu(dy, z, scale, shift, mask_ptr, n, c, s, C, HW, live, no_relu,
                               FROM_BITS, BLOCK_C, BLOCK_HW, CHANNELS_LAST)
        g_b = g * tl.load(factor_ptr + n, mask=has_factor, other=1.0).to(ACC_DTYPE)
        acc_g += g_b
        acc_gx += g_b * ((z - mean) * rstd)
        if SKIP_BN:
            zd = tl.load(sample_base(zd_ptr, n, C, HW) + offs, mask=live, other=0.0).to(ACC_DTYPE)
            acc_gs += g
            acc_gsx += g * ((zd - mean_d) * rstd_d)
        i += 1

    row = pid_p * C + c
    tl.store(part_ptr + row, tl.sum(acc_g, axis=1), mask=cmask)
    tl.store(part_ptr + P * C + row, tl.sum(acc_gx, axis=1), mask=cmask)
    if SKIP_BN:
        tl.store(part_ptr + 2 * P * C + row, tl.sum(acc_gs, axis=1), mask=cmask)
        tl.store(part_ptr + 3 * P * C + row, tl.sum(acc_gsx, axis=1), mask=cmask)


@triton.jit
def _sum_partials_kernel(
    part_ptr,   # [K, P, C]
    out_ptr,    # [K, C]
    P, C,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    k = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC_DTYPE)
    # while, not for-range: triton 3.6's interpreter cannot take a run-time bound
    p0 = 0
    while p0 < P:
        p = p0 + tl.arange(0, BLOCK_P)
        m = (p < P)[:, None] & cmask[None, :]
        acc += tl.load(part_ptr + k * P * C + p[:, None] * C + c[None, :], mask=m, other=0.0)
        p0 += BLOCK_P
    tl.store(out_ptr + k * C + c, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _bn_act_bwd_apply_kernel(
    dy_ptr,          # [N, C, H, W]
    z_ptr,           # [N, C, H, W]
    mean_ptr,        # [C]
    rstd_ptr,        # [C]
    scale_ptr,       # [C] gamma*rstd
    shift_ptr,       # [C]
    mask_ptr,        # packed ReLU bits (FROM_BITS)
    factor_ptr,      # [N] (has_factor)
    sums_ptr,        # [K, C] sum g_b, g_b*xhat[, g, g*xhat_d] (batch_stats / batch_stats_d)
    zd_ptr,          # [N, C, H, W] (SKIP 2)
    mean_d_ptr,      # [C] (SKIP 2)
    rstd_d_ptr,      # [C] (SKIP 2)
    scale_d_ptr,     # [C] (SKIP 2)
    dz_add_ptr,      # [N, C, H, W] a gradient to add to dz (has_dz_add)
    dz_ptr,          # [N, C, H, W] out
    dskip_ptr,       # [N, C, H, W] out: g (SKIP 1) or dzd (SKIP 2)
    inv_count,       # 1/M
    N, C, HW,
    N_PER_PROG,
    no_relu,         # mask_mode 0: no ReLU to go through
    has_factor,
    batch_stats,     # the main BN normalised with batch statistics
    batch_stats_d,   # the projection BN did
    has_dz_add,
    FROM_BITS: tl.constexpr,   # mask_mode 2: ReLU from packed bits, else recomputed from z
    SKIP: tl.constexpr,        # 0 none, 1 write dskip = g, 2 write dzd
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    n_start, c0, s0, c, s, valid, offs = program_tile(C, HW, N_PER_PROG, BLOCK_C, BLOCK_HW,
                                                      CHANNELS_LAST)
    cmask = c < C
    has_factor = has_factor != 0
    no_relu = no_relu != 0
    batch_stats = batch_stats != 0
    batch_stats_d = batch_stats_d != 0
    has_dz_add = has_dz_add != 0

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

    # while, not for-range: triton 3.6's interpreter cannot take a run-time bound
    i = 0
    while i < N_PER_PROG:
        n = n_start + i
        live = valid & (n < N)
        dy_raw = tl.load(sample_base(dy_ptr, n, C, HW) + offs, mask=live, other=0.0)
        z_raw = tl.load(sample_base(z_ptr, n, C, HW) + offs, mask=live, other=0.0)
        z = z_raw.to(ACC_DTYPE)
        g = _grad_through_relu(dy_raw.to(ACC_DTYPE), z, scale, shift, mask_ptr, n, c, s, C, HW,
                               live, no_relu, FROM_BITS, BLOCK_C, BLOCK_HW, CHANNELS_LAST)
        g_b = g * tl.load(factor_ptr + n, mask=has_factor, other=1.0).to(ACC_DTYPE)
        dz = bn_input_grad(scale, g_b, z, mean, b, k, batch_stats)
        dz += tl.load(sample_base(dz_add_ptr, n, C, HW) + offs, mask=live & has_dz_add,
                      other=0.0).to(ACC_DTYPE)
        tl.store(sample_base(dz_ptr, n, C, HW) + offs, dz.to(z_raw.dtype), mask=live)
        if SKIP == 1:
            tl.store(sample_base(dskip_ptr, n, C, HW) + offs, g.to(dy_raw.dtype), mask=live)
        if SKIP == 2:
            zd = tl.load(sample_base(zd_ptr, n, C, HW) + offs, mask=live, other=0.0).to(ACC_DTYPE)
            dzd = bn_input_grad(scale_d, g, zd, mean_d, b_d, k_d, batch_stats_d)
            tl.store(sample_base(dskip_ptr, n, C, HW) + offs, dzd.to(z_raw.dtype), mask=live)
        i += 1
