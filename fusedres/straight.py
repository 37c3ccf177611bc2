"""The common blocks of a cached plan as straight-line code.

function.py's forward and backward serve every block: pre- and post-activation, gates,
anti-aliasing, recomputation, synchronised batch norm, unbound calls. Each BN call there
passes through a few layers of records and checks, and on a small block those layers
cost as much host time as the kernels' launches themselves (bench/bench_host.py). A
module's cached plan for the blocks ResNets are made of (torchvision's BasicBlock and
Bottleneck, timm's without a gate or aa, pre-activation blocks: identity, projection or
avg-down shortcut, every BN in one mode, no synchronisation, no recompute) runs here
instead: the same ATen convolutions and the same bound launches
(kernels.stats.BoundStats, kernels.epilogue.BoundFwd, kernels.backward.BoundBwd), called
directly, in the order function.py's _forward_post/_preact and _backward_post/_preact
call them, with the same saved state (FusedResidualBlock's flat layout, so that the
batched backward and the generic backward can read it), except that each BN's statistics
are saved as bn_stats's [4, C] rows, which the bindings read whole (no [C] views made per
call), and that a training call records its convolutions with autograd (as eager PyTorch
does) and its backward calls their nodes: the inner activations are then saved in those
nodes, not in the flat list (StraightBlock.saved_tensors puts them back for the other
backwards). With autograd the block runs as StraightResidualBlock, a Function of its own
whose tensor inputs are only the conv weights and BN gammas and betas (FusedResidualBlock
takes, and returns a gradient slot for, the whole flat list). ``program`` says whether a
plan runs here; anything it does not cover, or a call its bindings do not fit, takes
function.py's path.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor

from . import function as F  # (function imports this module too: read at call time)
from . import ops, parity
from .layout import memory_format
from .records import BNParams, BNStats, BwdArgs, Norm

_GAMMA, _BETA = BNParams._fields.index("weight"), BNParams._fields.index("bias")


def program(spec, x: Tensor, save: bool) -> Optional["StraightBlock"]:
    """The straight-line program of a cached plan's spec on x's backend (``save``: with
    autograd), made on first use; None where the plan is not one it covers."""
    sites = spec.sites
    if sites is None:
        return None
    impl = ops.backend_of(x)
    key = (impl, "straight", save)
    prog = sites.get(key)
    if prog is None:
        prog = sites[key] = (StraightBlock(spec, impl, save)
                             if impl is not None and covers(spec, impl, save) else False)
    return prog or None


def covers(spec, impl, save: bool) -> bool:
    """A block of two or more convolutions with a shortcut and no gate, aa, recompute or
    synchronised BN, on a backend with bound launches, every BN in training (with
    autograd) or in eval (without: the epilogue derives the statistics)."""
    if (len(spec.convs) < 2 or spec.gate is not None or spec.aa is not None or spec.recompute
            or not spec.skip or spec.group is not None or getattr(impl, "BoundBwd", None) is None):
        return False
    # (a pre-activation block's projection has no BN of its own)
    bns = [*spec.bns, *((spec.proj_bn,) if spec.proj is not None and not spec.preact else ())]
    if any(b is None or b.sync for b in bns):
        return False
    if save:
        return all(b.batch_stats for b in bns)
    return not any(b.batch_stats for b in bns)


class StraightBlock:
    """One cached plan's block call on one backend, bound as it first runs. ``forward``
    returns (out, the flat saved list or None); ``backward`` StraightResidualBlock's
    gradients (None, None, dx, None, one per ``param_slots``). A call a binding does not
    fit takes that op unbound, as the bindings of function.py's path do."""

    def __init__(self, spec, impl, save: bool):
        self.spec, self.impl, self.save = spec, impl, save
        self.k = k = len(spec.convs)
        self.sl = F.slots(k)
        self.stats: list = [None] * (k + 1)   # BoundStats per BN (the projection's last)
        self.fwd: list = [None] * k           # BoundFwd per epilogue
        self.bwd: list = [None] * k           # BoundBwd per BN backward
        self.proj = spec.proj is not None
        # the epilogue that takes the shortcut, the factor and the mask: the last BN's of
        # a post-activation block (a pre-activation block adds its shortcut with torch)
        self.tail = -1 if spec.preact else k - 1
        # where FusedResidualBlock.forward's saved list keeps what the backward reads:
        # (x, factor, wd, filt, *W) then Saved.flat(): zs, acts, mask, zd, xp, 5 per BN
        self.at_zs = 4 + k
        self.at_acts = self.at_zs + k
        self.at_mask = self.at_acts + (k if spec.preact else k - 1)
        # each BN's statistics in it, the projection BN's last: saved whole, the [4, C]
        # rows bn_stats made, in the mean slot (Saved.unflat reads either form)
        b0 = self.at_mask + 3
        self.at_stats = tuple(b0 + 5 * i for i in range(k + 1))
        self.get_stats = operator.itemgetter(*self.at_stats)  # (k + 1 >= 2: a tuple)
        self.no_gate = (None,) * len(F.SavedGate._fields)  # (no gate: covers)
        self.get_w = operator.itemgetter(*self.sl.w)  # (k >= 2 convs: a tuple)
        # the inner activations' slots (a pre-activation block's a0 among them), which
        # the recorded convolutions' nodes hold instead
        self.no_acts = (None,) * (k if spec.preact else k - 1)
        # The flat list's slots that can take a gradient (conv weights, BN gammas and
        # betas), in the order StraightResidualBlock takes them as inputs: the others
        # (running statistics, stand-ins, absent parts) travel in one list beside them.
        sl = self.sl
        slots = [*sl.w, *(j + o for j in sl.bn for o in (_GAMMA, _BETA))]
        if self.proj:
            slots.append(sl.wd)
            if not spec.preact:
                slots += [sl.bnd + _GAMMA, sl.bnd + _BETA]
        self.param_slots = tuple(slots)
        self.pick = operator.itemgetter(*slots)  # (at least 2k + k slots: a tuple)
        self._needs: dict = {}  # the Function's needs_input_grad -> needs per slot

    def apply(self, x: Tensor, factor: Optional[Tensor], tensors) -> Tensor:
        """The block call with autograd: StraightResidualBlock, given only the tensors
        that can take a gradient (the others in ``tensors``, the plan's flat list)."""
        return StraightResidualBlock.apply(self, tensors, x, factor, *self.pick(tensors))

    def needs_per_slot(self, needs_input_grad: tuple) -> tuple:
        """StraightResidualBlock's needs_input_grad as FusedResidualBlock's per flat slot
        (False where no gradient is taken), made once per pattern."""
        needs = self._needs.get(needs_input_grad)
        if needs is None:
            full = [False] * self.sl.total
            for at, need in zip(self.param_slots, needs_input_grad[4:]):
                full[at] = need
            needs = self._needs[needs_input_grad] = tuple(full)
        return needs

    def full_ctx(self, ctx) -> "_FullCtx":
        """ctx as FusedResidualBlock's general backward (and the batched one) reads it."""
        return _FullCtx(ctx.spec, ctx.tensors, self.saved_tensors(ctx.saved_tensors),
                        (False, ctx.needs_input_grad[2], False,
                         *self.needs_per_slot(ctx.needs_input_grad)))

    def compact(self, grads: tuple) -> tuple:
        """FusedResidualBlock's gradients (None, dx, None, *per slot) as
        StraightResidualBlock returns them."""
        return (None, None, grads[1], None, *self.pick(grads[3:]))

    # ---------------------------------------------------------------- forward

    def _params(self, i: int, tensors) -> BNParams:
        """BN i's tensors (i == k: the projection's) as the plan's flat list holds them."""
        j = self.sl.bnd if i == self.k else self.sl.bn[i]
        return BNParams(*tensors[j:j + 5])

    def _stats(self, i: int, z: Tensor, tensors, bs) -> Tensor:
        """BN i's batch statistics (and its running statistics updated) as bn_stats's
        [4, C] rows (mean, rstd, scale, shift), which the bindings below read whole:
        through its binding; the unbound op where z is not what a binding takes."""
        b = self.stats[i]
        if b is not None:
            out = b.call_if_fits(z)
            if out is not None:
                return out
        p = self._params(i, tensors)
        if not bs.update:
            p = BNParams(p.weight, p.bias, None, None, None)
        if b is not None or z.numel() == 0 or not ops._in_own_layout(z):
            return self.impl.bn_stats(z, *p, bs.momentum, bs.eps)
        b = self.stats[i] = self.impl.BoundStats(z, *p, bs.momentum, bs.eps)
        return b(z)[0]

    def forward(self, x: Tensor, factor: Optional[Tensor], tensors):
        if self.spec.preact:
            return self._forward_preact(x, factor, tensors)
        spec, k, sl = self.spec, self.k, self.sl
        save = train = self.save  # (a plan it covers trains exactly when it saves)
        zs, acts, stats = [], [], []
        conv = _conv_recorded if save else _conv
        h = x
        for i in range(k - 1):
            z = conv(h, tensors[sl.w[i]], spec.convs[i], i > 0 or x.requires_grad)
            if train:
                st = self._stats(i, z, tensors, spec.bns[i])
                h = self._epilogue(i, z, st, None, None, None, tensors)[0]
                zs.append(z)
                acts.append(h)
                stats.append(st)
            else:
                h = self._epilogue(i, z, None, None, None, None, tensors)[0]
        z = conv(h, tensors[sl.w[k - 1]], spec.convs[k - 1], k > 1 or x.requires_grad)
        del h
        st = self._stats(k - 1, z, tensors, spec.bns[k - 1]) if train else None
        zd = xp = st_d = None
        if self.proj:
            xp = F._pool(x, spec.proj_pool)
            zd = conv(xp, tensors[sl.wd], spec.proj, x.requires_grad)
            if train:
                st_d = self._stats(k, zd, tensors, spec.proj_bn)
            skip = zd
        else:
            skip = x
        out, mask = self._epilogue(k - 1, z, st, skip, st_d, factor, tensors)
        if not save:
            return out, None
        zs.append(z)
        stats.append(st)
        # (the activations and the pooled input are the recorded convolutions' inputs,
        # which their nodes hold: saved there once, see saved_tensors)
        flat = [x, factor, tensors[sl.wd], None, *self.get_w(tensors), *zs,
                *self.no_acts, mask, zd, xp if spec.proj_pool and zd.grad_fn is None else None]
        for s in stats:
            flat += (s, None, None, None, None)
        flat += (st_d, None, None, None, None)
        flat += self.no_gate
        return out, flat

    def _epilogue(self, i: int, z: Tensor, st: Optional[Tensor], skip, st_d, factor,
                  tensors):
        """(y, mask) of epilogue i: batch statistics ``st`` (and ``st_d``), [4, C] rows, or
        in eval the running ones, bound with the BN's tensors; the unbound op where z or
        the factor is not what a binding takes (as ops.bind_bn_act_fwd)."""
        if i != self.tail:
            skip = factor = None
        b = self.fwd[i]
        if b is not None and st is not None:  # (batch statistics: the [4, C] rows)
            out = b.call_if_fits(z, st, skip, st_d, factor)
            if out is not None:
                return out
        if b is None or not b.fits(z, factor):
            if b is not None or z.numel() == 0 or not ops._in_own_layout(z):
                return self._epilogue_unbound(i, z, st, skip, st_d, factor, tensors)
            b = self.fwd[i] = self._bind_epilogue(i, z, st, skip, st_d, factor, tensors)
        y, mask, _, _ = b(z, st, st, skip, st_d, st_d, factor)  # (rows: stats_rows)
        return y, mask

    def _norms(self, i: int, st, st_d, tensors):
        """(Norm, skip Norm or None) of epilogue i, as function.normalise makes them."""
        spec = self.spec
        norm = Norm(_records(st), self._params(i, tensors), spec.bns[i].eps)
        if i == self.tail and self.proj:
            return norm, Norm(_records(st_d), self._params(self.k, tensors), spec.proj_bn.eps)
        return norm, None

    def _bind_epilogue(self, i, z, st, skip, st_d, factor, tensors):
        norm, skip_norm = self._norms(i, st, st_d, tensors)
        flat, flat_d = ops._flat_norm(norm), ops._flat_norm(skip_norm)
        return self.impl.BoundFwd(z, *flat, skip, *flat_d, skip_norm is not None, factor,
                                  True, i == self.tail and self.save, self.save,
                                  stats_rows=st is not None)

    def _epilogue_unbound(self, i, z, st, skip, st_d, factor, tensors):
        norm, skip_norm = self._norms(i, st, st_d, tensors)
        out = ops.run_bn_act_fwd(z, norm, skip, skip_norm, factor, True,
                                 i == self.tail and self.save)
        return out.y, out.mask

    def saved_tensors(self, t: tuple) -> tuple:
        """A ctx's saved tensors from forward as FusedResidualBlock's general path saves
        them (for its backward, when that runs instead): with the activations, and a
        post-activation block's pooled input, that the recorded convolutions hold."""
        t = list(t)
        zs = t[self.at_zs:self.at_zs + self.k]
        first = 1 if self.spec.preact else 0  # (a pre-activation block saves a0 itself)
        for i in range(1, self.k):
            t[self.at_acts + first + i - 1] = zs[i].grad_fn._saved_input
        zd = t[self.at_mask + 1]
        if zd is not None and t[self.at_mask + 2] is None and self.spec.proj_pool:
            t[self.at_mask + 2] = zd.grad_fn._saved_input
        return tuple(t)

    # ---------------------------------------------------------------- backward

    def backward(self, ctx, dout: Tensor) -> tuple:
        if self.spec.preact:
            return self._backward_preact(ctx, dout)
        spec, k, sl = self.spec, self.k, self.sl
        t = ctx.saved_tensors
        x, factor = t[0], t[1]
        zs = t[self.at_zs:self.at_zs + k]
        mask, zd = t[self.at_mask], t[self.at_mask + 1]
        stats = self.get_stats(t)  # [4, C] each
        needs = self.needs_per_slot(ctx.needs_input_grad)
        tensors = ctx.tensors
        grads = [None] * sl.total
        need_x = ctx.needs_input_grad[2]
        z = zs[-1]
        # (z is dense in its own layout: a dout with its strides is in that layout too)
        if dout.dtype != z.dtype or dout.stride() != z.stride():
            fmt = memory_format(z)
            dout = dout.to(z.dtype).contiguous(memory_format=fmt)
        j = sl.bn[k - 1]
        need = needs[j + _GAMMA] or needs[j + _BETA]
        if self.proj:
            jd = sl.bnd
            need = need or needs[jd + _GAMMA] or needs[jd + _BETA]
            dz, dskip, sums = self._bwd(k - 1, dout, z, stats[k - 1], mask, factor, zd,
                                        stats[k], None, need)
            sums_at = [(jd, sums, 2), (j, sums, 0)]
        else:
            dz, dskip, sums = self._bwd(k - 1, dout, z, stats[k - 1], mask, factor, None, None,
                                        None, need)
            sums_at = [(j, sums, 0)]
        gin = None
        for i in range(k - 1, -1, -1):
            gin, gw = _conv_grads(zs[i], dz, spec.convs[i], i > 0 or need_x)
            if gw is not None and needs[sl.w[i]]:
                grads[sl.w[i]] = gw
            if i > 0:
                dz = self._inner(i - 1, gin, zs[i - 1], stats[i - 1], sl.bn[i - 1], needs,
                                 sums_at)
        _set_bns(grads, needs, tensors, sums_at)
        dx = gin if need_x else None
        if self.proj:
            gxp, gwd = _conv_grads(zd, dskip, spec.proj, need_x)
            if gwd is not None and needs[sl.wd]:
                grads[sl.wd] = gwd
            gx = F._pool_backward(gxp, x, spec.proj_pool) if need_x else None
            if need_x:
                dx = _add(dx, gx)
        elif need_x:
            dx = _add(dx, dskip)
        return (None, None, dx, None, *self.pick(grads))

    def _shortcut_backward(self, g: Tensor, src: Tensor, xp, wd, need_in: bool, needs,
                           grads: list) -> Optional[Tensor]:
        """The projection conv's backward from g: sets its weight's gradient, and returns
        the gradient of its source (x, or a pre-activation block's p) through the pool."""
        spec, at = self.spec, self.sl.wd
        gxp, gwd = F._conv_backward(g, xp if spec.proj_pool else src, wd, spec.proj,
                                    need_in, needs[at])
        if gwd is not None and needs[at]:
            grads[at] = gwd
        return F._pool_backward(gxp, src, spec.proj_pool) if need_in else None

    def _inner(self, i: int, dy: Tensor, z: Tensor, stats, j: int, needs, sums_at: list,
               dz_add: Optional[Tensor] = None) -> Tensor:
        """dz of relu(bn(z)) given dy (the ReLU recomputed from z), for the BN of bound
        site i whose BNParams start at j in the flat list; its gamma and beta grads go on
        ``sums_at`` (see _set_bns)."""
        dz, _, sums = self._bwd(i, dy, z, stats, None, None, None, None, dz_add,
                                needs[j + _GAMMA] or needs[j + _BETA])
        sums_at.append((j, sums, 0))
        return dz

    def _bwd(self, i: int, dy: Tensor, z: Tensor, st: Tensor, mask, factor, zd, st_d,
             dz_add, need_sums: bool):
        """(dz, dskip, sums) of BN i's backward through its binding; ``st`` and ``st_d``
        the saved [4, C] statistics of the BN and of the projection BN (None without
        one), which the binding reads whole (stats_rows): no record or view is made on
        this path (a few microseconds a BN, the host benchmark's budget)."""
        b = self.bwd[i]
        if b is not None:
            out = b.call_if_fits(dy, z, st, mask, factor, zd, st_d, dz_add)
            if out is not None:
                return out
        return self._bwd_other(i, dy, z, st, mask, factor, zd, st_d, dz_add, need_sums)

    def _bwd_other(self, i, dy, z, st, mask, factor, zd, st_d, dz_add, need_sums):
        """_bwd's first call at site i (which binds it where z is in its own layout) and
        any call its binding does not fit (the unbound op, which converts what does
        not). The site's modes: a post-activation block's last BN (the tail) reads the
        packed ReLU bits and passes the gradient to the shortcut, the projection BN's
        (st_d) or x's; every other BN recomputes its ReLU and has no shortcut."""
        tail = i == self.tail
        mask_mode = 2 if tail else 1
        skip_mode = 2 if st_d is not None else (1 if tail else 0)
        a = BwdArgs(dy, z, _records(st), mask, mask_mode, factor, skip_mode, zd,
                    _records(st_d), True, st_d is not None, dz_add)
        if self.bwd[i] is None and ops._in_own_layout(z):
            b = self.bwd[i] = self.impl.BoundBwd(z, mask_mode, factor, skip_mode, zd, True,
                                                 a.batch_stats_d, need_sums, dz_add,
                                                 stats_rows=True)
            if b.fits(dy, z, factor, zd, dz_add):
                return self._bwd(i, dy, z, st, mask, factor, zd, st_d, dz_add, need_sums)
        out = ops.run_bn_act_bwd(a, need_sums)
        return out.dz, out.dskip, out.sums

    # ---------------------------------------------------------------- pre-activation

    def _forward_preact(self, x: Tensor, factor: Optional[Tensor], tensors):
        """function._forward_preact, straight: p = relu(bn_0(x)), h_i = conv_i(...),
        out = f_n * h_k + (x | conv_d(pool(p)))."""
        spec, k, sl, save = self.spec, self.k, self.sl, self.save
        st = self._stats(0, x, tensors, spec.bns[0]) if save else None
        a0 = self._epilogue(0, x, st, None, None, None, tensors)[0]
        zs, acts, stats = [], [a0], [st]
        conv = _conv_recorded if save else _conv
        # (the first conv's input gradient feeds only BN 0's backward: x's and its own)
        j0 = sl.bn[0]
        need_first = save and (x.requires_grad or _requires_grad(tensors[j0 + _GAMMA])
                               or _requires_grad(tensors[j0 + _BETA]))
        h = a0
        for i in range(k):
            z = conv(h, tensors[sl.w[i]], spec.convs[i], i > 0 or need_first)
            zs.append(z)
            if i < k - 1:
                st = self._stats(i + 1, z, tensors, spec.bns[i + 1]) if save else None
                h = self._epilogue(i + 1, z, st, None, None, None, tensors)[0]
                acts.append(h)
                stats.append(st)
        del h
        xp = None
        if self.proj:
            xp = F._pool(a0, spec.proj_pool)
            skip = F._conv(xp, tensors[sl.wd], spec.proj)
        else:
            skip = x
        if factor is not None:
            z = z * factor.to(z.dtype).view(-1, 1, 1, 1)
        out = z + _in_layout_of(skip, z)
        if not save:
            return out, None
        # (the inner activations: the recorded convolutions' inputs, held by their nodes;
        # a0 is the projection's source too, whose convolution is not recorded)
        flat = [x, factor, tensors[sl.wd], None, *self.get_w(tensors), *zs, a0,
                *self.no_acts[1:], None, None, xp if spec.proj_pool else None]
        for s in stats:
            flat += (s, None, None, None, None)
        flat += (None,) * 5
        flat += self.no_gate
        return out, flat

    def _backward_preact(self, ctx, dout: Tensor) -> tuple:
        """function._backward_preact, straight."""
        spec, k, sl = self.spec, self.k, self.sl
        t = ctx.saved_tensors
        x, factor, wd = t[0], t[1], t[2]
        zs = t[self.at_zs:self.at_zs + k]
        a0, xp = t[self.at_acts], t[self.at_mask + 2]
        stats = [t[at] for at in self.at_stats[:k]]
        needs = self.needs_per_slot(ctx.needs_input_grad)
        tensors = ctx.tensors
        grads = [None] * sl.total
        need_x = ctx.needs_input_grad[2]
        dout = _in_layout_of(dout, zs[-1])
        dz = dout * factor.to(dout.dtype).view(-1, 1, 1, 1) if factor is not None else dout
        j0 = sl.bn[0]
        need_first = need_x or needs[j0 + _GAMMA] or needs[j0 + _BETA]
        gin = None
        sums_at: list = []
        for i in range(k - 1, -1, -1):
            gin, gw = _conv_grads(zs[i], dz, spec.convs[i], i > 0 or need_first)
            if gw is not None and needs[sl.w[i]]:
                grads[sl.w[i]] = gw
            if i > 0:
                dz = self._inner(i, gin, zs[i - 1], stats[i], sl.bn[i], needs, sums_at)
        if self.proj:  # (its output is not saved: its convolution is not recorded)
            ga0 = self._shortcut_backward(dout, a0, xp, wd, need_first, needs, grads)
            if need_first:
                gin = _add(gin, ga0)
        dx = None
        if need_first:
            identity = None if self.proj else _in_layout_of(dout, x)
            dx = self._inner(0, _in_layout_of(gin, x), x, stats[0], j0, needs, sums_at,
                             identity)
        _set_bns(grads, needs, tensors, sums_at)
        return (None, None, dx if need_x else None, None, *self.pick(grads))


