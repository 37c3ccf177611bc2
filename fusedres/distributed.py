"""Synchronised batch norm: what the ranks exchange, and when.

A block synchronises its batch norms over a torch.distributed process group, exactly as
``nn.SyncBatchNorm`` does (NCCL on GPUs, gloo on CPUs too):

* forward, per BN that normalises with batch statistics in training mode: each rank's
  (count, mean, M2) per channel (``bn_moments``, [3, C]) -> one all_gather -> Chan's merge
  of the R rows (``bn_stats_from_moments``). Every rank then normalises with the statistics
  of the whole batch and updates its running statistics with the whole batch's unbiased
  variance; ranks may hold different batch sizes, an empty one included.
* backward, per such BN: each rank's sums (sum g, sum g*xhat; ``bn_act_bwd_reduce``) -> one
  all_reduce (one for both BNs of a projection block, whose sums come out of one pass) ->
  divided by the global count -> the elementwise pass (``bn_act_bwd_apply``).
  The gradients of gamma and beta stay this rank's own, as nn.SyncBatchNorm's do:
  DistributedDataParallel reduces parameter gradients.

No collective runs in eval mode, with a world size of 1, or without an initialised
torch.distributed; the block is then exactly the unsynchronised one.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn


def is_initialised() -> bool:
    """torch.distributed is available and initialised in this process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()



def is_sync_norm(norm: Optional[nn.Module]) -> bool:
    """An nn.SyncBatchNorm, or fusedres's FusedSyncBatchNorm (which convert() makes of one)."""
    return isinstance(norm, nn.SyncBatchNorm) or getattr(type(norm), "_fusedres_sync", False)


def sync_problem(norms: Sequence[Optional[nn.Module]]) -> Optional[str]:
    """Why these norms of one block cannot synchronise together, or None: they must be all
    nn.SyncBatchNorm with one process group, or none of them. (The last conv's BN and the
    shortcut's share one reduction, and half a synchronised block is almost certainly a
    mistake.)"""
    present = [n for n in norms if n is not None]
    synced = [is_sync_norm(n) for n in present]
    if any(synced) and not all(synced):
        kinds = ", ".join(type(n).__name__ for n in present)
        return f"its norms must all be nn.SyncBatchNorm or none of them, got {kinds}"
    if any(synced) and len({id(n.process_group) for n in present}) > 1:
        return "its SyncBatchNorm layers name different process groups"
    return None


def block_group(norms: Sequence[Optional[nn.Module]], process_group=None):
    """The process group the norms synchronise over, or None for none.

    ``process_group`` given: that one, for every norm. Otherwise the norms' own: norms
    that are nn.SyncBatchNorm synchronise over their group (None = the default group, as
    nn.SyncBatchNorm reads it); others do not. ValueError where sync_problem finds one."""
    if process_group is not None:
        return process_group if is_initialised() else None
    problem = sync_problem(norms)
    if problem is not None:
        raise ValueError(f"a block's norms cannot synchronise together: {problem}")
    present = [n for n in norms if n is not None]
    if not present or not is_sync_norm(present[0]) or not is_initialised():
        return None
    return present[0].process_group or torch.distributed.group.WORLD


def world_size(group) -> int:
    """Ranks in ``group``; 1 when there is nothing to synchronise over, including on a rank
    outside the group (where torch.distributed says -1 and nn.SyncBatchNorm runs plain)."""
    return 1 if group is None else max(torch.distributed.get_world_size(group), 1)


def gather_moments(moments: Tensor, group) -> Tensor:
    """All ranks' [3, C] moments as [R, 3, C] (one all_gather)."""
    R = torch.distributed.get_world_size(group)
    moments = moments.contiguous()
    if "nccl" in torch.distributed.get_backend(group):  # straight into one tensor
        single = getattr(torch.distributed, "all_gather_single", None)  # torch >= 2.14's name
        single = single or torch.distributed.all_gather_into_tensor
        out = moments.new_empty((R * moments.shape[0], moments.shape[1]))
        single(out, moments, group=group)
        return out.view(R, *moments.shape)
    # gloo (named "gloo", "cpu:gloo", or "undefined" when the backend was left to torch)
    # takes the list form on every device
    parts = [torch.empty_like(moments) for _ in range(R)]
    torch.distributed.all_gather(parts, moments, group=group)
    return torch.stack(parts)


def global_count(gathered: Tensor) -> Tensor:
    """Values per channel over all ranks, a [1] tensor on the device (no host sync)."""
    return gathered[:, 0, :1].sum(0)


def mean_sums(sums: Tensor, counts: Sequence[Optional[Tensor]], local_count: int,
              group) -> Tensor:
    """The backward's per-channel means: ``sums`` ([2 per BN, C], this rank's) summed over
    the ranks for each BN whose global count is given (one all_reduce for the block's
    call), and divided by that count; a BN with None in ``counts`` uses this rank's alone."""
    pairs = [sums[2 * i: 2 * i + 2] for i in range(len(counts))]
    synced = [i for i, c in enumerate(counts) if c is not None]
    if synced:
        total = torch.cat([pairs[i] for i in synced]).contiguous()
        torch.distributed.all_reduce(total, group=group)
        for j, i in enumerate(synced):
            pairs[i] = total[2 * j: 2 * j + 2]
    out = [p / (c if c is not None else max(local_count, 1)) for p, c in zip(pairs, counts)]
    return torch.cat(out)
