"""From modules to a checked BlockSpec: argument checking, and the plan cache.

A fused block's call derives a lot from its modules before any kernel runs: which norm is
in which mode, the conv hyper-parameters, the autocast dtype, whether autograd is needed,
and every check of shapes, dtypes and devices. All of that depends only on a short list
of facts (``_key``): the input's shape, dtype, device and layout, grad mode, autocast, each
norm's training flag, momentum, eps and track_running_stats, and each tensor's identity,
dtype, device and requires_grad. A block module keeps its last BlockPlan with that key
and rebuilds it only when the key changes, so a changed module is picked up on the next
call (new weights, ``.eval()``, ``.half()``, ``.to(channels_last)``, a new momentum or
eps) while an unchanged one costs a tuple comparison. Checks run when a plan is built, so
an error comes before any kernel runs and leaves every statistic untouched.
"""
from __future__ import annotations

import dataclasses
import operator
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import distributed, parity, straight
from .antialias import aa_filter, aa_out_hw, read_aa
from .errors import ShapeError
from .gate import GateParams, check_gate, gate_params, gate_sources, read_gate
from .function import BlockSpec, BNSpec, ConvSpec, FusedResidualBlock, block_forward
from .records import BNParams

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NO_NORM = BNParams(None, None, None, None, None)
_NO_GATE = GateParams(None, None, None, None)


# --------------------------------------------------------------------------------------
# Reading a norm layer
# --------------------------------------------------------------------------------------


_BatchNorm = nn.modules.batchnorm._BatchNorm
_FROZEN = ("weight", "bias", "running_mean", "running_var")


def raw_norm(bn: nn.Module) -> tuple:
    """The five tensors a norm layer holds, unfiltered: (weight, bias, running_mean,
    running_var, num_batches_tracked), None where it has none. TypeError for a layer that
    is neither a batch norm nor a frozen one."""
    if isinstance(bn, _BatchNorm):
        p, b = bn._parameters, bn._buffers
        return (p.get("weight"), p.get("bias"), b.get("running_mean"), b.get("running_var"),
                b.get("num_batches_tracked"))
    b = getattr(bn, "_buffers", {})
    if all(b.get(a) is not None for a in _FROZEN) and hasattr(bn, "eps"):
        return (b["weight"], b["bias"], b["running_mean"], b["running_var"], None)
    raise TypeError(f"norm layer must be a BatchNorm2d or FrozenBatchNorm2d, got {type(bn).__name__}")


def norm_spec(bn: nn.Module, raw: tuple) -> BNSpec:
    """How a norm layer behaves in this call, as nn.BatchNorm2d decides it
    (torch/nn/modules/batchnorm.py): batch statistics in training, or in eval when it has
    no running buffers; running buffers updated only in training with track_running_stats;
    a frozen batch norm (running statistics, no momentum) always in eval."""
    if not isinstance(bn, _BatchNorm):
        return BNSpec(False, False, None, float(bn.eps))
    training = bn.training
    # as _BatchNorm.forward: eval normalises with the buffers whenever they exist, even
    # after track_running_stats was switched off
    batch_stats = training or (raw[2] is None and raw[3] is None)
    update = training and bn.track_running_stats and raw[2] is not None
    return BNSpec(batch_stats=batch_stats, update=update,
                  momentum=None if bn.momentum is None else float(bn.momentum),
                  eps=float(bn.eps))


def params_for(raw: tuple, spec: BNSpec) -> BNParams:
    """The tensors a norm passes to the fused ops in this call: running statistics only
    where they are read or updated, num_batches_tracked only where it counts."""
    keep_running = spec.update or not spec.batch_stats
    return BNParams(raw[0], raw[1], raw[2] if keep_running else None,
                    raw[3] if keep_running else None, raw[4] if spec.update else None)


