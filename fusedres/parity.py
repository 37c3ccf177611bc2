"""Where the fused kernels cannot follow autograd, PyTorch's own path.

The fused autograd Functions have neither a ``jvp`` nor a vmap rule, and their kernels
read raw storage, which a BatchedTensor has none of. So under forward-mode AD
(torch.autograd.forward_ad, torch.func.jvp, gradcheck's check_forward_ad) and under any
torch.func transform (vmap, jacrev, grad...) a fused entry point runs the block as its
plain modules would (``composite_block``, ``composite_batch_norm``): the same ops
nn.BatchNorm2d, nn.Conv2d and the ReLU and add take, so the results, and the errors where
PyTorch raises, are PyTorch's. ``needs_composite`` decides, in a few hundred ns.

The backward has two more cases (``fused_backward``): a batched grad_output (gradcheck's
check_batched_grad vmaps the backward of a graph built outside vmap) recomputes the
gradient through the same composite math from what the forward saved; and
``create_graph=True`` marks the gradients so that differentiating them again raises a
clear error (the fused backward is once-differentiable), where torch's
``once_differentiable`` would, for a grad_output that does not require grad, silently
return gradients with no graph at all.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.autograd.forward_ad as _fwad
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed

_maybe_level = torch._C._functorch.maybe_current_level
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor
_is_compiling = torch.compiler.is_compiling
_BatchNorm = nn.modules.batchnorm._BatchNorm


def needs_composite() -> bool:
    """This call runs under forward-mode AD or a torch.func transform (the fused
    Functions support neither): take PyTorch's own path. False while torch.compile traces
    (it sees the fused ops, not these transforms)."""
    return (_fwad._current_level >= 0 or _maybe_level() is not None) and not _is_compiling()


# --------------------------------------------------------------------------------------
# The forward, as the plain modules compute it
# --------------------------------------------------------------------------------------


def leave_count_on_error(norm: nn.Module, forward, x: Tensor) -> Tensor:
    """``forward(norm, x)``; if it raises after counting the batch in
    ``num_batches_tracked`` (nn.BatchNorm2d counts first, then checks), uncount it: a
    failed call changes nothing, the project's rule."""
    nbt = norm.__dict__.get("_buffers", {}).get("num_batches_tracked")
    version = None if nbt is None or nbt.is_inference() else nbt._version
    try:
        return forward(norm, x)
    except BaseException:
        if version is not None and nbt._version != version:
            with torch.no_grad():
                nbt.sub_(1)
        raise


def _norm(norm: nn.Module, z: Tensor) -> Tensor:
    """norm(z) as nn.BatchNorm2d computes it (for its subclasses too: FusedSyncBatchNorm
    with one rank, timm's BatchNormAct2d without its act, as the fused block reads it)."""
    if isinstance(norm, _BatchNorm):
        return leave_count_on_error(norm, _BatchNorm.forward, z)
    return norm(z)  # torchvision's FrozenBatchNorm2d


def composite_batch_norm(x: Tensor, norm: nn.Module) -> Tensor:
    """What fused_batch_norm computes, through PyTorch's own batch norm."""
    return _norm(norm, x)


