"""Batch-norm arithmetic as small ``@triton.jit`` helpers.

Every kernel of fusedres is built from these, so the equations live in one place and a
later Triton convolution can call them in its prologue or epilogue.

Layout. A 4-D activation [N, C, H, W] is addressed as (n, c, s) with s = h*W + w and
HW = H*W. One program works on a tile of BLOCK_C channels x BLOCK_HW positions of one
sample at a time; ``CHANNELS_LAST`` picks which of the two tile axes is contiguous, so
both memory formats are read natively with 16-byte vector loads and no copies.
"""
import triton
import triton.language as tl


@triton.jit
def tile_offsets(c, s, C, HW, CHANNELS_LAST: tl.constexpr):
    """Element offsets of a [BLOCK_C, BLOCK_HW] tile inside one sample."""
    if CHANNELS_LAST:
        return s[None, :] * C + c[:, None]  # NHWC: channels contiguous
    else:
        return c[:, None] * HW + s[None, :]  # NCHW: positions contiguous


@triton.jit
def program_tile(C, HW, N_PER_PROG, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                 CHANNELS_LAST: tl.constexpr):
    """The tile of this program in the grid (position blocks x sample chunks, channel blocks):
    returns (first sample, first channel, first position, channels, positions, in-bounds
    mask, element offsets within a sample)."""
    pid_p = tl.program_id(0)
    num_s_blocks = tl.cdiv(HW, BLOCK_HW)
    s0 = (pid_p % num_s_blocks) * BLOCK_HW
    n_start = (pid_p // num_s_blocks) * N_PER_PROG
    c0 = tl.program_id(1) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    s = s0 + tl.arange(0, BLOCK_HW)
    valid = (c < C)[:, None] & (s < HW)[None, :]
    return n_start, c0, s0, c, s, valid, tile_offsets(c, s, C, HW, CHANNELS_LAST)


@triton.jit
def sample_base(ptr, n, C, HW):
    """Pointer to sample n; 64-bit because N*C*H*W can pass 2^31."""
    return ptr + tl.cast(n, tl.int64) * C * HW


@triton.jit
def load_tile(ptr, n, offs, mask, C, HW):
    """One activation tile of sample n. Every activation load of every kernel is this
    line, so the compile report finds their widths in the PTX by its line number."""
    return tl.load(sample_base(ptr, n, C, HW) + offs, mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, n, offs, value, mask, C, HW):
    """Store one activation tile of sample n (the only activation store, as load_tile)."""
    tl.store(sample_base(ptr, n, C, HW) + offs, value, mask=mask)


@triton.jit
def mask_sample_base(mask_ptr, n, C, HW, CHANNELS_LAST: tl.constexpr):
    """Pointer to sample n of a packed ReLU mask: bits run along the contiguous axis."""
    if CHANNELS_LAST:
        return mask_ptr + tl.cast(n, tl.int64) * HW * ((C + 7) // 8)
    else:
        return mask_ptr + tl.cast(n, tl.int64) * C * ((HW + 7) // 8)


@triton.jit
def relu(v):
    """ReLU that propagates NaN like torch.relu (maximum(v, 0) would drop it)."""
    return tl.where(v < 0, 0.0, v)


@triton.jit
def relu_grad(dy, keep):
    """where(mask, dy, 0): dy * mask would turn an inf gradient into NaN."""
    return tl.where(keep, dy, 0.0)


@triton.jit
def relu_keep(v):
    """Which elements pass a gradient through relu(v): torch's threshold_backward keeps
    every output that is not <= 0, NaN included."""
    return (v <= 0) == 0


@triton.jit
def bn_apply(z, scale, shift):
    """z*scale + shift with scale = gamma*rstd and shift = beta - mean*scale."""
    return z * scale + shift


@triton.jit
def welford_update(mean, m2, x, inv_k):
    """One Welford step per lane, inv_k = 1/(number of values seen, this one included)."""
    delta = x - mean
    mean = mean + delta * inv_k
    m2 = m2 + delta * (x - mean)
    return mean, m2


@triton.jit
def chan_combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s parallel combination of two (count, mean, M2) summaries.

    Never E[x^2] - E[x]^2: that loses every digit when |mean| >> std. Two empty summaries
    (an empty rank's moments) merge to an empty one, not to 0/0."""
    n_ab = n_a + n_b
    delta = mean_b - mean_a
    frac_b = n_b / tl.maximum(n_ab, 1.0)
    mean_ab = mean_a + delta * frac_b
    m2_ab = m2_a + m2_b + delta * delta * (n_a * frac_b)
    return n_ab, mean_ab, m2_ab


@triton.jit
def bn_grad_coefficients(scale, rstd, sum_g, sum_gx, inv_count):
    """Per-channel (b, k) of dz = scale*g - b - k*(z - mean) for batch statistics:
    dz = gamma*rstd * (g - mean(g) - xhat*mean(g*xhat)) with xhat = (z - mean)*rstd.
    Two vectors instead of four keeps the per-thread registers down."""
    return scale * (sum_g * inv_count), scale * rstd * (sum_gx * inv_count)


@triton.jit
def bn_input_grad(scale, g, z, mean, b, k, batch_stats):
    """dL/dz of y = xhat*gamma + beta, given g = dL/dy. With running statistics (eval) the
    normalisation is a constant affine map, dz = scale*g: selected, not computed with zero
    coefficients, since k*(z - mean) with k = 0 would turn an infinite z into NaN."""
    return tl.where(batch_stats, scale * g - b - k * (z - mean), scale * g)


@triton.jit
def pack_bits(keep, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Pack a [BLOCK_C, BLOCK_HW] boolean tile 8 to a byte along its contiguous axis."""
    weights = 1 << tl.arange(0, 8)
    if CHANNELS_LAST:
        b = tl.reshape(keep.to(tl.int32), [BLOCK_C // 8, 8, BLOCK_HW])
        return tl.sum(b * weights[None, :, None], axis=1).to(tl.uint8)
    else:
        b = tl.reshape(keep.to(tl.int32), [BLOCK_C, BLOCK_HW // 8, 8])
        return tl.sum(b * weights[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def unpack_bits(mask_base, c, s, C, HW, load_mask, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
                CHANNELS_LAST: tl.constexpr):
    """Read back the bits pack_bits stored for the tile (c, s) of one sample.

    Each lane loads its byte (neighbours share it, so the bytes move once) and picks its bit."""
    if CHANNELS_LAST:
        C8 = (C + 7) // 8
        byte = tl.load(mask_base + s[None, :] * C8 + (c // 8)[:, None], mask=load_mask, other=0)
        bit = (c % 8)[:, None]
    else:
        HW8 = (HW + 7) // 8
        byte = tl.load(mask_base + c[:, None] * HW8 + (s // 8)[None, :], mask=load_mask, other=0)
        bit = (s % 8)[None, :]
    return ((byte.to(tl.int32) >> bit) & 1) != 0


@triton.jit
def store_bits(mask_base, keep, c0, s0, C, HW, in_batch, BLOCK_C: tl.constexpr,
               BLOCK_HW: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Store the packed bits of the tile starting at channel c0, position s0 (both multiples
    of 8); nothing when the sample is past the batch (``in_batch`` false)."""
    packed = pack_bits(keep, BLOCK_C, BLOCK_HW, CHANNELS_LAST)
    if CHANNELS_LAST:
        C8 = (C + 7) // 8
        c8 = c0 // 8 + tl.arange(0, BLOCK_C // 8)
        s = s0 + tl.arange(0, BLOCK_HW)
        tl.store(mask_base + s[None, :] * C8 + c8[:, None], packed,
                 mask=(c8 < C8)[:, None] & (s < HW)[None, :] & in_batch)
    else:
        HW8 = (HW + 7) // 8
        c = c0 + tl.arange(0, BLOCK_C)
        s8 = s0 // 8 + tl.arange(0, BLOCK_HW // 8)
        tl.store(mask_base + c[:, None] * HW8 + s8[None, :], packed,
                 mask=(c < C)[:, None] & (s8 < HW8)[None, :] & in_batch)


@triton.jit
def branch_factor(factor_ptr, n, c, cmask, C, has_factor, PER_CHANNEL: tl.constexpr,
                  ACC_DTYPE: tl.constexpr):
    """The branch factor of sample n: factor[n] ([N], stochastic depth; a scalar), or
    factor[n, c] as [BLOCK_C, 1] (PER_CHANNEL, [N, C]: a squeeze-excite / ECA gate times
    the stochastic-depth factor); 1 without one (the load is predicated off)."""
    if PER_CHANNEL:
        f = tl.load(factor_ptr + n * C + c, mask=cmask & (has_factor != 0), other=1.0)
        return f.to(ACC_DTYPE)[:, None]
    else:
        return tl.load(factor_ptr + n, mask=has_factor != 0, other=1.0).to(ACC_DTYPE)


@triton.jit
def sum_partials(part_ptr, out_ptr, k, P, C, c, cmask, divisor, BLOCK_P: tl.constexpr,
                 BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """out[k, c] = (sum over p of part[k, p, c], p in order) / divisor, [BLOCK_P, BLOCK_C]
    partials at a time: the same bits every run, whatever order the programs finished in."""
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC_DTYPE)
    for p0 in tl.range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = (p < P)[:, None] & cmask[None, :]
        # .cg: read what the other SMs wrote from L2, never a stale L1 line
        acc += tl.load(part_ptr + (tl.cast(k, tl.int64) * P + p[:, None]) * C + c[None, :],
                       mask=m, other=0.0, cache_modifier=".cg")
    tl.store(out_ptr + tl.cast(k, tl.int64) * C + c, tl.sum(acc, axis=0) / divisor, mask=cmask)


@triton.jit
def group_ticket(counter_ptr, group, group_size):
    """Take a ticket on ``group``'s zeroed counter (after a barrier, so this program's
    partials are published); True for the last of its ``group_size`` programs, which
    resets the counter. Callers barrier before the first ticket of a program."""
    ticket = tl.atomic_add(counter_ptr + group, 1, sem="acq_rel")
    last = ticket == group_size - 1
    if last:
        tl.atomic_xchg(counter_ptr + group, 0)
    return last
