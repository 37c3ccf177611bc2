"""Per-channel batch statistics (the forward of batch norm's first half).

    mean_c = 1/M sum_i z_ic          var_c = 1/M sum_i (z_ic - mean_c)^2       M = N*H*W
    rstd_c = 1/sqrt(var_c + eps)     scale_c = gamma_c*rstd_c     shift_c = beta_c - mean_c*scale_c
    running_mean <- (1-f)*running_mean + f*mean      running_var <- (1-f)*running_var + f*var*M/(M-1)

with f = momentum, or 1/num_batches_tracked when momentum is None (cumulative average).

Two kernels, no atomics, so the result is the same every run:
1. ``_bn_stats_partial_kernel``: a 2-D grid of (sample chunk x position block, channel block)
   programs. Each lane keeps a Welford (mean, M2) over the samples of its chunk; the lanes
   of a channel are then merged with the exact equal-count formula. Writes one
   (count, mean, M2) partial per program and channel.
2. ``_bn_stats_finalize_kernel``: merges the partials of each channel with Chan's formula,
   writes mean, rstd, scale, shift and updates the running statistics in their own dtype.
   Under synchronised batch norm it runs twice: first to write this process's merged
   (count, mean, M2) for the ranks to exchange, then over the gathered [R, 3, C] rows.
The grid of the first kernel is sized to fill the GPU whatever the shape (config.py): one
program per channel is what makes other Triton batch norms slow on 56x56 images.
"""
import triton
import triton.language as tl

from .bn_math import chan_combine, program_tile, sample_base, welford_update


@triton.jit
def _bn_stats_partial_kernel(
    x_ptr,           # [N, C, H, W] conv output, NCHW or channels_last
    part_mean_ptr,   # [P, C] mean of each partial
    part_m2_ptr,     # [P, C] sum of squared deviations of each partial
    part_count_ptr,  # [P] values per channel in each partial
    N, C, HW,
    N_PER_PROG,      # samples per program along the partial axis
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 storage
):
    n_start, c0, s0, c, s, valid, offs = program_tile(C, HW, N_PER_PROG, BLOCK_C, BLOCK_HW,
                                                      CHANNELS_LAST)
    pid_p = tl.program_id(0)

    # Accumulate x - pivot, the pivot one value of the channel: with |mean| >> std the
    # Welford mean would otherwise round at ulp(mean) on every step.
    if CHANNELS_LAST:
        pivot_offs = s0 * C + c
    else:
        pivot_offs = c * HW + s0
    pivot = tl.load(sample_base(x_ptr, n_start, C, HW) + pivot_offs, mask=c < C, other=0.0)
    pivot = pivot.to(ACC_DTYPE)[:, None]
    mean = tl.zeros([BLOCK_C, BLOCK_HW], ACC_DTYPE)
    m2 = tl.zeros([BLOCK_C, BLOCK_HW], ACC_DTYPE)
    # while, not for-range: triton 3.6's interpreter cannot take a run-time bound
    i = 0
    while i < N_PER_PROG:
        n = n_start + i
        live = valid & (n < N)
        x = tl.load(sample_base(x_ptr, n, C, HW) + offs, mask=live, other=0.0).to(ACC_DTYPE) - pivot
        inv_k = 1.0 / tl.cast(i + 1, ACC_DTYPE)
        new_mean, new_m2 = welford_update(mean, m2, x, inv_k)
        mean = tl.where(n < N, new_mean, mean)
        m2 = tl.where(n < N, new_m2, m2)
        i += 1

    # Every valid lane saw the same number of samples, so the lanes of a channel merge
    # exactly: mean of means, and M2 = sum M2_l + k * sum (mean_l - mean)^2.
    k = tl.cast(tl.minimum(N - n_start, N_PER_PROG), ACC_DTYPE)
    lanes = tl.minimum(HW - s0, BLOCK_HW).to(ACC_DTYPE)
    tile_mean = tl.sum(tl.where(valid, mean, 0.0), axis=1) / lanes
    dev = tl.where(valid, mean - tile_mean[:, None], 0.0)
    tile_m2 = tl.sum(tl.where(valid, m2, 0.0), axis=1) + k * tl.sum(dev * dev, axis=1)

    cmask = c < C
    tile_mean += tl.sum(pivot, axis=1)
    tl.store(part_mean_ptr + pid_p * C + c, tile_mean, mask=cmask)
    tl.store(part_m2_ptr + pid_p * C + c, tile_m2, mask=cmask)
    if c0 == 0:
        tl.store(part_count_ptr + pid_p, k * lanes)


