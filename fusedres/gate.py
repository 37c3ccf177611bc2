"""Squeeze-excite and ECA gates inside a fused block: timm's ``se`` layer on [N, C].

In timm's BasicBlock/Bottleneck (seresnet*, seresnext*, ecaresnet*, ecaresnext*,
resnetrs*, seresnetaa*) the gate multiplies the last BN's output before the add. With
u = bn_k(z) = z*scale + shift and m = mean_hw z:

    p = mean_hw u = scale*m + shift                      [N, C]
    g = sigmoid(fc2(relu(fc1(p))))   (SEModule)   or   sigmoid(conv1d(p))   (EcaModule)
    out = relu(f_n * g[n, c] * u + skip)

The block pools z in the statistics pass it runs anyway (training: bn_stats_pool) or in
one pooling read (eval: bn_pool), runs the gate here as torch ops on [N, C] with the
module's own parameters (so its state_dict stays), and hands f*g to the epilogue as its
[N, C] factor. The backward (function.py) gets dg = f * sum_hw delta*u from per-sample
sums of the last BN's backward, and this file's ``gate_backward`` turns dg into dp and the
gate's parameter gradients, written out so that torch.compile traces plain aten ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GateSpec", "GateParams", "check_gate", "gate_backward", "gate_forward",
           "gate_params", "gate_problem", "gate_sources", "read_gate"]


@dataclass(frozen=True)
class GateSpec:
    """The gate on a block's last BN output: ``kind`` "se" or "eca"."""
    kind: str
    padding: int = 0           # ECA: the conv1d's zero padding over channels


class GateParams(NamedTuple):
    """The gate's tensors in the block's flat list. SE: fc1 and fc2 (1x1 Conv2d weights
    [R, C, 1, 1] / [C, R, 1, 1] and biases); ECA: the Conv1d weight [1, 1, k] as w1 (and
    its bias as b1), w2 and b2 None."""
    w1: Optional[Tensor]
    b1: Optional[Tensor]
    w2: Optional[Tensor]
    b2: Optional[Tensor]


_NO_GATE = GateParams(None, None, None, None)


def _is_class(m: nn.Module, module: str, name: str) -> bool:
    # that exact class: a subclass may have its own forward
    return type(m).__module__ == module and type(m).__qualname__ == name


def _is_sigmoid(m: nn.Module) -> bool:
    return type(m) is nn.Sigmoid or _is_class(m, "timm.layers.activations", "Sigmoid")


def _plain_1x1(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and tuple(conv.kernel_size) == (1, 1)
            and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (0, 0)
            and tuple(conv.dilation) == (1, 1) and conv.groups == 1)


