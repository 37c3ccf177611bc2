"""The forward epilogue of a batch norm, with the residual add and ReLU fused in.

    y = act( f_n * (z*scale + shift) + skip ),   act = ReLU or identity
    skip = 0 | r | zd*scale_d + shift_d       (none, identity, projection shortcut's own BN)

f_n is an optional per-sample factor (stochastic depth: keep/keep_prob). Training and eval
use the same kernel; only where scale and shift come from differs. With WRITE_MASK the kernel
also stores which outputs pass a gradient through the ReLU as one bit per element, so the
backward never reads the output tensor.
"""
import triton
import triton.language as tl

from .bn_math import (bn_apply, mask_sample_base, program_tile, relu, relu_keep, sample_base,
                      store_bits)


@triton.jit
def _bn_act_fwd_kernel(
    z_ptr,           # [N, C, H, W] conv output
    y_ptr,           # [N, C, H, W] out, same layout and dtype as z
    scale_ptr,       # [C] fp32 gamma*rstd
    shift_ptr,       # [C] fp32 beta - mean*scale
    skip_ptr,        # [N, C, H, W] residual (SKIP 1) or projection conv output (SKIP 2)
    skip_scale_ptr,  # [C] the projection BN's scale (SKIP 2)
    skip_shift_ptr,  # [C] the projection BN's shift (SKIP 2)
    factor_ptr,      # [N] per-sample branch factor (has_factor)
    mask_ptr,        # packed ReLU bits (write_mask): [N, C, ceil(HW/8)] or [N, HW, ceil(C/8)]
    N, C, HW,
    N_PER_PROG,
    has_factor,
    do_relu,
    write_mask,
    SKIP: tl.constexpr,          # 0 none, 1 tensor, 2 normalised tensor
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    # Cheap flags are run-time scalars (a switched-off operand is a predicated-off load that
    # moves no bytes); only SKIP, which changes what the loop loads, is a constexpr. That
    # keeps the variants few enough for the compile test to build every one.
    n_start, c0, s0, c, s, valid, offs = program_tile(C, HW, N_PER_PROG, BLOCK_C, BLOCK_HW,
                                                      CHANNELS_LAST)
    cmask = c < C
    has_factor = has_factor != 0

    scale = tl.load(scale_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
    shift = tl.load(shift_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
    if SKIP == 2:
        skip_scale = tl.load(skip_scale_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]
        skip_shift = tl.load(skip_shift_ptr + c, mask=cmask, other=0.0).to(ACC_DTYPE)[:, None]

    # while, not for-range: triton 3.6's interpreter cannot take a run-time bound
    i = 0
    while i < N_PER_PROG:
        n = n_start + i
        live = valid & (n < N)
        z = tl.load(sample_base(z_ptr, n, C, HW) + offs, mask=live, other=0.0)
        v = bn_apply(z.to(ACC_DTYPE), scale, shift)
        v = v * tl.load(factor_ptr + n, mask=has_factor, other=1.0).to(ACC_DTYPE)
        if SKIP == 1:
            v += tl.load(sample_base(skip_ptr, n, C, HW) + offs, mask=live, other=0.0).to(ACC_DTYPE)
        if SKIP == 2:
            zd = tl.load(sample_base(skip_ptr, n, C, HW) + offs, mask=live, other=0.0).to(ACC_DTYPE)
            v += bn_apply(zd, skip_scale, skip_shift)
        out = tl.where(do_relu != 0, relu(v), v)
        tl.store(sample_base(y_ptr, n, C, HW) + offs, out.to(z.dtype), mask=live)
        if write_mask != 0:
            keep = relu_keep(v) & live
            store_bits(mask_sample_base(mask_ptr, n, C, HW, CHANNELS_LAST),
                       keep, c0, s0, C, HW, n < N, BLOCK_C, BLOCK_HW, CHANNELS_LAST)
        i += 1