class _FullCtx:
    """What FusedResidualBlock's backward reads of its ctx, made from a
    StraightResidualBlock's: the saved tensors in the general path's layout, and
    needs_input_grad over (spec, x, factor, *the flat list)."""
    __slots__ = ("spec", "tensors", "saved_tensors", "needs_input_grad")

    def __init__(self, spec, tensors, saved_tensors, needs_input_grad):
        self.spec, self.tensors = spec, tensors
        self.saved_tensors, self.needs_input_grad = saved_tensors, needs_input_grad


def _batched_backward(ctx, dout: Tensor) -> tuple:
    prog = ctx.straight
    return prog.compact(parity.block_backward_batched(prog.full_ctx(ctx), dout))


class StraightResidualBlock(torch.autograd.Function):
    """``StraightResidualBlock.apply(prog, tensors, x, factor, *params)``:
    FusedResidualBlock for a cached plan that a StraightBlock ``prog`` runs, with the
    same forward, saved state and gradients. Only ``params`` (prog.pick(tensors): the
    conv weights and BN gammas and betas) are the Function's tensor inputs; ``tensors``,
    the plan's flat list, passes beside them as one object. A Function's host cost grows
    with its inputs and outputs (each a slot autograd checks in forward and backward),
    and a block's flat list is mostly running statistics and absent parts."""

    @staticmethod
    def forward(ctx, prog: StraightBlock, tensors, x: Tensor, factor: Optional[Tensor],
                *params):
        ctx.spec, ctx.tensors, ctx.straight = prog.spec, tensors, prog
        out, flat = prog.forward(x, factor, tensors)
        ctx.save_for_backward(*flat)
        return out

    @staticmethod
    @parity.fused_backward(parity.describe_block, _batched_backward)
    def backward(ctx, dout: Tensor):
        prog = ctx.straight
        if ops.backend_of(dout) is prog.impl:
            return prog.backward(ctx, dout)
        # (another backend by now: function.py's general backward, which reads the same
        # saved state once the recorded convolutions' inputs are put back)
        return prog.compact(F.FusedResidualBlock.backward(prog.full_ctx(ctx), dout))