def gate_problem(m: nn.Module, name: str = "se") -> Optional[str]:
    """Why the fused block cannot run ``m`` (its attribute ``name``) as its gate, or None."""
    what = f"attention layer {name} ({type(m).__name__})"
    if _is_class(m, "timm.layers.squeeze_excite", "SEModule"):
        if getattr(m, "add_maxpool", False):
            return f"{what} has add_maxpool=True"
        if not (_plain_1x1(m.fc1) and _plain_1x1(m.fc2)):
            return f"{what} has fc1/fc2 other than plain 1x1 nn.Conv2d"
        if not isinstance(m.bn, nn.Identity):
            return f"{what} has a norm layer ({type(m.bn).__name__}) in its MLP"
        if type(m.act) is not nn.ReLU:
            return f"{what} has act {type(m.act).__name__}, not ReLU"
        if not _is_sigmoid(m.gate):
            return f"{what} has gate {type(m.gate).__name__}, not a sigmoid"
        return None
    if _is_class(m, "timm.layers.eca", "EcaModule"):
        if m.conv2 is not None or m.act is not None:
            return f"{what} uses its MLP form (use_mlp=True)"
        c = m.conv
        k = c.kernel_size[0]
        if (type(c) is not nn.Conv1d or c.in_channels != 1 or c.out_channels != 1
                or tuple(c.stride) != (1,) or tuple(c.dilation) != (1,) or c.groups != 1
                or c.padding_mode != "zeros" or isinstance(c.padding, str)
                or tuple(c.padding) != ((k - 1) // 2,) or k % 2 != 1):
            return f"{what} has a conv other than Conv1d(1, 1, k odd, padding=(k-1)//2)"
        if not _is_sigmoid(m.gate):
            return f"{what} has gate {type(m.gate).__name__}, not a sigmoid"
        return None
    return f"{what} is neither timm's SEModule nor its EcaModule"


def gate_params(m: nn.Module) -> GateParams:
    """The tensors the gate reads this call (read afresh every call, like a BN's)."""
    return GateParams(*(None if src is None else src[0].get(src[1])
                        for src in gate_sources(m)))


def gate_sources(m: nn.Module) -> list:
    """(dict, name) that each of gate_params(m) is read from, in GateParams order (None
    where there is none): what the plan's fast check watches."""
    if _is_class(m, "timm.layers.eca", "EcaModule"):
        return [(m.conv._parameters, "weight"), (m.conv._parameters, "bias"), None, None]
    p1, p2 = m.fc1._parameters, m.fc2._parameters
    return [(p1, "weight"), (p1, "bias"), (p2, "weight"), (p2, "bias")]


def read_gate(m: nn.Module) -> tuple[GateSpec, GateParams]:
    """(GateSpec, GateParams) of a gate module; TypeError if it is not served."""
    problem = gate_problem(m)
    if problem is not None:
        raise TypeError(f"the block's gate cannot be fused: {problem}")
    if _is_class(m, "timm.layers.eca", "EcaModule"):
        return GateSpec("eca", int(m.conv.padding[0])), gate_params(m)
    return GateSpec("se"), gate_params(m)


def check_gate(spec: GateSpec, t: GateParams, c: int, device: torch.device) -> None:
    """The gate's tensors fit a last BN of ``c`` channels on ``device``."""
    if spec.kind == "se":
        if t.w1.shape[1] != c or t.w2.shape[0] != c or t.w2.shape[1] != t.w1.shape[0]:
            raise ValueError(f"the SE gate's fc1/fc2 must map {c} channels to R and back, got "
                             f"fc1 {tuple(t.w1.shape)}, fc2 {tuple(t.w2.shape)}")
    for field, v in zip(GateParams._fields, t):
        if v is None:
            continue
        if v.device != device:
            raise ValueError(f"the gate's {field} must be on {device} like x, got {v.device}")
        if not v.is_floating_point():
            raise TypeError(f"the gate's {field} must be floating point, got {v.dtype}")


def _mat(w: Tensor, dt: torch.dtype) -> Tensor:
    return w.reshape(w.shape[0], w.shape[1]).to(dt)


def _vec(b: Optional[Tensor], dt: torch.dtype) -> Optional[Tensor]:
    return None if b is None else b.to(dt)


def gate_forward(p: Tensor, spec: GateSpec, t: GateParams) -> tuple[Tensor, Tensor]:
    """(g, hidden) for pooled BN outputs p [N, C], in p's dtype (the statistics dtype):
    SE's hidden is fc1's pre-activation s1 [N, R] (its backward needs it), ECA's is empty.
    Plain differentiable torch ops, so parity's batched backward can reuse it."""
    dt = p.dtype
    if spec.kind == "se":
        s1 = F.linear(p, _mat(t.w1, dt), _vec(t.b1, dt))
        s2 = F.linear(torch.relu(s1), _mat(t.w2, dt), _vec(t.b2, dt))
        return torch.sigmoid(s2), s1
    s = F.conv1d(p.unsqueeze(1), t.w1.to(dt), _vec(t.b1, dt), 1, spec.padding)
    return torch.sigmoid(s.squeeze(1)), p.new_empty(0)


def gate_backward(dg: Tensor, p: Tensor, g: Tensor, hidden: Tensor, spec: GateSpec,
                  t: GateParams, need: GateParams) -> tuple[Tensor, GateParams]:
    """(dp, the gate's parameter gradients) from dg = dL/dg, all [N, C] in the statistics
    dtype; ``need`` (bools in GateParams order) says which gradients to form. Each
    gradient comes back in its parameter's dtype."""
    dt = p.dtype
    ds = dg * g * (1.0 - g)  # through the sigmoid
    if spec.kind == "se":
        h = torch.relu(hidden)
        w1, w2 = _mat(t.w1, dt), _mat(t.w2, dt)
        dw2 = ds.t().mm(h) if need.w2 else None
        db2 = ds.sum(0) if need.b2 and t.b2 is not None else None
        ds1 = torch.where(hidden > 0, ds.mm(w2), 0.0)
        dw1 = ds1.t().mm(p) if need.w1 else None
        db1 = ds1.sum(0) if need.b1 and t.b1 is not None else None
        dp = ds1.mm(w1)
        grads = (dw1, db1, dw2, db2)
    else:
        w = t.w1.to(dt)
        dp3, dw, db = torch.ops.aten.convolution_backward(
            ds.unsqueeze(1), p.unsqueeze(1), w, [1] if t.b1 is not None else None, [1],
            [spec.padding], [1], False, [0], 1,
            [True, bool(need.w1), bool(need.b1) and t.b1 is not None])
        dp = dp3.squeeze(1)
        grads = (dw, db, None, None)
    out = [None if gr is None else gr.reshape(v.shape).to(v.dtype)
           for gr, v in zip(grads, t)]
    return dp, GateParams(*out)