def read_norm(bn: nn.Module) -> tuple[BNSpec, BNParams]:
    """(norm_spec, params_for) of a norm layer."""
    raw = raw_norm(bn)
    spec = norm_spec(bn, raw)
    return spec, params_for(raw, spec)


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def _conv_out_hw(h: int, w: int, conv: nn.Conv2d):
    kh, kw = conv.weight.shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    return ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def _pool_out_hw(h: int, w: int, k: int):
    if k == 0:
        return h, w
    return (-(-(h - k) // k) + 1, -(-(w - k) // k) + 1)


def check_conv(name: str, conv, c_in: int, x: Tensor, act_dtype: torch.dtype, cast: bool):
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
    if conv.bias is not None:
        raise ValueError(f"{name} must have bias=False, got a bias of shape {tuple(conv.bias.shape)}")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"{name} must use explicit zero padding, got padding={conv.padding!r}, "
                         f"padding_mode={conv.padding_mode!r}")
    w = conv.weight
    if w.device != x.device:
        raise ValueError(f"{name}.weight must be on {x.device} like x, got {w.device}")
    if w.shape[1] * conv.groups != c_in:
        n = w.shape[1] * conv.groups
        raise ShapeError(f"{name}'s input", f"have {n} channels", f"{c_in}",
                         f"{name} expects {n} input channels, got an input with {c_in}")
    if w.dtype != act_dtype and not (cast and w.is_floating_point()):
        raise TypeError(f"{name}.weight must have dtype {act_dtype} like x, got {w.dtype}")


def check_sizes(name: str, p: BNParams, c: int) -> None:
    """Each of a norm's tensors has one value per channel (PyTorch raises RuntimeError
    here, fusedres's rule ValueError: ShapeError is both)."""
    for field, t in zip(("weight", "bias", "running_mean", "running_var"), p[:4]):
        if t is not None and t.shape != (c,):
            raise ShapeError(f"{name}.{field}", f"have shape ({c},) to match {c} channels",
                             f"{tuple(t.shape)}")


def check_norm(name: str, p: BNParams, c: int, x: Tensor, act_dtype: torch.dtype,
               spec: BNSpec, in_size: tuple):
    """``p``: the norm's tensors as read_norm gives them. Checks in PyTorch's order (one
    value per channel and eps in F.batch_norm, then the tensors in ATen)."""
    if spec.batch_stats and not spec.sync:  # synchronised: the other ranks' values count too
        n, _, h, w = in_size
        if n * h * w == 1:  # PyTorch's own message (torch.nn.functional._verify_batch_size)
            raise ShapeError(f"{name}'s input", "have more than 1 value per channel",
                             f"{torch.Size(in_size)}",
                             "Expected more than 1 value per channel when training, "
                             f"got input size {torch.Size(in_size)}")
    # PyTorch's own checks and messages (torch.nn.functional.batch_norm)
    if spec.batch_stats and spec.eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {spec.eps}")
    if spec.eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {spec.eps}")
    check_sizes(name, p, c)
    # an empty batch computes nothing: PyTorch then accepts any floating dtypes
    empty = 0 in in_size
    allowed = {act_dtype, torch.float32} if act_dtype in (torch.float16, torch.bfloat16) else {act_dtype}
    for field, t in zip(("weight", "bias", "running_mean", "running_var"), p[:4]):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name}.{field} must be on {x.device} like x, got {t.device}")
        if t.dtype not in allowed and not (empty and t.is_floating_point()):
            raise TypeError(f"{name}.{field} must have dtype {' or '.join(sorted(map(str, allowed)))} "
                            f"for {act_dtype} activations, got {t.dtype}")
    dtypes = {t.dtype for t in p[:4] if t is not None}
    if len(dtypes) > 1 and not empty:
        raise TypeError(f"{name}'s parameters and running statistics must share one dtype, "
                        f"got {sorted(map(str, dtypes))}")


def sync_specs(specs, norms, group):
    """Mark the BNs that synchronise: batch statistics in training mode, as nn.SyncBatchNorm."""
    if distributed.world_size(group) <= 1:
        return specs
    return [dataclasses.replace(s, sync=s.batch_stats and getattr(n, "training", False))
            for s, n in zip(specs, norms)]


# --------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockPlan:
    """What one block call derived from its modules, checked: run it with ``execute``."""
    spec: BlockSpec
    cast: Optional[torch.dtype]  # autocast dtype of the convolutions, or None
    grad: bool                   # through the autograd Function (else a plain forward)
    contiguous: bool             # x is in neither layout the kernels read: copy it


