"""A batch norm on its own (the stem's), synchronised: what nn.SyncBatchNorm computes, on
the fused primitives, so that it also runs on CPU tensors (gloo).

    y = (x - mean) * rstd * gamma + beta        statistics over all ranks of the group

One autograd Function, FusedBatchNorm, and its checked entry point fused_batch_norm;
FusedSyncBatchNorm (modules.py) calls it in training mode with more than one rank.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import distributed, ops, parity
from .errors import ShapeError
from .function import BNSpec, _same_layout, bn_backward, normalise
from .plan import check_norm, read_norm, sync_specs
from .records import BNParams, BNStats, BwdArgs


class FusedBatchNorm(torch.autograd.Function):
    """``FusedBatchNorm.apply(spec, group, x, weight, bias, running_mean, running_var,
    num_batches_tracked)``: y = bn(x), statistics synchronised over ``group`` when
    ``spec.sync``. Prefer ``fused_batch_norm``."""

    @staticmethod
    def forward(ctx, spec: BNSpec, group, x: Tensor, *tensors):
        norm, count = normalise(x, BNParams(*tensors), spec, group)
        out = ops.run_bn_act_fwd(x, norm, None, None, None, False, False)
        ctx.spec, ctx.group = spec, group
        ctx.dtypes = [None if t is None else t.dtype for t in tensors[:2]]
        ctx.tensors = tensors  # for parity.fused_backward's error
        ctx.save_for_backward(x, *out.stats, count)
        return out.y

    @staticmethod
    @parity.fused_backward(parity.describe_batch_norm, parity.batch_norm_backward_batched)
    def backward(ctx, dy: Tensor):
        x, mean, rstd, scale, shift, count = ctx.saved_tensors
        need_params = any(ctx.needs_input_grad[3:5])
        args = BwdArgs(_same_layout(dy, x), x, BNStats(mean, rstd, scale, shift), None, 0,
                       None, 0, None, None, ctx.spec.batch_stats, False, None)
        dx = None
        if ctx.needs_input_grad[2]:
            out = bn_backward(ctx.group, (count,), args, need_params)
            dx, sums = out.dz, out.sums
        elif need_params:  # this rank's sums alone: no all_reduce, as nn.SyncBatchNorm
            sums = ops.run_bn_act_bwd_reduce(args)
        grads = [None] * 5
        for i, row in ((0, 1), (1, 0)):  # dgamma = sum g*xhat, dbeta = sum g: this rank's
            if ctx.dtypes[i] is not None and ctx.needs_input_grad[3 + i]:
                grads[i] = sums[row].to(ctx.dtypes[i])
        return (None, None, dx, *grads)


def fused_batch_norm(x: Tensor, norm: nn.Module, process_group=None) -> Tensor:
    """``norm(x)`` for a 4-D x through the fused primitives, its batch statistics in
    training mode synchronised over ``process_group`` (default: ``norm``'s own if it is an
    nn.SyncBatchNorm), as nn.SyncBatchNorm computes them but also on CPU tensors."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ShapeError("x", "be 4-D [N, C, H, W]", f"{x.dim()}-D with shape {tuple(x.shape)}")
    group = distributed.block_group([norm], process_group)
    spec, params = read_norm(norm)
    spec = sync_specs([spec], [norm], group)[0]
    if not spec.sync and parity.needs_composite():  # forward AD, vmap: PyTorch's own path
        return parity.composite_batch_norm(x, norm)
    check_norm("norm", params, x.shape[1], x, x.dtype, spec, tuple(x.shape))
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    return FusedBatchNorm.apply(spec, group if spec.sync else None, x, *params)