def _conv(h: Tensor, w: Tensor, cs, need_in: bool) -> Tensor:
    """F._conv, unrecorded (no autograd: an eval call), in _conv_recorded's signature."""
    return F._conv(h, w, cs)


def _conv_recorded(h: Tensor, w: Tensor, cs, need_in: bool) -> Tensor:
    """F._conv(h, w, cs) recorded by autograd, in a training call: the output's grad_fn is
    the convolution's own backward node, which the backward calls (see _conv_grads).
    ``need_in``: h's gradient is wanted; h, one of this block's own tensors then (an
    activation, a pooled input), is made a leaf that requires grad, so that the node
    computes it (the node alone is called: nothing ever accumulates into h)."""
    if h.dtype != w.dtype:  # (as F._conv: pre-activation, the first BN in x's dtype)
        h = h.to(w.dtype)
    if need_in and not h.requires_grad:
        h.requires_grad_()
    prev = torch.is_grad_enabled()
    _set_grad(True)
    try:
        return torch.conv2d(h, w, None, cs.stride, cs.padding, cs.dilation, cs.groups)
    finally:
        _set_grad(prev)


_set_grad = torch._C._set_grad_enabled


def _conv_grads(z: Tensor, dz: Tensor, cs, need_in: bool) -> tuple:
    """(input grad, weight grad) of the recorded convolution that made z, None where not
    wanted: its autograd node called from here, in C++, the op autograd itself would run
    (a Python call of aten.convolution_backward costs 15-20 us more in a microbenchmark,
    three to four times that within a train step: bench/bench_host.py)."""
    node = z.grad_fn
    if node is None:  # (neither its input nor its weight requires grad)
        return None, None
    gin, gw, _ = node(dz)
    if gin is None and need_in:
        # torch.autograd.grad / backward(inputs=...): the node computes only what the
        # engine will run, and the input's leaf is not in its graph (nor the weight's
        # where that is not asked for)
        gin = F._conv_backward(dz, node._saved_input, node._saved_weight, cs, True, False)[0]
    return gin, gw