def build_plan(x: Tensor, convs: Sequence[nn.Conv2d], norms: Sequence[nn.Module],
               params: Sequence[BNParams], specs: Sequence[BNSpec], downsample, preact: bool,
               factor: Optional[Tensor], recompute: bool, cast: Optional[torch.dtype],
               skip: bool, process_group, aa: Optional[tuple] = None,
               gate: Optional[nn.Module] = None) -> tuple[BlockPlan, list]:
    """Check a block call and derive its plan; returns (plan, the flat tensor list)."""
    if x.dtype not in _FLOAT_TYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    act = cast or x.dtype  # dtype of the convolutions and of every BN after one
    n, c, h, w = x.shape
    dnorm = downsample[2] if downsample is not None else None
    group = distributed.block_group([*norms, dnorm], process_group)
    specs = sync_specs(list(specs), norms, group)

    aa_spec, filt = _read_aa(aa, preact, len(convs))
    gate_spec, gp = _read_gate(gate, preact)
    c_cur, hw = c, (h, w)
    if preact:
        check_norm("norms[0]", params[0], c, x, x.dtype, specs[0], (n, c, h, w))
    for i, conv in enumerate(convs):
        check_conv(f"convs[{i}]", conv, c_cur, x, act, cast is not None)
        hw = _conv_out_hw(*hw, conv)
        c_cur = conv.weight.shape[0]
        if not preact:
            check_norm(f"norms[{i}]", params[i], c_cur, x, act, specs[i], (n, c_cur, *hw))
            if aa_spec is not None and aa_spec.after == i:
                _check_aa_filter(filt, c_cur, x, act, cast is not None)
                hw = aa_out_hw(aa_spec, *hw)
        elif i + 1 < len(convs):
            check_norm(f"norms[{i + 1}]", params[i + 1], c_cur, x, act, specs[i + 1],
                       (n, c_cur, *hw))
    proj = proj_bn_spec = None
    pool = 0
    wd, pd = None, _NO_NORM
    if downsample is not None and not skip:
        raise ValueError("skip=False (the plain form) takes no downsample, got one")
    if downsample is not None:
        pool, dconv, dnorm = downsample
        check_conv("downsample conv", dconv, c, x, act, cast is not None)
        dhw = _conv_out_hw(*_pool_out_hw(h, w, pool), dconv)
        if dconv.weight.shape[0] != c_cur or dhw != hw:
            raise ShapeError("the shortcut's output", f"match the main path's [{c_cur}, "
                             f"{hw[0]}, {hw[1]}]", f"[{dconv.weight.shape[0]}, {dhw[0]}, {dhw[1]}]")
        proj = ConvSpec.of(dconv)
        wd = dconv.weight if cast is None else dconv.weight.to(cast)
        if dnorm is not None:
            proj_bn_spec, pd = read_norm(dnorm)
            proj_bn_spec = sync_specs([proj_bn_spec], [dnorm], group)[0]
            check_norm("downsample norm", pd, c_cur, x, act, proj_bn_spec, (n, c_cur, *hw))
        elif not preact:
            raise ValueError("a post-activation block's projection shortcut needs a norm layer")
    elif skip and (c_cur != c or hw != (h, w)):
        raise ShapeError("the main path's output", f"keep the shape [{c}, {h}, {w}] for an "
                         "identity shortcut (else pass a downsample)",
                         f"[{c_cur}, {hw[0]}, {hw[1]}]")
    _check_factor(factor, x)
    if gate_spec is not None:
        check_gate(gate_spec, gp, c_cur, x.device)

    spec = BlockSpec(preact=preact, convs=tuple(ConvSpec.of(cv) for cv in convs),
                     bns=tuple(specs), proj=proj, proj_pool=pool, proj_bn=proj_bn_spec,
                     recompute=recompute, skip=skip, aa=aa_spec, gate=gate_spec,
                     group=group if any(b.sync for b in (*specs, proj_bn_spec) if b) else None)
    weights = [cv.weight if cast is None else cv.weight.to(cast) for cv in convs]
    # the gate's tensors uncast: it runs in the statistics dtype, as the BNs do
    tensors = [*weights, *[t for p in params for t in p], wd, *pd, _cast(filt, cast), *gp]
    grad = torch.is_grad_enabled() and (
        x.requires_grad or any(t is not None and t.requires_grad for t in tensors)
        or (factor is not None and factor.requires_grad))
    contiguous = not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
    return BlockPlan(spec, cast, grad, contiguous), tensors


