"""FusedResidualBlock: a whole residual block as one autograd Function.

Convolutions run through ATen (cuDNN on a GPU); everything between them (batch norm,
ReLU, the residual add, the projection shortcut's batch norm, stochastic depth) runs
through the fused ops of fusedres.ops. Post-activation blocks (torchvision, timm ResNet):

    a_i = relu(bn_i(conv_i(a_{i-1})))   for every conv but the last, a_0 = x
    out = relu(f_n * g[n, c] * bn_k(conv_k(a_{k-1})) + skip),  skip = x | bn_d(conv_d(pool(x)))

with g = 1, or an SE/ECA gate of the pooled bn_k output (fusedres.gate; _gated_backward).

Pre-activation blocks (ResNet v2, timm resnetv2):

    p = relu(bn_1(x)),  h_i = conv_i(relu(bn_i(h_{i-1}))) ...,
    out = f_n * conv_k(...) + skip,  skip = x | conv_d(pool(p))

Saved for the backward: the block input, each conv output, per-channel statistics and the
last ReLU as a bit mask; the inner activations too unless ``recompute`` is set. Running
statistics are updated in the forward, on the device (no host synchronisation).

This file is the block's arithmetic and nothing else: its structure arrives as a
BlockSpec, already checked (plan.py builds and caches it from the modules).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn
from . import distributed, ops, parity, reference, straight
from .antialias import AASpec, aa_backward, aa_forward
from .gate import GateParams, GateSpec, gate_backward, gate_forward
from .layout import memory_format
from .records import BNParams, BNStats, BwdArgs, BwdOut, Norm


@dataclass(frozen=True)
class ConvSpec:
    """A bias-free 2-D convolution's hyper-parameters."""
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    @staticmethod
    def of(conv: nn.Conv2d) -> "ConvSpec":
        return ConvSpec(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


@dataclass(frozen=True)
class BNSpec:
    """How one batch norm behaves in this call."""
    batch_stats: bool          # normalise with the batch's statistics (else the running ones)
    update: bool               # update running_mean / running_var / num_batches_tracked
    momentum: Optional[float]  # None: cumulative average
    eps: float
    sync: bool = False         # batch statistics over all ranks of the block's group


@dataclass(frozen=True)
class BlockSpec:
    """The static structure of a block; its tensors travel separately (see Slots)."""
    preact: bool
    convs: tuple               # ConvSpec per main-path conv
    bns: tuple                 # BNSpec per main-path BN (after conv i, or before it if preact)
    proj: Optional[ConvSpec] = None
    proj_pool: int = 0         # >0: AvgPool2d(k, k, ceil_mode=True, count_include_pad=False) first
    proj_bn: Optional[BNSpec] = None
    recompute: bool = False
    skip: bool = True          # False: the plain (no-shortcut) form of the block
    aa: Optional[AASpec] = None  # anti-aliasing step after one inner activation (timm's aa)
    gate: Optional[GateSpec] = None  # SE/ECA gate on the last BN's output (timm's se)
    group: Any = dataclasses.field(default=None, compare=False)  # process group of the BNs with sync
    # {(backend, keep_stats): Sites}: the bound launches of a plan a module caches (filled
    # by its first call on each backend); None for a plan made for one call
    sites: Optional[dict] = dataclasses.field(default=None, compare=False)


class Slots(NamedTuple):
    """Positions in the flat tensor list that FusedResidualBlock.apply takes after
    (spec, x, factor): the k conv weights, then each BN's BNParams (5 fields), then the
    projection conv's weight and its BN's BNParams, then the anti-aliasing blur filter,
    then the gate's GateParams (4 fields)."""
    w: tuple        # conv i's weight
    bn: tuple       # first position of BN i's BNParams
    wd: int
    bnd: int
    aa: int         # BlockSpec.aa's blur filter (None for an avg pool or no aa)
    gate: int       # first position of BlockSpec.gate's GateParams (all None without a gate)
    total: int


@functools.lru_cache(maxsize=None)
def slots(k: int) -> Slots:
    """The Slots of a block with k convs."""
    n = len(BNParams._fields)
    gate = k + n * k + 2 + n
    return Slots(tuple(range(k)), tuple(k + n * i for i in range(k)), k + n * k,
                 k + n * k + 1, k + n * k + 1 + n, gate, gate + len(GateParams._fields))


_GAMMA, _BETA = BNParams._fields.index("weight"), BNParams._fields.index("bias")


class SavedBN(NamedTuple):
    """One BN's share of the saved state."""
    stats: BNStats
    count: Optional[Tensor]    # values per channel over all ranks (synchronised BN), else None


@dataclass
class Saved:
    """What the forward keeps for the backward, by name. save_for_backward takes it flat
    (``flat()``), and ``unflat`` rebuilds it from the spec alone."""
    zs: list                       # each conv's output, in order
    bns: list                      # SavedBN per main-path BN, in spec.bns order
    acts: list                     # inner activations, after spec.aa (empty with recompute)
    mask: Optional[Tensor] = None  # the last ReLU's bits (post-activation)
    zd: Optional[Tensor] = None    # the projection conv's output (post-activation)
    bn_d: Optional[SavedBN] = None
    xp: Optional[Tensor] = None    # the pooled shortcut input (proj_pool)
    gate: Optional["SavedGate"] = None

    def flat(self) -> list:
        out = [*self.zs, *self.acts, self.mask, self.zd, self.xp]
        for b in (*self.bns, self.bn_d):
            out.extend((*b.stats, b.count) if b is not None else (None,) * 5)
        out.extend(self.gate if self.gate is not None else (None,) * len(SavedGate._fields))
        return out

    @staticmethod
    def unflat(spec: BlockSpec, t: tuple) -> "Saved":
        k = len(spec.convs)
        n_acts = 0 if spec.recompute else (k if spec.preact else k - 1)
        zs, acts = list(t[:k]), list(t[k:k + n_acts])
        i = k + n_acts
        mask, zd, xp = t[i:i + 3]
        i += 3
        bns = []
        for _ in range(k + 1):
            bns.append(SavedBN(_saved_stats(t[i:i + 4]), t[i + 4]) if t[i] is not None else None)
            i += 5
        gate = SavedGate(*t[i:]) if spec.gate is not None else None
        return Saved(zs, bns[:k], acts, mask, zd, bns[k], xp, gate)


def _saved_stats(t: tuple) -> BNStats:
    """One BN's saved statistics: four [C] tensors, or (straight.py's form) bn_stats's
    [4, C] rows whole in the first slot and None in the other three."""
    return BNStats(*t) if t[1] is not None else BNStats(*t[0].unbind(0))


class SavedGate(NamedTuple):
    """A gated block's share of the saved state: the gate's [N, C] input and output and
    its parameters (fusedres.gate)."""
    m: Tensor                      # mean_hw of the last conv's output, statistics dtype
    g: Tensor                      # the gate, statistics dtype
    hidden: Tensor                 # gate_forward's hidden (SE: fc1's pre-activation)
    w1: Optional[Tensor]
    b1: Optional[Tensor]
    w2: Optional[Tensor]
    b2: Optional[Tensor]

    @property
    def params(self) -> GateParams:
        return GateParams(self.w1, self.b1, self.w2, self.b2)


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------


def _conv(x: Tensor, w: Tensor, cs: ConvSpec) -> Tensor:
    if x.dtype != w.dtype:  # autocast, pre-activation: the first BN ran in x's own dtype
        x = x.to(w.dtype)
    # torch.conv2d: the same ATen convolution as torch.ops.aten.convolution, through the C++
    # binding instead of the Python op overload (microseconds a call at small sizes)
    return torch.conv2d(x, w, None, cs.stride, cs.padding, cs.dilation, cs.groups)


# the overload itself: the packet's call resolves it on every call
_CONVOLUTION_BACKWARD = torch.ops.aten.convolution_backward.default


def _conv_backward(dout: Tensor, inp: Tensor, w: Tensor, cs: ConvSpec, need_in: bool,
                   need_w: bool):
    if not (need_in or need_w):
        return None, None
    dt = w.dtype  # (autocast: the gradient and input in the convolution's dtype)
    gi, gw, _ = _CONVOLUTION_BACKWARD(
        dout if dout.dtype == dt else dout.to(dt), inp if inp.dtype == dt else inp.to(dt), w,
        None, cs.stride, cs.padding, cs.dilation, False, (0, 0), cs.groups,
        [need_in, need_w, False])
    return gi, gw


def _pool(x: Tensor, k: int) -> Tensor:
    if k == 0:
        return x
    return torch.ops.aten.avg_pool2d(x, [k, k], [k, k], [0, 0], True, False, None)


def _pool_backward(g: Tensor, x: Tensor, k: int) -> Tensor:
    if k == 0:
        return g
    return torch.ops.aten.avg_pool2d_backward(g, x, [k, k], [k, k], [0, 0], True, False, None)


_NO_RUNNING = (None, None, None)


def normalise(z: Tensor, p: BNParams, bs: BNSpec, group=None, sites=None,
              i: int = 0) -> tuple[Norm, Optional[Tensor]]:
    """How one BN normalises z in this call, and its global count (synchronised BN, else
    None): batch statistics through the fused op, which also updates the running
    statistics when ``bs.update``; or the running statistics, which the epilogue reads.
    ``sites``, ``i``: the cached plan's bound launches and this BN's place among them."""
    if not bs.batch_stats:
        return Norm(None, p, bs.eps), None
    upd = p if bs.update else BNParams(p.weight, p.bias, *_NO_RUNNING)
    if bs.sync:
        gathered = distributed.gather_moments(ops.run_bn_moments(z), group)
        stats = ops.run_bn_stats_from_moments(gathered, upd, bs.momentum, bs.eps)
        return Norm(stats, p, bs.eps), distributed.global_count(gathered)
    if sites is None:
        return Norm(ops.run_bn_stats(z, upd, bs.momentum, bs.eps), p, bs.eps), None
    bound = sites.stats.get(i)
    if bound is None:  # (two threads binding at once bind twice: harmless)
        bound = sites.stats[i] = ops.bind_bn_stats(sites.impl, z, upd, bs.momentum, bs.eps)
    return Norm(bound(z), p, bs.eps), None


def normalise_pooled(z: Tensor, p: BNParams, bs: BNSpec,
                     group=None) -> tuple[Norm, Optional[Tensor], Tensor]:
    """normalise() and m = mean_hw z per (sample, channel), [N, C] in the statistics dtype
    (a gate's input): from the statistics pass itself in training (bn_stats_pool), by one
    pooling read in eval (bn_pool) and under synchronised BN (whose statistics pass is
    bn_moments, which does not pool)."""
    if bs.batch_stats and not bs.sync:
        upd = p if bs.update else BNParams(p.weight, p.bias, *_NO_RUNNING)
        stats, m = ops.run_bn_stats_pool(z, upd, bs.momentum, bs.eps)
        return Norm(stats, p, bs.eps), None, m
    norm, count = normalise(z, p, bs, group)
    return norm, count, ops.run_bn_pool(z)


def pooled_bn_output(m: Tensor, norm: Norm) -> Tensor:
    """mean_hw bn(z) = scale*m + shift, [N, C], from m = mean_hw z: with the batch
    statistics, or (eval) with the scale and shift the epilogue derives from the running
    ones (reference.running_stats: the same [C] arithmetic)."""
    if norm.stats is not None:
        scale, shift = norm.stats.scale, norm.stats.shift
    else:
        p = norm.params
        _, _, scale, shift = reference.running_stats(p.weight, p.bias, p.running_mean,
                                                     p.running_var, norm.eps, m.dtype)
    return m * scale + shift


def _bn_relu(z: Tensor, norm: Norm, sites=None, i: int = 0):
    """(relu(bn(z)), the BNStats it used: None from a binding that keeps no statistics)."""
    out = _epilogue(sites, i, z, norm, None, None, None, True, False)
    return out.y, out.stats


class Sites(NamedTuple):
    """A cached plan's bound launches, made by its first call on backend ``impl``, keyed
    by the BN's place in the block: epilogues (ops.bind_bn_act_fwd, ``keep_stats`` as
    bound), batch statistics (ops.bind_bn_stats) and backwards (ops.bind_bn_act_bwd)."""
    impl: Any
    fwd: dict
    keep_stats: bool
    stats: dict
    bwd: dict


def _epilogue(sites: Optional[Sites], i: int, z: Tensor, norm: Norm, skip, skip_norm,
              factor, relu: bool, write_mask: bool):
    """ops.run_bn_act_fwd, through call site i's binding where the plan keeps them."""
    if sites is None:
        return ops.run_bn_act_fwd(z, norm, skip, skip_norm, factor, relu, write_mask)
    bound = sites.fwd.get(i)
    if bound is None:
        bound = sites.fwd[i] = ops.bind_bn_act_fwd(sites.impl, z, norm, skip, skip_norm,
                                                   factor, relu, write_mask, sites.keep_stats)
    return bound(z, norm, skip, skip_norm, factor)


def _same_layout(t: Tensor, like: Tensor) -> Tensor:
    return t.contiguous(memory_format=memory_format(like))


def _stats_norm(stats: BNStats) -> Norm:
    """A Norm that reuses saved statistics (recomputing an inner activation)."""
    return Norm(stats, BNParams(None, None, None, None, None), 0.0)


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


def _sites(spec: BlockSpec, x: Tensor, keep_stats: bool) -> Optional[Sites]:
    """The spec's bound launches for the backend x runs on and ``keep_stats`` (None: call
    the ops unbound)."""
    if spec.sites is None:
        return None
    impl = ops.backend_of(x)
    if impl is None:  # torch.compile traces: nothing is bound
        return None
    sites = spec.sites.get((impl, keep_stats))
    if sites is None:
        sites = spec.sites[(impl, keep_stats)] = Sites(impl, {}, keep_stats, {}, {})
    return sites


def block_forward(spec: BlockSpec, x: Tensor, factor: Optional[Tensor], tensors,
                  save: bool):
    """Run the block; returns (out, Saved or None)."""
    if not save:
        prog = straight.program(spec, x, False)
        if prog is not None:  # (a cached plan of the common block: straight-line code)
            return prog.forward(x, factor, tensors)
    sites = _sites(spec, x, keep_stats=save)
    sl = slots(len(spec.convs))
    W = [tensors[i] for i in sl.w]
    P = [BNParams(*tensors[i:i + 5]) for i in sl.bn]
    if spec.preact:
        return _forward_preact(spec, x, factor, W, P, tensors[sl.wd], save, sites)
    return _forward_post(spec, x, factor, W, P, tensors[sl.wd],
                         BNParams(*tensors[sl.bnd:sl.bnd + 5]), tensors[sl.aa],
                         GateParams(*tensors[sl.gate:sl.gate + 4]), save, sites)


def _forward_post(spec, x, factor, W, P, wd, pd, filt, gp, save, sites=None):
    k = len(spec.convs)
    zs, bns, acts = [], [], []
    # Keep conv outputs and activations only when the backward needs them: in inference
    # each is freed as soon as the next one exists, as in eager PyTorch.
    h = x
    for i in range(k - 1):
        z = _conv(h, W[i], spec.convs[i])
        norm, count = normalise(z, P[i], spec.bns[i], spec.group, sites, i)
        h, stats = _bn_relu(z, norm, sites, i)
        if spec.aa is not None and spec.aa.after == i:
            h = aa_forward(h, spec.aa, filt)
        if save:
            zs.append(z)
            bns.append(SavedBN(stats, count))
            acts.append(h)
    z = _conv(h, W[k - 1], spec.convs[k - 1])
    del h
    if spec.gate is None:
        norm, count = normalise(z, P[k - 1], spec.bns[k - 1], spec.group, sites, k - 1)
    else:
        # the gate g [N, C] rides on the epilogue's factor, stochastic depth on top of it
        norm, count, m = normalise_pooled(z, P[k - 1], spec.bns[k - 1], spec.group)
        g, hidden = gate_forward(pooled_bn_output(m, norm), spec.gate, gp)
        factor = g if factor is None else (g * factor.to(g.dtype)[:, None]).contiguous()
    saved = Saved(zs, bns, [] if spec.recompute else acts) if save else None
    if save and spec.gate is not None:
        saved.gate = SavedGate(m, g, hidden, *gp)
    if spec.proj is not None:
        xp = _pool(x, spec.proj_pool)
        zd = _conv(xp, wd, spec.proj)
        norm_d, count_d = normalise(zd, pd, spec.proj_bn, spec.group, sites, k)
        out = _epilogue(sites, k - 1, z, norm, _same_layout(zd, z), norm_d, factor, True, save)
        if save:
            saved.zd, saved.xp = zd, (xp if spec.proj_pool else None)
            saved.bn_d = SavedBN(out.skip_stats, count_d)
    else:
        residual = _same_layout(x, z) if spec.skip else None
        out = _epilogue(sites, k - 1, z, norm, residual, None, factor, True, save)
    if save:
        zs.append(z)
        bns.append(SavedBN(out.stats, count))
        saved.mask = out.mask
    return out.y, saved


def _forward_preact(spec, x, factor, W, P, wd, save, sites=None):
    k = len(spec.convs)
    zs, bns, acts = [], [], []
    norm, count = normalise(x, P[0], spec.bns[0], spec.group, sites, 0)
    a0, stats = _bn_relu(x, norm, sites, 0)
    h = a0
    if save:
        bns.append(SavedBN(stats, count))
        acts.append(h)
    for i in range(k):
        z = _conv(h, W[i], spec.convs[i])
        if save:
            zs.append(z)
        if i < k - 1:
            norm, count = normalise(z, P[i + 1], spec.bns[i + 1], spec.group, sites, i + 1)
            h, stats = _bn_relu(z, norm, sites, i + 1)
            if save:
                bns.append(SavedBN(stats, count))
                acts.append(h)
    del h
    saved = Saved(zs, bns, [] if spec.recompute else acts) if save else None
    if spec.proj is not None:
        xp = _pool(a0, spec.proj_pool)
        skip = _conv(xp, wd, spec.proj)
        if save and spec.proj_pool:
            saved.xp = xp
    else:
        skip = x if spec.skip else None
    del a0
    if factor is not None:
        z = z * factor.to(z.dtype).view(-1, 1, 1, 1)
    out = z + _same_layout(skip, z) if skip is not None else z
    return out, saved


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------


def bn_backward(group, counts, args: BwdArgs, need_sums: bool, sites: Optional[Sites] = None,
                i: int = 0):
    """One BN's backward (and the projection BN's, skip_mode 2): ops.run_bn_act_bwd, or,
    where a BN synchronises (its global count in ``counts``, one per BN the call covers),
    its reduction and elementwise pass with the ranks' sums between. Returns BwdOut."""
    if group is None or all(c is None for c in counts):  # (group: set where a BN syncs)
        if sites is None:
            return ops.run_bn_act_bwd(args, need_sums)
        bound = sites.bwd.get(i)
        if bound is None:
            bound = sites.bwd[i] = ops.bind_bn_act_bwd(sites.impl, args, need_sums)
        return bound(args)
    sums = ops.run_bn_act_bwd_reduce(args)
    z = args.z
    means = distributed.mean_sums(sums, counts, z.numel() // max(z.shape[1], 1), group)
    dz, dskip = ops.run_bn_act_bwd_apply(args, means)
    return BwdOut(dz, dskip, sums)


class _Grads:
    """The gradients FusedResidualBlock.backward returns, one per input, filled by name."""

    def __init__(self, ctx, spec: BlockSpec):
        self.ctx, self.sl = ctx, slots(len(spec.convs))
        self.needs = ctx.needs_input_grad[3:]
        self.tensors = ctx.tensors
        self.out = [None] * self.sl.total

    def need_w(self, i: int) -> bool:
        return self.needs[self.sl.w[i]]

    def need_wd(self) -> bool:
        return self.needs[self.sl.wd]

    def _bn_at(self, i: Optional[int]) -> int:
        return self.sl.bnd if i is None else self.sl.bn[i]

    def need_bn(self, i: Optional[int]) -> bool:
        """BN i's (None: the projection BN's) gamma or beta needs a gradient."""
        j = self._bn_at(i)
        return self.needs[j + _GAMMA] or self.needs[j + _BETA]

    def set_w(self, i: int, g):
        if g is not None and self.need_w(i):
            self.out[self.sl.w[i]] = g

    def set_wd(self, g):
        if g is not None and self.need_wd():
            self.out[self.sl.wd] = g

    def set_bn(self, i: Optional[int], sums: Tensor, row: int = 0):
        """dgamma = sum g*xhat and dbeta = sum g (rows row+1, row), in each one's dtype."""
        if sums is None or not sums.numel():
            return
        j = self._bn_at(i)
        needs, tensors, out = self.needs, self.tensors, self.out
        for at, r in ((j + _GAMMA, row + 1), (j + _BETA, row)):
            if needs[at]:  # (so the parameter is there)
                g, dt = sums[r], tensors[at].dtype
                out[at] = g if g.dtype == dt else g.to(dt)

    def need_gate(self) -> GateParams:
        return GateParams(*(self.needs[self.sl.gate + i] for i in range(len(GateParams._fields))))

    def set_gate(self, g: GateParams):
        for i, t in enumerate(g):
            if t is not None and self.needs[self.sl.gate + i]:
                self.out[self.sl.gate + i] = t


class FusedResidualBlock(torch.autograd.Function):
    """``FusedResidualBlock.apply(spec, x, factor, *tensors)``: one residual block.

    ``spec`` is a BlockSpec; ``factor`` an optional [N] per-sample branch factor
    (stochastic depth); ``tensors`` the flat list of conv weights and BN tensors in Slots
    order. Prefer ``fused_residual_block``, which builds both from modules, checks them
    and handles autocast. The backward is once-differentiable."""

    @staticmethod
    def forward(ctx, spec: BlockSpec, x: Tensor, factor: Optional[Tensor], *tensors):
        # (a cached plan of the common block runs straight.StraightResidualBlock instead)
        ctx.spec, ctx.tensors = spec, tensors
        out, saved = block_forward(spec, x, factor, tensors, save=True)
        # Only conv weights are saved: the running statistics change in place every
        # forward, and the BN backward needs nothing of its parameters but their dtype
        # (read from ``ctx.tensors``, which parity.fused_backward's error names too).
        sl = slots(len(spec.convs))
        ctx.save_for_backward(x, factor, tensors[sl.wd], tensors[sl.aa],
                              *(tensors[i] for i in sl.w), *saved.flat())
        return out

    @staticmethod
    @parity.fused_backward(parity.describe_block, parity.block_backward_batched)
    def backward(ctx, dout: Tensor):
        spec: BlockSpec = ctx.spec
        k = len(spec.convs)
        x, factor, wd, filt, *rest = ctx.saved_tensors
        W, saved = rest[:k], Saved.unflat(spec, tuple(rest[k:]))
        grads = _Grads(ctx, spec)
        need_x = ctx.needs_input_grad[1]
        sites = _sites(spec, dout, keep_stats=True)
        if spec.preact:
            dx = _backward_preact(spec, dout, x, factor, W, wd, saved, grads, need_x, sites)
        else:
            # dout in the last conv output's layout and dtype, once: the backward's passes
            # read it as z (a sum's expanded gradient would be copied by each of them)
            z = saved.zs[-1]
            if dout.dtype != z.dtype or not dout.is_contiguous(memory_format=memory_format(z)):
                dout = dout.to(z.dtype).contiguous(memory_format=memory_format(z))
            dx = _backward_post(spec, dout, x, factor, W, wd, filt, saved, grads, need_x,
                                sites)
        return (None, dx, None, *grads.out)


def _inner_act(spec: BlockSpec, saved: Saved, i: int, source: Tensor,
               filt: Optional[Tensor] = None) -> Tensor:
    """Inner activation i (after spec.aa where it follows this one), saved or
    (recompute=True) recomputed from its BN input."""
    if not spec.recompute:
        return saved.acts[i]
    a = _bn_relu(source, _stats_norm(saved.bns[i].stats))[0]
    return aa_forward(a, spec.aa, filt) if spec.aa is not None and spec.aa.after == i else a


def _inner_bn_backward(spec: BlockSpec, grads: _Grads, i: int, dy: Tensor, z: Tensor,
                       bn: SavedBN, dz_add: Optional[Tensor] = None, sites=None) -> Tensor:
    """dz of relu(bn_i(z)) given dy, the ReLU recomputed from z; sets BN i's gradients."""
    args = BwdArgs(dy, z, bn.stats, None, 1, None, 0, None, None, spec.bns[i].batch_stats,
                   False, dz_add)
    out = bn_backward(spec.group, (bn.count,), args, grads.need_bn(i), sites, i)
    grads.set_bn(i, out.sums)
    return out.dz


def _gated_backward(spec: BlockSpec, grads: _Grads, dout: Tensor, factor: Optional[Tensor],
                    saved: Saved) -> BwdOut:
    """The last BN's backward under a gate, out = relu(f*g*u + skip), u = bn(z),
    p = mean_hw u, g = gate(p) (gate.py). With delta = dout through the ReLU bits,
    A = sum_hw delta and B = sum_hw delta*xhat per (n, c), sum_hw delta*u = gamma*B + beta*A,
    so dg = f*(gamma*B + beta*A); the gate's backward gives dp; u feeds the product and the
    pool, du = f*g*delta + dp/HW, whose BN sums are sum_n(f*g*A + dp) and
    sum_n(f*g*B + dp*(m - mean)*rstd). The apply pass then forms dz from du."""
    z, last, sg = saved.zs[-1], saved.bns[-1], saved.gate
    st = last.stats
    proj = spec.proj is not None
    args = BwdArgs(dout, z, st, saved.mask, 2, None, 2 if proj else int(spec.skip),
                   saved.zd, saved.bn_d.stats if proj else None, spec.bns[-1].batch_stats,
                   proj and spec.proj_bn.batch_stats, None)
    S = ops.run_bn_act_bwd_reduce(args, per_sample=True)  # [2 or 4, N, C]: A, B[, skip rows]
    A, B = S[0], S[1]
    f = factor.to(A.dtype)[:, None] if factor is not None else None
    # gamma and beta from what the forward normalised with (1 and 0 without affine)
    gamma, beta = st.scale / st.rstd, st.shift + st.mean * st.scale
    dg = gamma * B + beta * A if f is None else f * (gamma * B + beta * A)
    fg = sg.g if f is None else sg.g * f
    p = sg.m * st.scale + st.shift
    dp, dgate = gate_backward(dg, p, sg.g, sg.hidden, spec.gate, sg.params, grads.need_gate())
    grads.set_gate(dgate)
    rows = [(fg * A).sum(0) + dp.sum(0),
            (fg * B).sum(0) + (dp * ((sg.m - st.mean) * st.rstd)).sum(0)]
    if proj:
        rows += [S[2].sum(0), S[3].sum(0)]
    sums = torch.stack(rows)
    counts = (last.count, saved.bn_d.count) if proj else (last.count,)
    means = distributed.mean_sums(sums, counts, z.numel() // max(z.shape[1], 1), spec.group)
    hw = max(z.shape[2] * z.shape[3], 1)
    dz, dskip = ops.run_bn_act_bwd_apply(
        args._replace(factor=fg.contiguous(), du_add=(dp / hw).contiguous()), means)
    return BwdOut(dz, dskip, sums)


def _backward_post(spec, dout, x, factor, W, wd, filt, saved: Saved, grads: _Grads, need_x,
                   sites=None):
    k = len(spec.convs)
    zs, last = saved.zs, saved.bns[-1]
    batch_last = spec.bns[-1].batch_stats
    if spec.gate is not None:
        out = _gated_backward(spec, grads, dout, factor, saved)
        if spec.proj is not None:
            grads.set_bn(None, out.sums, row=2)
    elif spec.proj is not None:
        bn_d = saved.bn_d
        args = BwdArgs(dout, zs[-1], last.stats, saved.mask, 2, factor, 2, saved.zd,
                       bn_d.stats, batch_last, spec.proj_bn.batch_stats, None)
        out = bn_backward(spec.group, (last.count, bn_d.count), args,
                          grads.need_bn(k - 1) or grads.need_bn(None), sites, k - 1)
        grads.set_bn(None, out.sums, row=2)
    else:
        args = BwdArgs(dout, zs[-1], last.stats, saved.mask, 2, factor, int(spec.skip), None,
                       None, batch_last, False, None)
        out = bn_backward(spec.group, (last.count,), args, grads.need_bn(k - 1), sites, k - 1)
    grads.set_bn(k - 1, out.sums)
    dz, dskip = out.dz, out.dskip

    gin = None
    for i in reversed(range(k)):
        inp = x if i == 0 else _inner_act(spec, saved, i - 1, zs[i - 1], filt)
        gin, gw = _conv_backward(dz, inp, W[i], spec.convs[i], i > 0 or need_x, grads.need_w(i))
        grads.set_w(i, gw)
        if i > 0:
            if spec.aa is not None and spec.aa.after == i - 1:
                gin = aa_backward(gin, zs[i - 1], spec.aa, filt)  # z: the aa input's shape
            dz = _inner_bn_backward(spec, grads, i - 1, gin, zs[i - 1], saved.bns[i - 1],
                                    sites=sites)

    dx = gin if need_x else None
    if spec.proj is not None:
        xp = saved.xp if spec.proj_pool else x
        gxp, gwd = _conv_backward(dskip, xp, wd, spec.proj, need_x, grads.need_wd())
        grads.set_wd(gwd)
        if need_x:
            dx = dx + _pool_backward(gxp, x, spec.proj_pool)
    elif need_x and spec.skip:
        dx = dx + dskip
    return dx


def _backward_preact(spec, dout, x, factor, W, wd, saved: Saved, grads: _Grads, need_x,
                     sites=None):
    k = len(spec.convs)
    zs = saved.zs
    dout = dout.contiguous(memory_format=memory_format(zs[-1]))
    dz = dout * factor.to(dout.dtype).view(-1, 1, 1, 1) if factor is not None else dout
    need_first = need_x or grads.need_bn(0)
    a0 = _inner_act(spec, saved, 0, x)
    gin = None
    for i in reversed(range(k)):
        inp = a0 if i == 0 else _inner_act(spec, saved, i, zs[i - 1])
        gin, gw = _conv_backward(dz, inp, W[i], spec.convs[i], i > 0 or need_first,
                                 grads.need_w(i))
        grads.set_w(i, gw)
        if i > 0:
            dz = _inner_bn_backward(spec, grads, i, gin, zs[i - 1], saved.bns[i], sites=sites)
    if spec.proj is not None:
        xp = saved.xp if spec.proj_pool else a0
        gxp, gwd = _conv_backward(dout, xp, wd, spec.proj, need_first, grads.need_wd())
        grads.set_wd(gwd)
        if need_first:
            gin = gin + _pool_backward(gxp, a0, spec.proj_pool)
    if not need_first:
        return None
    identity = _same_layout(dout, x) if spec.proj is None and spec.skip else None
    dx = _inner_bn_backward(spec, grads, 0, _same_layout(gin, x), x, saved.bns[0], identity,
                            sites)
    return dx if need_x else None
