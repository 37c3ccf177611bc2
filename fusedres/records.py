"""The named records that pass between fusedres's layers.

The autograd Functions (function.py, batchnorm.py) call the fused primitives of a backend
(fusedres.kernels, fusedres.reference, fusedres.csrc) with these records; only the
torch.library boundary (ops.py) flattens them into positional tensors. Every backend
takes and returns exactly these:

    bn_stats(x, params, momentum, eps)                 -> BNStats     (training)
    bn_moments(x)                                      -> Tensor [3, C] (count, mean, M2)
    bn_stats_from_moments(moments, params, momentum, eps) -> BNStats  (moments [R, 3, C])
    bn_stats_pool(x, params, momentum, eps)            -> (BNStats, Tensor [N, C] mean_hw x)
    bn_pool(x)                                         -> Tensor [N, C] mean_hw x (eval)
    bn_act_fwd(z, norm, skip, skip_norm, factor, relu, write_mask) -> ActOut
    bn_act_bwd(args, need_sums)                        -> BwdOut  (args.du_add must be None)
    bn_act_bwd_reduce(args, per_sample)                -> Tensor [2 or 4, C] (the sums),
                                                          [2 or 4, N, C] when per_sample
    bn_act_bwd_apply(args, mean_sums)                  -> (dz, dskip)

``factor`` is [N] (stochastic depth) or [N, C] (a squeeze-excite / ECA gate, times the
stochastic-depth factor): the branch is multiplied by factor[n] or factor[n, c].

``bn_stats`` updates the running statistics, and counts the batch in
``num_batches_tracked``, when ``params.running_mean`` is not None; pass ``BNParams``
with the running fields None to leave them alone.

This module depends on nothing of fusedres, so every layer can import it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor


class BNParams(NamedTuple):
    """A batch norm's tensors as one call reads them; None where the norm has none (or
    where the call must not touch them: a BN in eval mode passes no num_batches_tracked)."""
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]


class BNStats(NamedTuple):
    """Per-channel [C] tensors in the statistics dtype (fp32, fp64 for fp64 storage) that
    normalise one BN's input: ``y = z*scale + shift`` and ``xhat = (z - mean)*rstd``."""
    mean: Tensor
    rstd: Tensor
    scale: Tensor   # gamma * rstd
    shift: Tensor   # beta - mean * scale


class Norm(NamedTuple):
    """How the forward epilogue normalises one BN's input.

    ``stats`` given: batch statistics from bn_stats (training). ``stats`` None: running
    statistics; the epilogue itself derives scale = weight*rsqrt(running_var + eps) and
    shift = bias - running_mean*scale from ``params`` (one launch, no other op) and returns
    the BNStats it used in ActOut, for the backward."""
    stats: Optional[BNStats]
    params: BNParams
    eps: float


class ActOut(NamedTuple):
    """What bn_act_fwd returns (a cached plan's bound epilogue, ops.bind_bn_act_fwd, gives
    None where this says empty, and stats None when bound without keep_stats)."""
    y: Tensor                      # act(f_n*(z*scale + shift) + skip), z's dtype and layout
    mask: Optional[Tensor]         # packed ReLU bits (layout.mask_shape), empty uint8 if not asked
    stats: Optional[BNStats]       # the statistics used: Norm.stats, or those derived in eval
    skip_stats: Optional[BNStats]  # the same for skip_norm (None without one)


class BwdArgs(NamedTuple):
    """The inputs of one BN's backward, shared by bn_act_bwd and its two halves (which
    synchronised batch norm runs with an all_reduce between)."""
    dy: Tensor                     # gradient of the epilogue's output
    z: Tensor                      # the tensor the BN normalised
    stats: BNStats                 # what it normalised with
    mask: Optional[Tensor]         # packed ReLU bits (mask_mode 2)
    mask_mode: int                 # 0 no ReLU, 1 recompute from z*scale + shift, 2 packed bits
    factor: Optional[Tensor]       # [N] or [N, C] branch factor (stochastic depth, gate)
    skip_mode: int                 # 0 none, 1 identity (dskip = g), 2 projection BN over zd
    zd: Optional[Tensor]           # projection conv output (skip_mode 2)
    stats_d: Optional[BNStats]     # the projection BN's statistics (skip_mode 2)
    batch_stats: bool              # the BN normalised with batch statistics
    batch_stats_d: bool            # the projection BN did
    dz_add: Optional[Tensor]       # a gradient to add to dz (pre-activation's identity skip)
    # [N, C] (statistics dtype) added to g_b before the BN backward, du = g_b + du_add[n, c]:
    # a gate's pooling gradient dp/HW. Only bn_act_bwd_apply reads it; None elsewhere.
    du_add: Optional[Tensor] = None


class BwdOut(NamedTuple):
    """What bn_act_bwd returns (a cached plan's bound backward, ops.bind_bn_act_bwd, gives
    None where this says empty)."""
    dz: Tensor
    dskip: Optional[Tensor]        # g (skip_mode 1), dzd (skip_mode 2), else empty
    sums: Optional[Tensor]         # [2 or 4, C]: (dbeta, dgamma[, dbeta_d, dgamma_d]), or empty