def _read_aa(aa: Optional[tuple], preact: bool, k: int):
    """(AASpec, blur filter) of ``aa`` = (after, module), or (None, None)."""
    if aa is None:
        return None, None
    after, module = aa
    if preact:
        raise ValueError("aa (an anti-aliasing step) is served in post-activation blocks "
                         "only, got preact=True")
    if not 0 <= after < k - 1:
        raise ValueError(f"aa must follow an inner activation, 0 to {k - 2}, got after={after}")
    return read_aa(module, after)


def _read_gate(gate: Optional[nn.Module], preact: bool):
    """(GateSpec, GateParams) of ``gate``, or (None, no tensors)."""
    if gate is None:
        return None, _NO_GATE
    if preact:
        raise ValueError("gate (squeeze-excite / ECA) is served in post-activation blocks "
                         "only, got preact=True")
    return read_gate(gate)


def _check_aa_filter(filt: Optional[Tensor], c: int, x: Tensor, act: torch.dtype, cast: bool):
    if filt is None:
        return
    if filt.shape[0] not in (1, c):
        raise ValueError(f"the aa layer's filter must have 1 or {c} channels, got {filt.shape[0]}")
    if filt.device != x.device:
        raise ValueError(f"the aa layer's filter must be on {x.device} like x, got {filt.device}")
    if filt.dtype != act and not cast:
        raise TypeError(f"the aa layer's filter must have dtype {act} like x, got {filt.dtype}")


def _cast(t: Optional[Tensor], cast: Optional[torch.dtype]) -> Optional[Tensor]:
    return t if t is None or cast is None else t.to(cast)


def _check_factor(factor: Optional[Tensor], x: Tensor) -> None:
    if factor is None:
        return
    if factor.shape != (x.shape[0],):
        raise ShapeError("drop_factor", f"have shape ({x.shape[0]},)", f"{tuple(factor.shape)}")
    if factor.device != x.device:
        raise ValueError(f"drop_factor must be on {x.device} like x, got {factor.device}")


def execute(plan: BlockPlan, x: Tensor, factor: Optional[Tensor], tensors) -> Tensor:
    """Run a block call whose plan (and so every check) holds for these arguments."""
    if plan.contiguous:
        x = x.contiguous()
    if not plan.grad:
        return block_forward(plan.spec, x, factor, tensors, save=False)[0]
    prog = straight.program(plan.spec, x, True)
    if prog is not None:  # the common block: straight-line, its own autograd Function
        return prog.apply(x, factor, tensors)
    return FusedResidualBlock.apply(plan.spec, x, factor, *tensors)


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    dev_type = x.device.type
    if dev_type == "meta":  # (torch has no autocast state for it: the checks then say more)
        return None
    if torch.is_autocast_enabled(dev_type) and x.is_floating_point():
        return torch.get_autocast_dtype(dev_type)
    return None