@triton.jit
def _bn_stats_finalize_kernel(
    part_mean_ptr,     # [P, C] rows stride_p apart
    part_m2_ptr,       # [P, C] rows stride_p apart
    part_count_ptr,    # [P] count_stride apart
    weight_ptr,        # [C] gamma (has_weight)
    bias_ptr,          # [C] beta (has_bias)
    running_mean_ptr,  # [C] updated in place (update_running), any float dtype
    running_var_ptr,   # [C] updated in place (update_running)
    nbt_ptr,           # num_batches_tracked, already incremented (cumulative)
    mean_ptr,          # [C] out: batch mean
    rstd_ptr,          # [C] out: 1/sqrt(biased var + eps)
    scale_ptr,         # [C] out: gamma*rstd
    shift_ptr,         # [C] out: beta - mean*scale
    moments_ptr,       # [3, C] out: merged (count, mean, M2) (write_moments)
    P, C,
    stride_p,          # between partials' rows: C for the partial kernel's, 3C for gathered moments
    count_stride,      # between counts: 1, or 3C
    momentum,          # running-stat factor when not cumulative, as fp32 hi + lo, so an
    momentum_lo,       # fp64 buffer gets the whole double that PyTorch would use
    eps,
    has_weight,
    has_bias,
    update_running,
    cumulative,        # momentum=None: factor 1/num_batches_tracked, read on the device
    write_moments,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n_acc = tl.zeros([BLOCK_C], ACC_DTYPE)
    mean_acc = tl.zeros([BLOCK_C], ACC_DTYPE)
    m2_acc = tl.zeros([BLOCK_C], ACC_DTYPE)
    # while, not for-range: triton 3.6's interpreter cannot take a run-time bound
    p0 = 0
    while p0 < P:
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < P
        m = pmask[:, None] & cmask[None, :]
        cnt = tl.load(part_count_ptr + p * count_stride, mask=pmask, other=0.0).to(ACC_DTYPE)
        rows = p[:, None] * stride_p + c[None, :]
        pm = tl.load(part_mean_ptr + rows, mask=m, other=0.0).to(ACC_DTYPE)
        pq = tl.load(part_m2_ptr + rows, mask=m, other=0.0).to(ACC_DTYPE)
        # merge this chunk of partials exactly (mean first, then deviations from it) ...
        n_b = tl.sum(cnt, axis=0)
        # (a chunk of empty ranks' moments adds nothing: keep 0/0 out of the merge)
        mean_b = tl.sum(cnt[:, None] * pm, axis=0) / tl.maximum(n_b, 1.0)
        d = tl.where(m, pm - mean_b[None, :], 0.0)
        m2_b = tl.sum(pq, axis=0) + tl.sum(cnt[:, None] * d * d, axis=0)
        # ... then into the running summary with Chan's formula
        n_acc, mean_acc, m2_acc = chan_combine(n_acc, mean_acc, m2_acc, n_b + tl.zeros_like(n_acc), mean_b, m2_b)
        p0 += BLOCK_P

    wm = cmask & (write_moments != 0)
    tl.store(moments_ptr + c, n_acc, mask=wm)
    tl.store(moments_ptr + C + c, mean_acc, mask=wm)
    tl.store(moments_ptr + 2 * C + c, m2_acc, mask=wm)

    # no value in any rank's batch: as bn_stats on an empty batch (mean 0, rstd 1, scale and
    # shift 0, running statistics untouched)
    empty = n_acc == 0
    var = m2_acc / tl.maximum(n_acc, 1.0)
    if ACC_DTYPE == tl.float64:
        rstd = 1.0 / tl.sqrt(var + eps)
    else:
        rstd = 1.0 / tl.sqrt_rn(var + eps)  # IEEE-rounded, as torch.rsqrt's reference
    w = tl.load(weight_ptr + c, mask=cmask & (has_weight != 0), other=1.0).to(ACC_DTYPE)
    b = tl.load(bias_ptr + c, mask=cmask & (has_bias != 0), other=0.0).to(ACC_DTYPE)
    rstd = tl.where(empty, 1.0, rstd)
    scale = tl.where(empty, 0.0, w * rstd)
    tl.store(mean_ptr + c, mean_acc, mask=cmask)
    tl.store(rstd_ptr + c, rstd, mask=cmask)
    tl.store(scale_ptr + c, scale, mask=cmask)
    tl.store(shift_ptr + c, tl.where(empty, 0.0, b - mean_acc * scale), mask=cmask)

    update = cmask & (update_running != 0) & (n_acc > 0)
    nbt = tl.load(nbt_ptr, mask=cumulative != 0, other=1)
    mom = tl.cast(momentum, ACC_DTYPE) + tl.cast(momentum_lo, ACC_DTYPE)
    f = tl.where(cumulative != 0, 1.0 / nbt.to(ACC_DTYPE), mom)
    rm = tl.load(running_mean_ptr + c, mask=update, other=0.0)
    rv = tl.load(running_var_ptr + c, mask=update, other=0.0)
    unbiased = m2_acc / (n_acc - 1.0)
    new_rm = (1.0 - f) * rm.to(ACC_DTYPE) + f * mean_acc
    new_rv = (1.0 - f) * rv.to(ACC_DTYPE) + f * unbiased
    tl.store(running_mean_ptr + c, new_rm.to(rm.dtype), mask=update)
    tl.store(running_var_ptr + c, new_rv.to(rv.dtype), mask=update)