def _in_layout_of(t: Tensor, ref: Tensor) -> Tensor:
    """t (of ref's shape) in the layout of ref, which is dense in its own: t itself where
    its strides are ref's (a stride check costs less than is_contiguous with a format)."""
    if t.stride() == ref.stride():
        return t
    return t.contiguous(memory_format=memory_format(ref))


def _requires_grad(t: Optional[Tensor]) -> bool:
    return t is not None and t.requires_grad


def _records(rows: Optional[Tensor]) -> Optional[BNStats]:
    """The BNStats record of [4, C] rows, for the ops that take records (a call no binding
    fits, a first call)."""
    return None if rows is None else BNStats(*rows.unbind(0))


def _set_bns(grads: list, needs, tensors, sums_at: list) -> None:
    """dgamma and dbeta of each BN on ``sums_at``, (j, sums, row) where its BNParams start
    at j in the flat list and its grads are sums rows row+1 and row. Taken together after
    the last convolution's backward: the first view op after a convolution costs several
    times the next ones (its code is out of cache by then), so one cold op, not one a BN."""
    for j, sums, row in sums_at:
        if sums is None or not sums.numel():
            continue
        at = j + _GAMMA
        if needs[at]:
            g, dt = sums[row + 1], tensors[at].dtype
            grads[at] = g if g.dtype == dt else g.to(dt)
        at = j + _BETA
        if needs[at]:
            g, dt = sums[row], tensors[at].dtype
            grads[at] = g if g.dtype == dt else g.to(dt)


def _add(g: Tensor, h: Tensor) -> Tensor:
    """g + h into g: g is a gradient the convolution's backward has just made, which
    nothing else holds (one allocation fewer); out of place where the dtypes differ."""
    return g.add_(h) if g.dtype == h.dtype else g + h