def _check_x(x, n_convs: int, n_norms: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ShapeError("x", "be 4-D [N, C, H, W]", f"{x.dim()}-D with shape {tuple(x.shape)}")
    if n_convs not in (2, 3) or n_norms != n_convs:
        raise ValueError(f"a block needs 2 or 3 convs and one norm per conv, got {n_convs} "
                         f"convs and {n_norms} norms")


def fused_residual_block(x: Tensor, convs: Sequence[nn.Conv2d], norms: Sequence[nn.Module],
                         downsample: Optional[tuple] = None, preact: bool = False,
                         drop_factor: Optional[Tensor] = None, recompute: bool = False,
                         skip: bool = True, process_group=None,
                         aa: Optional[tuple] = None,
                         gate: Optional[nn.Module] = None) -> Tensor:
    """Run one residual block through the fused kernels.

    Args:
        x: [N, C, H, W] input, NCHW or channels_last (the output keeps its memory format).
        convs: the main path's bias-free convolutions, 2 (basic) or 3 (bottleneck).
        norms: one norm layer per conv (nn.BatchNorm2d or a subclass, or torchvision's
            FrozenBatchNorm2d): after each conv, or before each conv when ``preact``.
            Each follows its own training flag, momentum and eps.
        downsample: the projection shortcut as (pool, conv, norm): ``pool`` 0 or the
            kernel of an average pool before the conv (timm's avg_down), ``norm`` None for
            pre-activation blocks. None for the identity shortcut.
        preact: pre-activation (ResNet v2) block, no ReLU after the add.
        drop_factor: optional [N] per-sample factor on the residual branch (stochastic depth).
        recompute: recompute the inner activations in the backward instead of saving them.
        skip: False for the plain form, the same block without its shortcut (as in the
            plain networks of the degradation experiment); ``downsample`` must then be None.
        process_group: synchronise the batch statistics of every norm in training mode
            over this torch.distributed group, as nn.SyncBatchNorm does. By default the
            norms decide: nn.SyncBatchNorm norms synchronise over their own group (all of a
            block's norms must then be SyncBatchNorm, with one group), others do not. No
            collective runs in eval mode or with one rank (fusedres.distributed).
        aa: (i, module): an anti-aliasing step after inner activation i of a
            post-activation block (timm's ``aa``: nn.AvgPool2d or BlurPool2d), run in its
            functional form (fusedres.antialias); the next conv then has stride 1.
        gate: a squeeze-excite or ECA module (timm's SEModule / EcaModule) on the last
            BN's output, before stochastic depth and the add (fusedres.gate).

    Under autocast, x and the conv weights are cast to the autocast dtype here, and batch
    norm keeps its parameters and statistics in their own dtype. Each call checks and
    plans afresh; the fused modules cache their plan (see ``run_module``)."""
    _check_x(x, len(convs), len(norms))
    if parity.needs_composite():  # forward AD, vmap: the plain modules' own path
        return parity.composite_block(x, convs, norms, downsample, preact, drop_factor, skip,
                                      process_group, aa, gate)
    read = [read_norm(nm) for nm in norms]
    specs, params = [r[0] for r in read], [r[1] for r in read]
    cast = _autocast_dtype(x)
    if cast is None:
        plan, tensors = build_plan(x, convs, norms, params, specs, downsample, preact,
                                   drop_factor, recompute, None, skip, process_group, aa,
                                   gate)
        return execute(plan, x, drop_factor, tensors)
    # As eager under autocast: convolutions in the autocast dtype, batch norm in the dtype
    # of its input. A pre-activation block's first BN sees x itself, and its identity
    # shortcut adds x at full precision.
    with torch.autocast(x.device.type, enabled=False):
        xc = x if preact else x.to(cast)
        plan, tensors = build_plan(xc, convs, norms, params, specs, downsample, preact,
                                   drop_factor, recompute, cast, skip, process_group, aa,
                                   gate)
        return execute(plan, xc, drop_factor, tensors)


# --------------------------------------------------------------------------------------
# The modules' path: the same, with the plan cached on the block
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Cached:
    ds_key: tuple           # the downsample module and its children, by identity
    parts: Optional[tuple]  # split_downsample of it
    key: tuple              # everything else the plan depends on (see run_module)
    plan: BlockPlan
    hit: Optional["_Hit"] = None  # the fast check of a repeat call, made with the plan
    #                               (None under autocast, or where the list is not the modules')


_ATTRS = operator.attrgetter("dtype", "device", "requires_grad")


@dataclass(frozen=True)
class _Hit:
    """What a repeat call must find unchanged to reuse a plan's flat tensor list as it
    stands: the facts of _Cached.key, read without building it (C-level maps over
    precomputed lists). ``modules`` are the block's children by name; ``dicts`` and
    ``keys`` say where each tensor was read from (a module's _parameters or _buffers),
    so a new Parameter or buffer is seen."""
    x_facts: tuple
    call_facts: tuple
    names: tuple
    modules: tuple
    ds_children: tuple      # the downsample's own children (a new norm in it is a new plan)
    norms: tuple
    dicts: tuple            # with ``keys``: where each tensor of ``held`` is read from
    keys: tuple
    held: tuple             # the tensors as read, by identity (None where a module holds
    #                         none; a part the block lacks is not here: ``modules`` sees it)
    present: tuple          # those that are not None
    attrs: list             # their _ATTRS
    tensors: list           # the flat list execute() takes
    gate_children: tuple = ()  # the gate's children (fc1, fc2, conv...), whose
    #                            parameters the list holds
    device_type: str = ""            # x's (whose autocast state the plan assumes off)
    # each norm's _norm_state read without a Python call per norm: its class, and its
    # attributes as dict.get of its __dict__ reads them
    norm_types: tuple = ()
    norm_dicts: tuple = ()
    norm_keys: tuple = ()
    norm_values: list = dataclasses.field(default_factory=list)
    # the downsample's and the gate's child dicts (None without one: ``modules`` then
    # sees one appear), so their children are read without a call
    ds_modules: Optional[dict] = None
    gate_modules: Optional[dict] = None
    # whether torch.distributed was initialised, where a norm is a sync norm (whose group
    # it decides: distributed.block_group); None: no norm is, and the plan is the same
    dist_initialised: Optional[bool] = None

    def holds(self, block_mods: dict, x: Tensor, factor: Optional[Tensor], recompute) -> bool:
        """The plan holds for this call (made without autocast: one under autocast fails)."""
        return ((x.shape, x.stride(), x.dtype, x.device, x.requires_grad) == self.x_facts
                and not torch.is_autocast_enabled(self.device_type)
                and (torch.is_grad_enabled(), factor is None, recompute) == self.call_facts
                and (self.dist_initialised is None
                     or distributed.is_initialised() is self.dist_initialised)
                and all(map(operator.is_, map(block_mods.get, self.names), self.modules))
                and (self.ds_modules is None
                     or tuple(self.ds_modules.values()) == self.ds_children)
                and all(map(operator.is_, map(type, self.norms), self.norm_types))
                and list(map(dict.get, self.norm_dicts, self.norm_keys)) == self.norm_values
                and all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.held))
                and list(map(_ATTRS, self.present)) == self.attrs
                and (self.gate_modules is None
                     or tuple(self.gate_modules.values()) == self.gate_children))