def composite_block(x: Tensor, convs: Sequence[nn.Conv2d], norms: Sequence[nn.Module],
                    downsample: Optional[tuple], preact: bool, factor: Optional[Tensor],
                    skip: bool, process_group=None, aa: Optional[tuple] = None,
                    gate: Optional[nn.Module] = None) -> Tensor:
    """What fused_residual_block computes (same arguments), through the plain modules;
    ``aa`` (i, module): the anti-aliasing module after inner activation i; ``gate``: the
    SE/ECA module on the last BN's output."""
    dnorm = downsample[2] if downsample is not None else None
    group = distributed.block_group([*norms, dnorm], process_group)
    if distributed.world_size(group) > 1 and any(getattr(n, "training", False) for n in norms):
        # nn.SyncBatchNorm's synchronised path has no jvp nor vmap rule either
        raise RuntimeError("forward-mode AD and torch.func transforms cannot run through a "
                           "block whose batch norms synchronise over processes")
    k = len(convs)
    if preact:
        p = F.relu(_norm(norms[0], x))
        h = p
        for i in range(k):
            h = convs[i](h)
            if i < k - 1:
                h = F.relu(_norm(norms[i + 1], h))
    else:
        h = x
        for i in range(k):
            h = _norm(norms[i], convs[i](h))
            if i < k - 1:
                h = F.relu(h)
                if aa is not None and aa[0] == i:
                    h = aa[1](h)
        if gate is not None:
            h = gate(h)
    if factor is not None:
        h = h * factor.to(h.dtype).view(-1, 1, 1, 1)
    if downsample is not None:
        pool, conv, dn = downsample
        s = p if preact else x
        if pool:
            s = F.avg_pool2d(s, pool, pool, 0, ceil_mode=True, count_include_pad=False)
        s = conv(s)
        if dn is not None:
            s = _norm(dn, s)
    else:
        s = x if skip else None
    if s is None:
        return h if preact else F.relu(h)
    if preact:
        return h + s
    # torchvision adds in place: under autocast the sum stays in the branch's dtype
    return F.relu(h + s.to(h.dtype))


# --------------------------------------------------------------------------------------
# The backward
# --------------------------------------------------------------------------------------


def _batched(grads) -> bool:
    """A grad_output under vmap: torch.func's, or the legacy one gradcheck's
    check_batched_grad uses (torch._vmap_internals)."""
    g = grads[0]  # the fused Functions have one output, so one grad_output
    return _maybe_level() is not None or (g is not None and _is_legacy_batched(g))


def _once_differentiable_error(message: str, outputs, anchors):
    """``outputs`` (a backward's gradients, computed without a graph) marked so that
    differentiating them again raises ``message``, as torch's once_differentiable marks
    them, but also when no grad_output requires grad. The mark hangs on ``anchors`` (the
    Function's differentiable inputs) too, so that a gradient taken with respect to any of
    them reaches it and raises instead of returning None or zeros."""
    outs = outputs if isinstance(outputs, tuple) else (outputs,)
    err = torch._C._functions.DelayedError(message.encode(), len(outs) + len(anchors))

    def fake_requires_grad(v):
        if v is not None:
            v = v.detach()
            v.requires_grad = True
        return v

    marked = err(*[fake_requires_grad(v) for v in outs], *anchors)
    marked = marked if isinstance(marked, tuple) else (marked,)
    return tuple(marked[:len(outs)]) if isinstance(outputs, tuple) else marked[0]


def _anchors(ctx) -> list:
    """The Function's inputs that require grad, as far as the backward can see them: its
    saved tensors, and the tensors the forward kept in ``ctx.tensors``."""
    seen = [*ctx.saved_tensors, *getattr(ctx, "tensors", ())]
    return [t for t in seen if isinstance(t, Tensor) and t.requires_grad]


def fused_backward(describe, batched_backward):
    """torch's ``once_differentiable`` for the fused Functions' ``backward``, and more:
    a batched grad_output goes to ``batched_backward(ctx, *grads)`` (plain PyTorch ops,
    which vmap can batch); with ``create_graph=True`` the gradients come back marked so that
    differentiating them again raises an error naming ``describe(ctx)``."""
    def decorate(fn):
        @functools.wraps(fn)
        def backward(ctx, *grads):
            if _is_compiling():  # torch.compile traces this: the checks below are not traceable
                with torch.no_grad():
                    return fn(ctx, *grads)
            if _batched(grads):
                return batched_backward(ctx, *grads)
            if not torch.is_grad_enabled():  # the usual case: create_graph=False (the
                return fn(ctx, *grads)       # engine runs the backward without grad mode)
            with torch.no_grad():
                outputs = fn(ctx, *grads)
            return _once_differentiable_error(
                "trying to differentiate twice a function that was marked with "
                f"@once_differentiable: {describe(ctx)} is once-differentiable, its gradient "
                "cannot be differentiated again (create_graph=True: a gradient penalty, a "
                "Hessian, gradgradcheck). Run the plain PyTorch blocks for this: "
                "fusedres.revert(model)", outputs, _anchors(ctx))
        return backward
    return decorate


