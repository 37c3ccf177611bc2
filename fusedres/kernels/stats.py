"""Per-channel batch statistics (the forward of batch norm's first half), and their launchers.

    mean_c = 1/M sum_i z_ic          var_c = 1/M sum_i (z_ic - mean_c)^2       M = N*H*W
    rstd_c = 1/sqrt(var_c + eps)     scale_c = gamma_c*rstd_c     shift_c = beta_c - mean_c*scale_c
    running_mean <- (1-f)*running_mean + f*mean      running_var <- (1-f)*running_var + f*var*M/(M-1)
    num_batches_tracked <- num_batches_tracked + 1

with f = momentum, or 1/num_batches_tracked (after the increment) when momentum is None.

One launch, ``_bn_stats_partial_kernel``: a 2-D grid of (sample chunk x position block,
channel block) programs. Each lane keeps a Welford (mean, M2) over the samples of its
chunk in a pipelined loop; the lanes of a channel merge with the exact equal-count
formula, and each program writes one (mean, M2) partial per channel. It then takes a
ticket on its channel block's counter; the last program of the block merges all the
block's partials in partial-index order (never arrival order: the result is the same bit
for bit every run), writes mean, rstd, scale, shift, and updates the running statistics.
The last of those merging programs counts the batch in num_batches_tracked.

With ``POOL`` (a squeeze-excite / ECA gate's input, ``bn_stats_pool`` and ``bn_pool``) the
same launch also writes m[n, c] = mean over H*W of x: each program stores, per sample, its
tile's sum over positions (a [N, S, C] partial, S position blocks), and the last of the S
programs of each (sample chunk, channel block) adds them up in position-block order, so
the pooled means are deterministic too and x is read once. The partials cost
4/(itemsize*BLOCK_HW) of x's bytes, written once and read once (bf16 channels_last at a
ResNet-50 bn3 site: 256 x 8 tiles, 25%): less than a second pass over x, not free. The statistics are computed
exactly as without POOL (same tiles, same merge), so bn_stats_pool's running-statistics
update is bn_stats's bit for bit. In eval (``bn_pool``) the same kernel runs with the
moments output thrown away: the Welford arithmetic is hidden under the one read of x,
and a second kernel would copy this one's tiling and merge.

Synchronised batch norm keeps two steps, since the ranks exchange data between them:
``bn_moments`` is the same kernel writing the merged (count, mean, M2) instead, and
``_bn_stats_finalize_kernel`` merges the gathered [R, 3, C] rows of every rank.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import config
from ..layout import is_channels_last, stats_dtype
from .bn_math import (chan_combine, group_ticket, load_tile, program_tile, sample_base,
                      sum_partials, welford_update)
from .config import NUM_WARPS, SAMPLE_COUNTS, finalize_config, tile_config
from .launch import (Tickets, Workspace, acc_dtype, bind_launch, counters, hi_lo, in_layout,
                     launch, num_sms, scratch, shape3, template)

Tensor = torch.Tensor


@triton.jit
def _normalise_and_update(
    c, cmask, n_acc, mean_acc, m2_acc,
    weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr, nbt_ptr, out_ptr, C,
    momentum, momentum_lo, eps, has_weight, has_bias, update_running, cumulative,
    ACC_DTYPE: tl.constexpr,
):
    """From a channel block's merged (count, mean, M2): store out = [mean, rstd, scale,
    shift] ([4, C]) and update the running statistics. A channel with no value (an empty
    batch on every rank) gets mean 0, rstd 1, scale and shift 0, running statistics
    untouched, as bn_stats on an empty batch."""
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
    tl.store(out_ptr + c, mean_acc, mask=cmask)
    tl.store(out_ptr + C + c, rstd, mask=cmask)
    tl.store(out_ptr + 2 * C + c, scale, mask=cmask)
    tl.store(out_ptr + 3 * C + c, tl.where(empty, 0.0, b - mean_acc * scale), mask=cmask)

    # the factor uses num_batches_tracked after this batch's increment, which the last
    # merging program makes only once every merging program has read it (count_batch)
    update = cmask & (update_running != 0) & (n_acc > 0)
    nbt = tl.load(nbt_ptr, mask=cumulative != 0, other=0) + 1
    mom = tl.cast(momentum, ACC_DTYPE) + tl.cast(momentum_lo, ACC_DTYPE)
    f = tl.where(cumulative != 0, 1.0 / nbt.to(ACC_DTYPE), mom)
    rm = tl.load(running_mean_ptr + c, mask=update, other=0.0)
    rv = tl.load(running_var_ptr + c, mask=update, other=0.0)
    unbiased = m2_acc / (n_acc - 1.0)
    new_rm = (1.0 - f) * rm.to(ACC_DTYPE) + f * mean_acc
    new_rv = (1.0 - f) * rv.to(ACC_DTYPE) + f * unbiased
    tl.store(running_mean_ptr + c, new_rm.to(rm.dtype), mask=update)
    tl.store(running_var_ptr + c, new_rv.to(rv.dtype), mask=update)


@triton.jit
def count_batch(counter_ptr, n_blocks, nbt_ptr, count):
    """num_batches_tracked += 1, once per launch: each merging program (one per channel
    block) takes a ticket after it has read num_batches_tracked, and the last one counts
    the batch and resets the ticket."""
    if count != 0:
        tl.debug_barrier()  # every thread's read of num_batches_tracked before the release
        done = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if done == n_blocks - 1:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
            tl.atomic_xchg(counter_ptr, 0)


@triton.jit(do_not_specialize=SAMPLE_COUNTS)
def _bn_stats_partial_kernel(
    x_ptr,             # [N, C, H, W] conv output, NCHW or channels_last
    part_ptr,          # [2, P, C] scratch: (mean, M2) of each program's partial
    counter_ptr,       # [channel blocks + 1 (+ sample chunks x channel blocks: POOL)] int32,
                       # zero; left zero
    weight_ptr,        # [C] gamma (has_weight)
    bias_ptr,          # [C] beta (has_bias)
    running_mean_ptr,  # [C] updated in place (update_running), any float dtype
    running_var_ptr,   # [C] updated in place (update_running)
    nbt_ptr,           # num_batches_tracked (cumulative or count)
    out_ptr,           # out: [4, C] (mean, rstd, scale, shift), or [3, C] (count, mean, M2)
    pool_part_ptr,     # [N, S, C] scratch: per-sample sums over each position block (POOL)
    pooled_ptr,        # [N, C] out: mean over H*W per (sample, channel) (POOL)
    N, C, HW_Q, P,   # HW_Q = H*W / HW_VEC
    N_PER_PROG,        # samples per program along the partial axis
    momentum,          # running-stat factor when not cumulative, as fp32 hi + lo
    momentum_lo,
    eps,
    has_weight,
    has_bias,
    update_running,
    cumulative,        # momentum=None: factor 1/num_batches_tracked, read on the device
    count,             # count the batch in num_batches_tracked
    write_moments,     # bn_moments: store (count, mean, M2), nothing else
    HW_VEC: tl.constexpr,      # a power of two dividing H*W, so NCHW rows load as vectors
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_P: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    ACC_DTYPE: tl.constexpr,   # fp32, or fp64 for fp64 storage
    POOL: tl.constexpr,        # also the per-(sample, channel) means (a store in the loop)
):
    HW = HW_Q * HW_VEC  # H*W, with the factor the compiler can see (JIT hints stop at 16)
    n_start, c0, s0, c, s, valid, offs = program_tile(C, HW, N_PER_PROG, BLOCK_C, BLOCK_HW,
                                                      CHANNELS_LAST)
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    cmask = c < C
    n_here = tl.minimum(N - n_start, N_PER_PROG)

    # Accumulate x - pivot, the pivot one value of the channel: with |mean| >> std the
    # Welford mean would otherwise round at ulp(mean) on every step.
    if CHANNELS_LAST:
        pivot_offs = s0 * C + c
    else:
        pivot_offs = c * HW + s0
    pivot = tl.load(sample_base(x_ptr, n_start, C, HW) + pivot_offs, mask=cmask, other=0.0)
    pivot = pivot.to(ACC_DTYPE)[:, None]
    mean = tl.zeros([BLOCK_C, BLOCK_HW], ACC_DTYPE)
    m2 = tl.zeros([BLOCK_C, BLOCK_HW], ACC_DTYPE)
    num_s_blocks = tl.cdiv(HW, BLOCK_HW)
    # this program's row of the [N, S, C] pooling partials for its first sample (POOL)
    pool_base = pool_part_ptr + ((tl.cast(n_start, tl.int64) * num_s_blocks
                                  + pid_p % num_s_blocks) * C + c)
    for i in tl.range(0, n_here, num_stages=NUM_STAGES):
        xr = load_tile(x_ptr, n_start + i, offs, valid, C, HW).to(ACC_DTYPE)
        if POOL:  # this sample's sum over the tile's positions (masked lanes loaded as 0)
            tl.store(pool_base + tl.cast(i, tl.int64) * (num_s_blocks * C), tl.sum(xr, axis=1),
                     mask=cmask)
        x = xr - pivot
        mean, m2 = welford_update(mean, m2, x, 1.0 / tl.cast(i + 1, ACC_DTYPE))

    # Every valid lane saw the same number of samples, so the lanes of a channel merge
    # exactly: mean of means, and M2 = sum M2_l + k * sum (mean_l - mean)^2.
    k = n_here.to(ACC_DTYPE)
    lanes = tl.minimum(HW - s0, BLOCK_HW).to(ACC_DTYPE)
    tile_mean = tl.sum(tl.where(valid, mean, 0.0), axis=1) / lanes
    dev = tl.where(valid, mean - tile_mean[:, None], 0.0)
    tile_m2 = tl.sum(tl.where(valid, m2, 0.0), axis=1) + k * tl.sum(dev * dev, axis=1)
    tile_mean += tl.sum(pivot, axis=1)
    tl.store(part_ptr + pid_p * C + c, tile_mean, mask=cmask)
    tl.store(part_ptr + (P + pid_p) * C + c, tile_m2, mask=cmask)

    # Publish the partial (every thread's stores, then one release), take a ticket.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + pid_c, 1, sem="acq_rel")
    if POOL:
        # The last of the S programs of this (sample chunk, channel block) adds up its
        # samples' position-block sums; its counters follow the channel blocks' and nbt's.
        group = tl.num_programs(1) + 1 + (pid_p // num_s_blocks) * tl.num_programs(1) + pid_c
        if group_ticket(counter_ptr, group, num_s_blocks):
            for i in tl.range(0, n_here):
                sum_partials(pool_part_ptr, pooled_ptr, n_start + i, num_s_blocks, C, c, cmask,
                             tl.cast(HW, ACC_DTYPE), BLOCK_P, BLOCK_C, ACC_DTYPE)
    if ticket == P - 1:
        # The last program of this channel block: merge the P partials in index order.
        # A partial's count follows from its index: samples in its chunk x positions.
        n_acc = tl.zeros([BLOCK_C], ACC_DTYPE)
        mean_acc = tl.zeros([BLOCK_C], ACC_DTYPE)
        m2_acc = tl.zeros([BLOCK_C], ACC_DTYPE)
        for p0 in tl.range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pmask = p < P
            m = pmask[:, None] & cmask[None, :]
            k_p = tl.minimum(N - (p // num_s_blocks) * N_PER_PROG, N_PER_PROG)
            lanes_p = tl.minimum(HW - (p % num_s_blocks) * BLOCK_HW, BLOCK_HW)
            cnt = tl.where(pmask, k_p.to(ACC_DTYPE) * lanes_p.to(ACC_DTYPE), 0.0)
            rows = p[:, None] * C + c[None, :]
            # .cg: read what the other SMs wrote from L2, never a stale L1 line
            pm = tl.load(part_ptr + rows, mask=m, other=0.0, cache_modifier=".cg")
            pq = tl.load(part_ptr + P * C + rows, mask=m, other=0.0, cache_modifier=".cg")
            n_acc, mean_acc, m2_acc = _merge_chunk(n_acc, mean_acc, m2_acc, cnt, pm, pq, m)
        tl.atomic_xchg(counter_ptr + pid_c, 0)
        if write_moments != 0:
            tl.store(out_ptr + c, n_acc, mask=cmask)
            tl.store(out_ptr + C + c, mean_acc, mask=cmask)
            tl.store(out_ptr + 2 * C + c, m2_acc, mask=cmask)
        else:
            _normalise_and_update(c, cmask, n_acc, mean_acc, m2_acc, weight_ptr, bias_ptr,
                                  running_mean_ptr, running_var_ptr, nbt_ptr, out_ptr, C,
                                  momentum, momentum_lo, eps, has_weight, has_bias,
                                  update_running, cumulative, ACC_DTYPE)
            count_batch(counter_ptr + tl.num_programs(1), tl.num_programs(1), nbt_ptr, count)


@triton.jit
def _merge_chunk(n_acc, mean_acc, m2_acc, cnt, pm, pq, m):
    """Merge a [BLOCK_P, BLOCK_C] chunk of (count, mean, M2) summaries exactly (mean first,
    then deviations from it), then into the running summary with Chan's formula. A chunk
    of empty summaries (empty ranks' moments) adds nothing: 0/0 stays out."""
    n_b = tl.sum(cnt, axis=0)
    mean_b = tl.sum(cnt[:, None] * pm, axis=0) / tl.maximum(n_b, 1.0)
    d = tl.where(m, pm - mean_b[None, :], 0.0)
    m2_b = tl.sum(pq, axis=0) + tl.sum(cnt[:, None] * d * d, axis=0)
    return chan_combine(n_acc, mean_acc, m2_acc, n_b + tl.zeros_like(n_acc), mean_b, m2_b)


@triton.jit(do_not_specialize=("R",))
def _bn_stats_finalize_kernel(
    moments_ptr,       # [R, 3, C] every rank's (count, mean, M2)
    counter_ptr,       # [1] int32, zero; left zero
    weight_ptr,        # [C] gamma (has_weight)
    bias_ptr,          # [C] beta (has_bias)
    running_mean_ptr,  # [C] updated in place (update_running)
    running_var_ptr,   # [C] updated in place (update_running)
    nbt_ptr,           # num_batches_tracked (cumulative or count)
    out_ptr,           # [4, C] out: mean, rstd, scale, shift
    R, C,
    momentum,
    momentum_lo,
    eps,
    has_weight,
    has_bias,
    update_running,
    cumulative,
    count,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    n_acc = tl.zeros([BLOCK_C], ACC_DTYPE)
    mean_acc = tl.zeros([BLOCK_C], ACC_DTYPE)
    m2_acc = tl.zeros([BLOCK_C], ACC_DTYPE)
    for p0 in tl.range(0, R, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < R
        m = pmask[:, None] & cmask[None, :]
        rows = p[:, None] * (3 * C) + c[None, :]
        # every channel of a rank has the same count: read it from channel 0
        cnt = tl.load(moments_ptr + p * (3 * C), mask=pmask, other=0.0).to(ACC_DTYPE)
        pm = tl.load(moments_ptr + C + rows, mask=m, other=0.0).to(ACC_DTYPE)
        pq = tl.load(moments_ptr + 2 * C + rows, mask=m, other=0.0).to(ACC_DTYPE)
        n_acc, mean_acc, m2_acc = _merge_chunk(n_acc, mean_acc, m2_acc, cnt, pm, pq, m)
    _normalise_and_update(c, cmask, n_acc, mean_acc, m2_acc, weight_ptr, bias_ptr,
                          running_mean_ptr, running_var_ptr, nbt_ptr, out_ptr, C, momentum,
                          momentum_lo, eps, has_weight, has_bias, update_running, cumulative,
                          ACC_DTYPE)
    count_batch(counter_ptr, tl.num_programs(0), nbt_ptr, count)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _running_args(x_dev, weight, bias, running_mean, running_var, num_batches_tracked,
                  momentum, eps, out):
    """The BN-parameter arguments shared by both kernels, stand-ins where absent."""
    update = running_mean is not None
    count = update and num_batches_tracked is not None
    cumulative = update and momentum is None
    param = weight if weight is not None else (running_mean if update else
                                               bias if bias is not None else out)
    nbt = num_batches_tracked if count else scratch(x_dev, torch.int64)
    return ((weight if weight is not None else param, bias if bias is not None else param,
             running_mean if update else param, running_var if update else param, nbt, out),
            (*hi_lo(0.0 if momentum is None else float(momentum)), float(eps),
             int(weight is not None), int(bias is not None), int(update), int(cumulative),
             int(count)))


def _empty_batch_stats(x: Tensor, num_batches_tracked, update: bool) -> Tensor:
    """bn_stats of an empty batch, as PyTorch: statistics untouched, the batch counted."""
    if update and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    out = torch.zeros((4, x.shape[1]), device=x.device, dtype=stats_dtype(x))
    out[1] = 1.0
    return out


class BoundStats:
    """One launch of the statistics kernel with its decisions and every tensor that stays
    put bound once (tile, grid, flags, the BN's parameters and running statistics, the
    stand-ins): a call allocates its outputs and partials and launches. The launchers
    below bind one per call; a cached block plan keeps one per call site
    (fusedres.ops.bind_bn_stats).

    ``moments``: store the merged (count, mean, M2), [3, C] (bn_moments, bn_pool), instead
    of (mean, rstd, scale, shift), [4, C]. ``pool``: also the [N, C] means over H*W."""

    def __init__(self, x: Tensor, weight, bias, running_mean, running_var,
                 num_batches_tracked, momentum, eps: float, moments: bool = False,
                 pool: bool = False):
        N, C, HW = shape3(x)
        cl = is_channels_last(x)
        self.shape, self.stride, self.dtype = x.shape, x.stride(), x.dtype
        dev = self.device = x.device
        self.sdt = sdt = stats_dtype(x)
        self.rows, self.N, self.C = (3 if moments else 4), N, C
        cfg = tile_config(N, C, HW, cl, "stats", num_sms(dev), config.INTERPRET_TILES,
                          x.element_size())
        self.P = P = cfg.grid[0]
        n_counters = cfg.grid[1] + 1
        self.S = None
        if pool:
            self.S = -(-HW // cfg.BLOCK_HW)
            n_counters += P // self.S * cfg.grid[1]
        self.tickets = Tickets(dev, n_counters)
        self.part = Workspace("partials", dev, (2, self.P, C), sdt)
        self.pool_part = Workspace("pool partials", dev, (N, self.S, C), sdt) if pool else None
        # the output is a stand-in where a parameter is absent: mark where it goes
        out0 = torch.empty((self.rows, C), device=dev, dtype=sdt)
        self.out_like = template(dev, (self.rows, C), sdt)
        bn_args, flags = _running_args(dev, weight, bias, running_mean, running_var,
                                       num_batches_tracked, momentum, eps, out0)
        self.out_at = [k for k, a in enumerate(bn_args) if a is out0]
        self.bn_args = [None if a is out0 else a for a in bn_args]
        self.scalars = (N, C, HW // cfg.HW_VEC, P, cfg.N_PER_PROG, *flags, int(moments))
        self.launch = bind_launch(
            _bn_stats_partial_kernel, cfg.grid, HW_VEC=cfg.HW_VEC, CHANNELS_LAST=cl,
            BLOCK_C=cfg.BLOCK_C, BLOCK_HW=cfg.BLOCK_HW, BLOCK_P=cfg.BLOCK_P,
            NUM_STAGES=cfg.num_stages, ACC_DTYPE=acc_dtype(x), POOL=pool,
            num_warps=cfg.num_warps)

    def fits(self, x: Tensor) -> bool:
        """x as this binding was made for (a cached plan's guard)."""
        return x.shape == self.shape and x.stride() == self.stride and x.dtype == self.dtype

    def call_if_fits(self, x: Tensor) -> Optional[Tensor]:
        """``__call__(x)[0]`` of a binding without ``pool``, with ``fits`` in it: None where
        x does not fit. A cached block's forward calls this once per BN (each layer of
        calls cost host time: bench/bench_host.py)."""
        if not (self.S is None and x.shape == self.shape and x.stride() == self.stride
                and x.dtype == self.dtype):
            return None
        out = torch.empty_like(self.out_like)
        bn = self.bn_args.copy()
        for k in self.out_at:
            bn[k] = out
        part = self.part.get()
        self.launch(x, part, self.tickets.get(), *bn, part, part, *self.scalars)
        return out

    def __call__(self, x: Tensor):
        """The [rows, C] output, and with ``pool`` the [N, C] means: (out, pooled)."""
        out = torch.empty_like(self.out_like)
        bn = self.bn_args.copy()
        for k in self.out_at:
            bn[k] = out
        part = self.part.get()
        if self.S is not None:
            pool_part = self.pool_part.get()
            pooled = torch.empty((self.N, self.C), device=self.device, dtype=self.sdt)
        else:
            pool_part = pooled = part  # stand-ins, never touched
        self.launch(x, part, self.tickets.get(), *bn, pool_part, pooled, *self.scalars)
        return out, (pooled if self.S is not None else None)


def bn_stats(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             running_mean: Optional[Tensor], running_var: Optional[Tensor],
             num_batches_tracked: Optional[Tensor], momentum: Optional[float],
             eps: float) -> Tensor:
    """Batch statistics of x per channel, one launch; updates the running statistics and
    counts the batch in num_batches_tracked when running_mean is given.

    Returns one [4, C] tensor, rows (mean, rstd, scale, shift), fp32 (fp64 for fp64 x)."""
    if x.numel() == 0:
        return _empty_batch_stats(x, num_batches_tracked, running_mean is not None)
    x = in_layout(x, is_channels_last(x))
    return BoundStats(x, weight, bias, running_mean, running_var, num_batches_tracked,
                      momentum, eps)(x)[0]


def bn_moments(x: Tensor) -> Tensor:
    """This process's (count, mean, M2) per channel as [3, C], for the ranks to exchange
    under synchronised batch norm; zeros for an empty x. See fusedres.reference."""
    C = x.shape[1]
    if x.numel() == 0:
        return torch.zeros((3, C), device=x.device, dtype=stats_dtype(x))
    x = in_layout(x, is_channels_last(x))
    return BoundStats(x, None, None, None, None, None, 0.0, 1.0, moments=True)(x)[0]


def bn_stats_from_moments(moments: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                          eps: float) -> Tensor:
    """bn_stats of the union of R batches from their bn_moments stacked as [R, 3, C];
    one launch. Returns [4, C] (mean, rstd, scale, shift)."""
    R, _, C = moments.shape
    moments = moments.contiguous()
    dev = moments.device
    out = torch.empty((4, C), device=dev, dtype=moments.dtype)
    bn_args, flags = _running_args(dev, weight, bias, running_mean, running_var,
                                   num_batches_tracked, momentum, eps, out)
    block_p, block_c, grid = finalize_config(C, R, config.INTERPRET_TILES)
    launch(_bn_stats_finalize_kernel, grid, moments, counters(dev, 1), *bn_args, R, C, *flags,
           BLOCK_P=block_p, BLOCK_C=block_c, ACC_DTYPE=acc_dtype(moments),
           num_warps=NUM_WARPS)
    return out


def bn_stats_pool(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                  eps: float):
    """bn_stats (the same [4, C] result and running-statistics update, bit for bit) and
    the mean over H*W of x per (sample, channel), [N, C], from the same launch."""
    N, C = x.shape[:2]
    sdt = stats_dtype(x)
    if x.numel() == 0:
        return (_empty_batch_stats(x, num_batches_tracked, running_mean is not None),
                torch.zeros((N, C), device=x.device, dtype=sdt))
    x = in_layout(x, is_channels_last(x))
    return BoundStats(x, weight, bias, running_mean, running_var, num_batches_tracked,
                      momentum, eps, pool=True)(x)


def bn_pool(x: Tensor) -> Tensor:
    """The mean over H*W of x per (sample, channel), [N, C] (eval's one pooling read): the
    statistics kernel with POOL, its moments thrown away; zeros where H*W is 0."""
    N, C = x.shape[:2]
    sdt = stats_dtype(x)
    if x.numel() == 0:
        return torch.zeros((N, C), device=x.device, dtype=sdt)
    x = in_layout(x, is_channels_last(x))
    return BoundStats(x, None, None, None, None, None, 0.0, 1.0, moments=True, pool=True)(x)[1]