def _children(m) -> tuple:
    return tuple(m._modules.values()) if isinstance(m, nn.Module) else ()


def _x_facts(x: Tensor) -> tuple:  # (holds reads the same, inline)
    # x.device, not get_device(): that is -1 for the CPU and the meta device alike
    return (x.shape, x.stride(), x.dtype, x.device, x.requires_grad)


def _sources(convs, all_norms, parts, aa_mod, gate_mod) -> tuple:
    """(dict, name) of every tensor of the flat list, in Slots order (None: no source)."""
    out = [(cv._parameters, "weight") for cv in convs]
    k = len(convs)
    for nm in all_norms[:k]:
        out.extend(_norm_sources(nm))
    dconv = parts[1] if parts is not None else None
    out.append((dconv._parameters, "weight") if dconv is not None else None)
    if len(all_norms) > k:
        out.extend(_norm_sources(all_norms[k]))
    else:
        out.extend([None] * len(BNParams._fields))
    # (a blur pool's filter buffer; an avg pool has none)
    out.append((aa_mod._buffers, "filt") if aa_mod is not None and aa_filter(aa_mod) is not None
               else None)
    out.extend(gate_sources(gate_mod) if gate_mod is not None
               else [None] * len(GateParams._fields))
    return tuple(out)


def _norm_sources(nm: nn.Module) -> list:
    if isinstance(nm, _BatchNorm):
        p, b = nm._parameters, nm._buffers
        return [(p, "weight"), (p, "bias"), (b, "running_mean"), (b, "running_var"),
                (b, "num_batches_tracked")]
    b = nm._buffers
    return [(b, "weight"), (b, "bias"), (b, "running_mean"), (b, "running_var"), None]


