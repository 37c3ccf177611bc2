"""Backward of the fused epilogue: batch norm (+ ReLU, + residual, + projection BN).

With g = where(relu passed, dy, 0), g_b = f_n * g on the branch and xhat = (z - mean)*rstd:

    dbeta = sum g_b       dgamma = sum g_b*xhat
    dz    = scale * (g_b - dbeta/M - xhat * dgamma/M)       (batch statistics; M = N*H*W)
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

from .bn_math import (bn_apply, bn_input_grad, mask_sample_base, relu_grad, relu_keep,
                      sample_base, tile_offsets, unpack_bits)

MASK_NONE, MASK_RECOMPUTE, MASK_BITS = 0, 1, 2


@triton.jit
def _relu_keep_tile(z, scale, shift, mask_ptr, n, c, s, C, HW, MASK_MODE: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    if MASK_MODE == 1:
        return relu_keep(bn_apply(z, scale, shift))
    else:
        return unpack_bits(mask_sample_base(mask_ptr, n, C, HW, CHANNELS_LAST), c, s, C, HW,
                           BLOCK_C, BLOCK_HW, CHANNELS_LAST)


@triton.jit
def _bn_act_bwd_reduce_kernel(
    dy_ptr,          # [N, C, H, W] gradient of the epilogue's output
    z_ptr,           # [N, C, H, W] conv output the BN normalised
    mean_ptr,        # [C] statistics the forward used
    rstd_ptr,        # [C]
    scale_ptr,       # [C] (MASK_MODE 1)
    shift_ptr,       # [C] (MASK_MODE 1)
    mask_ptr,        # packed ReLU bits (MASK_MODE 2)
    factor_ptr,      # [N] per-sample branch factor (HAS_FACTOR)
    zd_ptr,          # [N, C, H, W] projection conv output (SKIP_BN)
    mean_d_ptr,      # [C] (SKIP_BN)
    rstd_d_ptr,      # [C] (SKIP_BN)
    part_ptr,        # [K, P, C] out: partial sum g_b, g_b*xhat[, g, g*xhat_d]
    N, C, HW, P,
    N_PER_PROG,
    MASK_MODE: tl.constexpr,   # 0 no ReLU, 1 recompute from z, 2 packed bits
    HAS_FACTOR: tl.constexpr,
    SKIP_BN: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    num_s_blocks = tl.cdiv(HW, BLOCK_HW)
    s0 = (pid_p % num_s_blocks) * BLOCK_HW
    n_start = (pid_p // num_s_blocks) * N_PER_PROG
    n_end = tl.minimum(n_start + N_PER_PROG, N)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    s = s0 + tl.arange(0, BLOCK_HW)
    cmask = c < C
    valid = cmask[:, None] & (s < HW)[None, :]
    offs = tile_offsets(c, s, C, HW, CHANNELS_LAST)

    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
    rstd = tl.load(rstd_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
    if MASK_MODE == 1:
        scale = tl.load(scale_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
        shift = tl.load(shift_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
    else:
        scale = mean
        shift = mean
    if SKIP_BN:
        mean_d = tl.load(mean_d_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
        rstd_d = tl.load(rstd_d_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]

    acc_g = tl.zeros([BLOCK_C, BLOCK_HW], ACC_DTYPE)
    acc_gx = tl.zeros([BLOCK_C, BLOCK_HW], ACC_DTYPE)
    acc_gs = tl.zeros([BLOCK_C, BLOCK_HW], ACC_DTYPE)
    acc_gsx = tl.zeros([BLOCK_C, BLOCK_HW], ACC_DTYPE)
    for n in range(n_start, n_end):
        dy = tl.load(sample_base(dy_ptr, n, C, HW) + offs, mask=valid, other=0.0).to(ACC_DTYPE)
        z = tl.load(sample_base(z_ptr, n, C, HW) + offs, mask=valid, other=0.0).to(ACC_DTYPE)
        if MASK_MODE == 0:
            g = dy
        else:
            keep = _relu_keep_tile(z, scale, shift, mask_ptr, n, c, s, C, HW, MASK_MODE,
                                   BLOCK_C, BLOCK_HW, CHANNELS_LAST)
            g = relu_grad(dy, keep)
        g = tl.where(valid, g, 0.0)
        if HAS_FACTOR:
            g_b = g * tl.load(factor_ptr + n).to(ACC_DTYPE)
        else:
            g_b = g
        acc_g += g_b
        acc_gx += g_b * ((z - mean) * rstd)
        if SKIP_BN:
            zd = tl.load(sample_base(zd_ptr, n, C, HW) + offs, mask=valid, other=0.0).to(ACC_DTYPE)
            acc_gs += g
            acc_gsx += g * ((zd - mean_d) * rstd_d)

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
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = (p < P)[:, None] & cmask[None, :]
        acc += tl.load(part_ptr + k * P * C + p[:, None] * C + c[None, :], mask=m, other=0.0)
    tl.store(out_ptr + k * C + c, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _bn_act_bwd_apply_kernel(
    dy_ptr,          # [N, C, H, W]
    z_ptr,           # [N, C, H, W]
    mean_ptr,        # [C]
    rstd_ptr,        # [C]
    scale_ptr,       # [C] gamma*rstd
    shift_ptr,       # [C] (MASK_MODE 1)
    mask_ptr,        # packed ReLU bits (MASK_MODE 2)
    factor_ptr,      # [N] (HAS_FACTOR)
    sums_ptr,        # [K, C] sum g_b, g_b*xhat[, g, g*xhat_d] (BATCH_STATS / BATCH_STATS_D)
    zd_ptr,          # [N, C, H, W] (SKIP 2)
    mean_d_ptr,      # [C] (SKIP 2)
    rstd_d_ptr,      # [C] (SKIP 2)
    scale_d_ptr,     # [C] (SKIP 2)
    dz_add_ptr,      # [N, C, H, W] a gradient to add to dz (HAS_DZ_ADD)
    dz_ptr,          # [N, C, H, W] out
    dskip_ptr,       # [N, C, H, W] out: g (SKIP 1) or dzd (SKIP 2)
    inv_count,       # 1/M
    N, C, HW,
    N_PER_PROG,
    MASK_MODE: tl.constexpr,
    HAS_FACTOR: tl.constexpr,
    SKIP: tl.constexpr,          # 0 none, 1 write dskip = g, 2 write dzd
    BATCH_STATS: tl.constexpr,
    BATCH_STATS_D: tl.constexpr,
    HAS_DZ_ADD: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    num_s_blocks = tl.cdiv(HW, BLOCK_HW)
    s0 = (pid_p % num_s_blocks) * BLOCK_HW
    n_start = (pid_p // num_s_blocks) * N_PER_PROG
    n_end = tl.minimum(n_start + N_PER_PROG, N)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    s = s0 + tl.arange(0, BLOCK_HW)
    cmask = c < C
    valid = cmask[:, None] & (s < HW)[None, :]
    offs = tile_offsets(c, s, C, HW, CHANNELS_LAST)

    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
    rstd = tl.load(rstd_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
    scale = tl.load(scale_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
    if MASK_MODE == 1:
        shift = tl.load(shift_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
    else:
        shift = scale
    if BATCH_STATS:
        mean_g = (tl.load(sums_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE) * inv_count)[:, None]
        mean_gx = (tl.load(sums_ptr + C + c, mask=cmask, other=0.0).to(ACC_DTYPE) * inv_count)[:, None]
    else:
        mean_g = scale
        mean_gx = scale
    if SKIP == 2:
        mean_d = tl.load(mean_d_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
        rstd_d = tl.load(rstd_d_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
        scale_d = tl.load(scale_d_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
        if BATCH_STATS_D:
            mean_gs = (tl.load(sums_ptr + 2 * C + c, mask=cmask, other=0.0).to(ACC_DTYPE) * inv_count)[:, None]
            mean_gsx = (tl.load(sums_ptr + 3 * C + c, mask=cmask, other=0.0).to(ACC_DTYPE) * inv_count)[:, None]
        else:
            mean_gs = scale_d
            mean_gsx = scale_d

    for n in range(n_start, n_end):
        dy_raw = tl.load(sample_base(dy_ptr, n, C, HW) + offs, mask=valid, other=0.0)
        dy = dy_raw.to(ACC_DTYPE)
        z_raw = tl.load(sample_base(z_ptr, n, C, HW) + offs, mask=valid, other=0.0)
        z = z_raw.to(ACC_DTYPE)
        if MASK_MODE == 0:
            g = dy
        else:
            keep = _relu_keep_tile(z, scale, shift, mask_ptr, n, c, s, C, HW, MASK_MODE,
                                   BLOCK_C, BLOCK_HW, CHANNELS_LAST)
            g = relu_grad(dy, keep)
        if HAS_FACTOR:
            g_b = g * tl.load(factor_ptr + n).to(ACC_DTYPE)
        else:
            g_b = g
        dz = bn_input_grad(scale, g_b, (z - mean) * rstd, mean_g, mean_gx, BATCH_STATS)
        if HAS_DZ_ADD:
            dz += tl.load(sample_base(dz_add_ptr, n, C, HW) + offs, mask=valid, other=0.0).to(ACC_DTYPE)
        tl.store(sample_base(dz_ptr, n, C, HW) + offs, dz.to(z_raw.dtype), mask=valid)
        if SKIP == 1:
            tl.store(sample_base(dskip_ptr, n, C, HW) + offs, g.to(dy_raw.dtype), mask=valid)
        if SKIP == 2:
            zd = tl.load(sample_base(zd_ptr, n, C, HW) + offs, mask=valid, other=0.0).to(ACC_DTYPE)
            dzd = bn_input_grad(scale_d, g, (zd - mean_d) * rstd_d, mean_gs, mean_gsx, BATCH_STATS_D)
            tl.store(sample_base(dskip_ptr, n, C, HW) + offs, dzd.to(z_raw.dtype), mask=valid)