def _bn_math(z: Tensor, batch_stats: bool, eps: float, mean: Tensor, rstd: Tensor,
             gamma: Optional[Tensor], beta: Optional[Tensor]) -> Tensor:
    """bn(z) in the statistics' dtype, as the kernels compute it: batch statistics, or
    the (constant) mean and rstd the forward normalised with."""
    zs = z.to(mean.dtype)
    if batch_stats:
        y = F.batch_norm(zs, None, None, gamma, beta, True, 0.0, eps)
    else:
        y = (zs - mean.view(1, -1, 1, 1)) * rstd.view(1, -1, 1, 1)
        if gamma is not None:
            y = y * gamma.view(1, -1, 1, 1)
        if beta is not None:
            y = y + beta.view(1, -1, 1, 1)
    return y.to(z.dtype)


def _affine_leaves(stats, dtypes, needs):
    """gamma and beta of a BN, from what its forward saved (scale = gamma*rstd,
    shift = beta - mean*scale), as leaves that require grad where the input did."""
    mean, rstd, scale, shift = stats
    gamma = beta = None
    if dtypes[0] is not None:
        gamma = (scale / rstd).detach().requires_grad_(needs[0])
    if dtypes[1] is not None:
        beta = (shift + mean * scale).detach().requires_grad_(needs[1])
    return gamma, beta


def _grads(out: Tensor, dout: Tensor, leaves: list) -> list:
    """d(out)/d(leaf) for dout, None where a leaf is None or needs none."""
    want = [t for t in leaves if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, want, dout, allow_unused=True) if want else ())
    return [next(got) if t is not None and t.requires_grad else None for t in leaves]


def _leaf(t: Optional[Tensor], need: bool) -> Optional[Tensor]:
    return None if t is None else t.detach().requires_grad_(need)


def _refuse_sync(group) -> None:
    if group is not None:
        raise RuntimeError("batched gradients (vmap over the backward) cannot run through "
                           "batch norms that synchronise over processes")


def batch_norm_backward_batched(ctx, dy: Tensor):
    """FusedBatchNorm.backward for a batched dy, through plain PyTorch ops."""
    x, mean, rstd, scale, shift, _ = ctx.saved_tensors
    _refuse_sync(ctx.group)
    needs = ctx.needs_input_grad
    with torch.enable_grad():
        xl = _leaf(x, needs[2])
        gamma, beta = _affine_leaves((mean, rstd, scale, shift), ctx.dtypes, needs[3:5])
        y = _bn_math(xl, ctx.spec.batch_stats, ctx.spec.eps, mean, rstd, gamma, beta)
        dx, dg, db = _grads(y, dy, [xl, gamma, beta])
    cast = [g if g is None else g.to(dt) for g, dt in ((dg, ctx.dtypes[0]), (db, ctx.dtypes[1]))]
    return (None, None, dx, *cast, None, None, None)