def _make_hit(block, x, factor, convs, all_norms, parts, aa_mod, gate_mod,
              tensors) -> Optional[_Hit]:
    """The fast check for this call's plan, or None where the flat list is not simply
    what the modules hold (a tensor the plan leaves out, such as an eval BN's
    num_batches_tracked, is read but kept as None)."""
    sources = _sources(convs, all_norms, parts, aa_mod, gate_mod)
    if len(sources) != len(tensors):
        return None
    held = []
    for src, t in zip(sources, tensors):
        cur = src[0].get(src[1]) if src is not None else None
        if t is not None and cur is not t:
            return None
        held.append(cur)
    # the parts of the flat list the plan filters (running statistics a BN does not read)
    # are checked by identity like the rest, and stay as the plan has them
    # (a slot with no source, an absent part, is None on every call: nothing to check)
    kept = [(s, t) for s, t in zip(sources, held) if s is not None]
    srcs = [s for s, _ in kept]
    present = tuple(t for t in held if t is not None)
    layout = block._fused_layout
    names = tuple(n for n in (*layout.convs, *layout.norms, "downsample",
                              *((layout.aa,) if layout.aa else ()),
                              *((layout.gate,) if layout.gate else ())))
    mods = block._modules
    norm_dicts = tuple(nm.__dict__ for nm in all_norms for _ in _NORM_ATTRS)
    norm_keys = _NORM_ATTRS * len(all_norms)
    ds = mods.get("downsample")
    sync = any(map(distributed.is_sync_norm, all_norms))
    return _Hit(_x_facts(x), (torch.is_grad_enabled(), factor is None, block.recompute),
                names, tuple(mods.get(n) for n in names), _children(mods.get("downsample")),
                tuple(all_norms), tuple(d for d, _ in srcs),
                tuple(n for _, n in srcs), tuple(t for _, t in kept), present,
                list(map(_ATTRS, present)),
                list(tensors), _children(gate_mod), x.device.type,
                tuple(map(type, all_norms)), norm_dicts, norm_keys,
                list(map(dict.get, norm_dicts, norm_keys)),
                ds._modules if isinstance(ds, nn.Module) else None,
                gate_mod._modules if isinstance(gate_mod, nn.Module) else None,
                distributed.is_initialised() if sync else None)


#: block module -> its last _Cached plan (weak: a deleted block takes its plan with it).
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


_NORM_ATTRS = ("training", "momentum", "eps", "track_running_stats")


def _norm_state(norm: nn.Module) -> tuple:
    d = norm.__dict__
    return (type(norm), *map(d.get, _NORM_ATTRS))


def _tensor_state(t: Optional[Tensor]):
    # identity, and what .half() / .to() / .requires_grad_() change while keeping it
    return None if t is None else (id(t), t.dtype, t.device, t.requires_grad)


def run_module(block: nn.Module, x: Tensor, split_downsample, factor: Optional[Tensor]) -> Tensor:
    """The forward of a fused block module (fusedres.modules._FusedMixin): the modules its
    BlockLayout names, through the block's cached plan, rebuilt whenever its key changes.
    The tensors themselves are read afresh every call."""
    if torch.compiler.is_compiling():  # traced once per graph: no cache to guard on
        layout = block._fused_layout
        mods = block._modules
        ds = mods.get("downsample", block.__dict__.get("downsample"))
        return fused_residual_block(x, [mods[n] for n in layout.convs],
                                    [mods[n] for n in layout.norms],
                                    split_downsample(ds, layout.preact), layout.preact,
                                    factor, block.recompute, aa=_aa_of(block, layout, mods),
                                    gate=_gate_of(layout, mods))
    composite = parity.needs_composite()
    cached = _PLANS.get(block)
    # the repeat call: every fact the plan rests on read the cheap way, the flat tensor
    # list reused as it stands (its tensors are the modules' own, read in place). x's
    # facts equal to the plan's: x passed _check_x when the plan was made
    if (not composite and cached is not None and cached.hit is not None
            and cached.hit.holds(block._modules, x, factor, block.recompute)):
        if factor is not None:
            _check_factor(factor, x)
        return execute(cached.plan, x, factor, cached.hit.tensors)
    _check_x(x, len(block._fused_layout.convs), len(block._fused_layout.norms))
    if composite:  # forward AD, vmap: the plain modules' own path
        layout = block._fused_layout
        mods = block._modules
        ds = mods.get("downsample", block.__dict__.get("downsample"))
        return parity.composite_block(x, [mods[n] for n in layout.convs],
                                      [mods[n] for n in layout.norms],
                                      split_downsample(ds, layout.preact), layout.preact,
                                      factor, True, None, _aa_of(block, layout, mods),
                                      _gate_of(layout, mods))
    return _run_slow(block, cached, x, split_downsample, factor)


def _aa_of(block, layout, mods):
    aa_mod = mods.get(layout.aa) if layout.aa else None
    return None if aa_mod is None or isinstance(aa_mod, nn.Identity) else (layout.aa_after, aa_mod)


def _gate_of(layout, mods):
    gate = mods.get(layout.gate) if layout.gate else None
    return None if isinstance(gate, nn.Identity) else gate