def block_backward_batched(ctx, dout: Tensor):
    """FusedResidualBlock.backward for a batched dout: the block's forward recomputed in
    plain PyTorch from what the forward saved, and differentiated."""
    from .antialias import aa_forward
    from .function import _GAMMA, _BETA, Saved, _conv, _pool, slots
    from .gate import GateParams, gate_forward
    gl = ()
    spec = ctx.spec
    _refuse_sync(spec.group)
    k = len(spec.convs)
    x, factor, wd, filt, *rest = ctx.saved_tensors
    W, saved = rest[:k], Saved.unflat(spec, tuple(rest[k:]))
    sl = slots(k)
    needs = ctx.needs_input_grad[3:]
    dtypes = [None if t is None else t.dtype for t in ctx.tensors]
    with torch.enable_grad():
        xl = _leaf(x, ctx.needs_input_grad[1])
        Wl = [_leaf(W[i], needs[sl.w[i]]) for i in range(k)]
        wdl = _leaf(wd, needs[sl.wd])
        aff = [_affine_leaves(saved.bns[i].stats, (dtypes[sl.bn[i] + _GAMMA],
                                                   dtypes[sl.bn[i] + _BETA]),
                              (needs[sl.bn[i] + _GAMMA], needs[sl.bn[i] + _BETA]))
               for i in range(k)]

        def bn(i, z):
            s = saved.bns[i].stats
            return _bn_math(z, spec.bns[i].batch_stats, spec.bns[i].eps, s.mean, s.rstd, *aff[i])

        aff_d = (None, None)
        if spec.preact:
            p = F.relu(bn(0, xl))
            h = p
            for i in range(k):
                h = _conv(h, Wl[i], spec.convs[i])
                if i < k - 1:
                    h = F.relu(bn(i + 1, h))
        else:
            h = xl
            for i in range(k):
                h = bn(i, _conv(h, Wl[i], spec.convs[i]))
                if i < k - 1:
                    h = F.relu(h)
                    if spec.aa is not None and spec.aa.after == i:
                        h = aa_forward(h, spec.aa, filt)
            if spec.gate is not None:
                gl = GateParams(*(_leaf(t, needs[sl.gate + i])
                                  for i, t in enumerate(saved.gate.params)))
                sdt = saved.gate.m.dtype
                g = gate_forward(h.to(sdt).mean((2, 3)), spec.gate, gl)[0]
                h = h * g.to(h.dtype)[:, :, None, None]
        if factor is not None:
            h = h * factor.to(h.dtype).view(-1, 1, 1, 1)
        if spec.proj is not None:
            s = _conv(_pool(p if spec.preact else xl, spec.proj_pool), wdl, spec.proj)
            if not spec.preact:
                st = saved.bn_d.stats
                aff_d = _affine_leaves(st, (dtypes[sl.bnd + _GAMMA], dtypes[sl.bnd + _BETA]),
                                       (needs[sl.bnd + _GAMMA], needs[sl.bnd + _BETA]))
                s = _bn_math(s, spec.proj_bn.batch_stats, spec.proj_bn.eps, st.mean, st.rstd,
                             *aff_d)
        else:
            s = xl if spec.skip else None
        out = h if s is None else h + s.to(h.dtype)
        if not spec.preact:
            out = F.relu(out)
        leaves = [xl, *Wl, wdl, *(t for a in (*aff, aff_d) for t in a), *gl]
        got = _grads(out, dout, leaves)
    n_gate = len(gl)
    dx, gW, gwd = got[0], got[1:k + 1], got[k + 1]
    gaff, ggate = got[k + 2:len(got) - n_gate], got[len(got) - n_gate:]
    grads = [None] * sl.total
    for i in range(k):
        grads[sl.w[i]] = gW[i]
    grads[sl.wd] = gwd
    for j, start in enumerate((*sl.bn, sl.bnd)):
        for field, g in ((_GAMMA, gaff[2 * j]), (_BETA, gaff[2 * j + 1])):
            if g is not None:
                grads[start + field] = g.to(dtypes[start + field])
    for i, g in enumerate(ggate):
        if g is not None:
            grads[sl.gate + i] = g.to(dtypes[sl.gate + i])
    return (None, dx, None, *grads)


def describe_block(ctx) -> str:
    """The block a FusedResidualBlock node ran, in words (for its error messages)."""
    spec = ctx.spec
    kind = ("pre-activation " if spec.preact else "") + ("bottleneck" if len(spec.convs) == 3
                                                         else "basic")
    short = ("projection" if spec.proj is not None else "identity") if spec.skip else "no"
    # (the node's Function: FusedResidualBlock, or a cached plan's StraightResidualBlock)
    node = type(ctx).__name__
    fn = node.removesuffix("Backward") if node.endswith("Backward") else "FusedResidualBlock"
    return f"the fused {kind} block ({fn}, {short} shortcut)"


def describe_batch_norm(ctx) -> str:
    return "the fused batch norm (FusedBatchNorm, fused_batch_norm)"