def _run_slow(block, cached, x, split_downsample, factor):
    """run_module when the fast check fails: the key built in full, the plan rebuilt if
    it changed."""
    layout = block._fused_layout
    mods = block._modules
    convs = [mods[n] for n in layout.convs]
    norms = [mods[n] for n in layout.norms]
    ds = mods.get("downsample", block.__dict__.get("downsample"))
    aa = _aa_of(block, layout, mods)
    gate = _gate_of(layout, mods)
    ds_key = (id(ds), tuple(map(id, ds._modules.values())) if isinstance(ds, nn.Module) else ())
    if cached is not None and cached.ds_key == ds_key:
        parts = cached.parts
    else:
        parts = split_downsample(ds, layout.preact)
        cached = None
    all_norms = norms if parts is None or parts[2] is None else [*norms, parts[2]]
    raws = [raw_norm(nm) for nm in all_norms]
    conv_w = [cv._parameters.get("weight") for cv in convs]
    dw = parts[1]._parameters.get("weight") if parts is not None else None
    filt = aa_filter(aa[1]) if aa is not None else None
    gp = gate_params(gate) if gate is not None else _NO_GATE
    cast = _autocast_dtype(x)
    key = (x.shape, x.dtype, x.device, x.is_contiguous(),
           x.is_contiguous(memory_format=torch.channels_last), x.requires_grad,
           torch.is_grad_enabled(), cast, factor is None, block.recompute,
           distributed.is_initialised(), tuple(map(_norm_state, all_norms)),
           tuple(map(_tensor_state, conv_w)), _tensor_state(dw),
           tuple(_tensor_state(t) for raw in raws for t in raw),
           id(aa[1]) if aa is not None else None, _tensor_state(filt),  # the plan holds its AASpec
           id(gate), tuple(map(id, _children(gate))),  # ... and its GateSpec
           tuple(map(_tensor_state, gp)))
    if cached is not None and cached.key != key:
        cached = None
    if cast is not None:
        with torch.autocast(x.device.type, enabled=False):
            return _run_cached(block, cached, ds_key, parts, key,
                               x if layout.preact else x.to(cast), convs, norms, raws, conv_w,
                               dw, factor, None, cast, aa, filt, gate, gp)
    return _run_cached(block, cached, ds_key, parts, key, x, convs, norms, raws, conv_w, dw,
                       factor, all_norms, None, aa, filt, gate, gp)


def _run_cached(block, cached, ds_key, parts, key, x, convs, norms, raws, conv_w, dw, factor,
                all_norms, cast, aa, filt, gate, gp):
    layout = block._fused_layout
    k = len(convs)
    if cached is None:
        specs = [norm_spec(nm, raw) for nm, raw in zip(norms, raws)]
        params = [params_for(raw, sp) for raw, sp in zip(raws, specs)]
        plan, tensors = build_plan(x, convs, norms, params, specs, parts, layout.preact,
                                   factor, block.recompute, cast, True, None, aa, gate)
        plan = dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, sites={}))
        _PLANS[block] = _Cached(ds_key, parts, key, plan, _hit_for(
            block, x, factor, convs, all_norms, parts, aa, gate, cast, tensors))
        return execute(plan, x, factor, tensors)
    _check_factor(factor, x)
    spec = cached.plan.spec
    if cast is not None:
        conv_w = [w.to(cast) for w in conv_w]
        dw = dw.to(cast) if dw is not None else None
    tensors = list(conv_w)
    for raw, sp in zip(raws, spec.bns):
        tensors.extend(params_for(raw, sp))
    tensors.append(dw)
    if len(raws) > k:  # the projection's norm
        tensors.extend(params_for(raws[k], spec.proj_bn))
    else:
        tensors.extend(_NO_NORM)
    tensors.append(_cast(filt, cast))
    tensors.extend(gp)
    return execute(cached.plan, x, factor, tensors)


def _hit_for(block, x, factor, convs, all_norms, parts, aa, gate, cast,
             tensors) -> Optional[_Hit]:
    if cast is not None:  # autocast casts the weights every call: no list to reuse
        return None
    return _make_hit(block, x, factor, convs, all_norms, parts,
                     aa[1] if aa is not None else None, gate, tensors)
