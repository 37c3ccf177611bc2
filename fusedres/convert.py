"""convert(model) / revert(model): fuse the ResNet blocks of an existing model in place.

A converted block stays the same object with the same submodules, so its parameters,
buffers, state_dict keys, hooks on the block itself and optimizer references are all
untouched: only its class changes, to a subclass of its own class (made once per class)
whose forward runs FusedResidualBlock. ``isinstance(block, torchvision...Bottleneck)``
still holds, and revert() sets the class back. A fused instance pickles (and deep-copies)
as "the fused subclass of <original class>", so nothing refers to the generated class by
name.

Served: torchvision's BasicBlock / Bottleneck (ResNet, ResNeXt, wide ResNet), timm's ResNet
BasicBlock / Bottleneck (with the avg-pool shortcut of the "d"/"t" variants, stochastic
depth, the anti-aliasing ``aa`` layer of resnetaa*/resnetblur*: fusedres.antialias, and
the squeeze-excite / ECA gate ``se`` of seresnet*/ecaresnet*/resnetrs*: fusedres.gate),
timm's ResNetV2 PreActBasic / PreActBottleneck with BatchNormAct2d + ReLU, and
fusedres.reference's blocks. Norms may be nn.BatchNorm2d, timm's BatchNormAct2d, a
frozen batch norm (torchvision's FrozenBatchNorm2d, timm's FrozenBatchNormAct2d) or
nn.SyncBatchNorm (all of a block's norms, one process group: fusedres.distributed), and
every nn.SyncBatchNorm outside a block becomes a FusedSyncBatchNorm, which also runs on CPUs.
"""
from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from torch import nn

from .antialias import aa_problem
from .distributed import sync_problem
from .gate import gate_problem
from .modules import (BlockLayout, FusedBasicBlock, FusedBottleneck, FusedPreActBlock,
                      FusedPreActBottleneck, FusedSyncBatchNorm, _FusedMixin, split_downsample)

__all__ = ["LAYOUTS", "Summary", "convert", "fused_blocks", "fused_class", "is_fused", "revert",
           "summary", "why_not_fused"]

# convert() reports what it did here, as an INFO record (a warning means a block was left
# unfused): logging.basicConfig(level=logging.INFO) or a handler on "fusedres" shows it.
logger = logging.getLogger("fusedres")

_TIMM_ABSENT = ("drop_block",)

#: (module, qualname) of each block class convert() serves -> where its parts are.
LAYOUTS: dict = {
    ("torchvision.models.resnet", "BasicBlock"):
        BlockLayout(("conv1", "conv2"), ("bn1", "bn2"), relus=("relu",)),
    ("torchvision.models.resnet", "Bottleneck"):
        BlockLayout(("conv1", "conv2", "conv3"), ("bn1", "bn2", "bn3"), relus=("relu",)),
    ("timm.models.resnet", "BasicBlock"):
        BlockLayout(("conv1", "conv2"), ("bn1", "bn2"), relus=("act1", "act2"),
                    absent=_TIMM_ABSENT, drop_path="drop_path", aa="aa", aa_after=0, gate="se"),
    ("timm.models.resnet", "Bottleneck"):
        BlockLayout(("conv1", "conv2", "conv3"), ("bn1", "bn2", "bn3"),
                    relus=("act1", "act2", "act3"), absent=_TIMM_ABSENT, drop_path="drop_path",
                    aa="aa", aa_after=1, gate="se"),
    ("timm.models.resnetv2", "PreActBasic"):
        BlockLayout(("conv1", "conv2"), ("norm1", "norm2"), preact=True, norm_act=True,
                    drop_path="drop_path"),
    ("timm.models.resnetv2", "PreActBottleneck"):
        BlockLayout(("conv1", "conv2", "conv3"), ("norm1", "norm2", "norm3"), preact=True,
                    norm_act=True, drop_path="drop_path"),
}

# fusedres's own plain blocks turn into the named fused classes.
_NAMED = {cls._fused_original: cls for cls in
          (FusedBasicBlock, FusedBottleneck, FusedPreActBlock, FusedPreActBottleneck)}
for _orig, _fused in _NAMED.items():
    LAYOUTS[(_orig.__module__, _orig.__qualname__)] = _fused._fused_layout

_FUSED_CLASSES: dict = {}

_ABSENT_WHAT = {"se": "attention layer", "attn": "attention layer",
                "aa": "anti-aliasing layer", "drop_block": "DropBlock"}


def _layout_of(cls: type) -> Optional[BlockLayout]:
    return LAYOUTS.get((cls.__module__, cls.__qualname__))


class _ConvertedBlock(_FusedMixin):
    """Base of the fused subclasses convert() makes."""

    def __reduce_ex__(self, protocol):
        # Pickle as "fused subclass of the original class": the generated class has no
        # importable name, the original class has.
        _, _, *rest = object.__reduce_ex__(self, 2)
        return (_new_fused, (self._fused_original,), *rest)


def fused_class(original: type) -> type:
    """The fused subclass of a block class convert() serves (made once per class)."""
    if original in _NAMED:
        return _NAMED[original]
    cls = _FUSED_CLASSES.get(original)
    if cls is None:
        layout = _layout_of(original)
        if layout is None:
            raise TypeError(f"fusedres cannot fuse {original.__module__}.{original.__qualname__}")
        name = f"Fused{original.__name__}"
        cls = type(name, (_ConvertedBlock, original), {
            "__module__": __name__, "__qualname__": name,
            "__doc__": f"{original.__module__}.{original.__qualname__} with its batch norms, "
                       "ReLUs and residual add fused (made by fusedres.convert).",
            "_fused_layout": layout, "_fused_original": original})
        _FUSED_CLASSES[original] = cls
    return cls


def _new_fused(original: type):
    cls = fused_class(original)
    return cls.__new__(cls)


# --------------------------------------------------------------------------------------
# What a block must look like to be fused
# --------------------------------------------------------------------------------------


def _qualified(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _is_class(m: nn.Module, module: str, name: str) -> bool:
    return type(m).__module__ == module and type(m).__qualname__ == name


def _act_problem(name: str, act: nn.Module, relu: bool) -> Optional[str]:
    if relu and type(act) is not nn.ReLU:
        return f"{name} is {type(act).__name__}, not ReLU"
    if not relu and not isinstance(act, nn.Identity):
        return f"{name} applies {type(act).__name__} before the residual add"
    return None


def _norm_problem(name: str, norm: nn.Module, relu: bool) -> Optional[str]:
    """Why ``norm`` cannot be fused; ``relu``: it must carry a ReLU (timm BatchNormAct2d)."""
    if norm is None:
        return f"{name} is missing"
    with_act = (_is_class(norm, "timm.layers.norm_act", "BatchNormAct2d")
                or _is_class(norm, "timm.layers.norm_act", "FrozenBatchNormAct2d"))
    plain = (type(norm) in (nn.BatchNorm2d, nn.SyncBatchNorm, FusedSyncBatchNorm)
             or _is_class(norm, "torchvision.ops.misc", "FrozenBatchNorm2d"))
    if not (with_act or plain):
        return f"{name} is {type(norm).__name__}, not a batch norm"
    if with_act:
        if not isinstance(norm.drop, nn.Identity):
            return f"{name} has a {type(norm.drop).__name__} after it"
        return _act_problem(f"{name}.act", norm.act, relu)
    if relu:
        return f"{name} is {type(norm).__name__} with no ReLU after it"
    return None


def _conv_problem(name: str, conv: nn.Module) -> Optional[str]:
    if not isinstance(conv, nn.Conv2d):
        return f"{name} is {type(conv).__name__}, not an nn.Conv2d"
    if type(conv).forward is not nn.Conv2d.forward or (
            type(conv)._conv_forward is not nn.Conv2d._conv_forward):
        return f"{name} is {type(conv).__name__}, a Conv2d with its own forward"
    if conv.bias is not None:
        return f"{name} has a bias"
    if conv.padding_mode != "zeros":
        return f"{name} has padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"{name} has padding={conv.padding!r}"
    return None


def _downsample_problem(block: nn.Module, layout: BlockLayout) -> Optional[str]:
    ds = getattr(block, "downsample", None)
    try:
        parts = split_downsample(ds, layout.preact)
    except TypeError as e:
        return f"downsample: {e}"
    if parts is None:
        return None
    _, conv, norm = parts
    problem = _conv_problem("downsample conv", conv)
    if problem is None and norm is not None:
        if layout.preact:
            return f"the pre-activation shortcut has a norm ({type(norm).__name__})"
        problem = _norm_problem("downsample norm", norm, relu=False)
    return problem


def _drop_path_problem(block: nn.Module, layout: BlockLayout) -> Optional[str]:
    if layout.drop_path is None:
        return None
    dp = getattr(block, layout.drop_path, None)
    if dp is None or isinstance(dp, (nn.Identity, int, float)):
        return None
    if type(dp).__name__ == "DropPath" and hasattr(dp, "drop_prob"):
        return None
    return f"{layout.drop_path} is {type(dp).__name__}, not timm's DropPath"


def why_not_fused(block: nn.Module) -> Optional[str]:
    """Why convert() would leave ``block`` alone, or None if it fuses it."""
    layout = _layout_of(type(block))
    if layout is None:
        return f"{_qualified(block)} is not a ResNet block fusedres knows"
    problems = []
    for name in layout.absent:
        m = getattr(block, name, None)
        if m is not None and not isinstance(m, nn.Identity):
            problems.append(f"{_ABSENT_WHAT.get(name, name)} {name} ({type(m).__name__})")
    aa = getattr(block, layout.aa, None) if layout.aa else None
    if aa is not None and not isinstance(aa, nn.Identity):
        problems.append(aa_problem(aa, layout.aa))
    gate = getattr(block, layout.gate, None) if layout.gate else None
    if gate is not None and not isinstance(gate, nn.Identity):
        problems.append(gate_problem(gate, layout.gate))
    for name in layout.relus:
        problems.append(_act_problem(name, getattr(block, name, None), relu=True))
    for name in layout.convs:
        problems.append(_conv_problem(name, getattr(block, name, None)))
    for name in layout.norms:
        problems.append(_norm_problem(name, getattr(block, name, None), relu=layout.norm_act))
    problems.append(_downsample_problem(block, layout))
    problems.append(_drop_path_problem(block, layout))
    if not any(problems):
        parts = split_downsample(getattr(block, "downsample", None), layout.preact)
        problems.append(sync_problem([getattr(block, n) for n in layout.norms]
                                     + [parts[2] if parts else None]))
    problems = [p for p in problems if p]
    return "; ".join(problems) if problems else None


# --------------------------------------------------------------------------------------
# convert / revert
# --------------------------------------------------------------------------------------


def is_fused(m: nn.Module) -> bool:
    """True for a block that runs the fused forward (converted or built fused)."""
    return isinstance(m, _FusedMixin)


def fused_blocks(model: nn.Module) -> list:
    """Names of the fused blocks of ``model``."""
    return [name for name, m in model.named_modules() if is_fused(m)]


# Class names that look like a residual block: what summary() lists as not known to fusedres.
_BLOCK_LIKE = re.compile(r"block|bottle|neck", re.IGNORECASE)


@dataclass(frozen=True)
class Summary:
    """What fusedres makes of a model's residual blocks; ``str()`` is one readable line.

    ``fused``: original block class name -> how many are fused; ``unfused``: (module name,
    class name, reason) for each block of a known kind left unfused; ``unknown``: block-like
    classes fusedres does not serve -> count (e.g. timm's Res2Net ``Bottle2neck``)."""
    model: str
    fused: dict
    unfused: tuple
    unknown: dict

    @property
    def num_fused(self) -> int:
        return sum(self.fused.values())

    @property
    def num_blocks(self) -> int:
        """Residual blocks of a kind fusedres knows, fused or not."""
        return self.num_fused + len(self.unfused)

    def __str__(self) -> str:
        by_class = ", ".join(f"{n} x{c}" for n, c in self.fused.items())
        if self.num_blocks == 0:
            text = f"fusedres: {self.model} has no residual block of a kind fusedres fuses"
        else:
            text = (f"fusedres: {self.num_fused} of {self.num_blocks} residual blocks of "
                    f"{self.model} fused" + (f" ({by_class})" if by_class else ""))
        if self.unfused:
            text += "; unfused: " + "; ".join(f"{name or '<model>'} ({cls}): {why}"
                                              for name, cls, why in self.unfused)
        if self.unknown:
            text += ("; block classes fusedres does not serve: "
                     + ", ".join(f"{n} x{c}" for n, c in self.unknown.items()))
        return text


def summary(model: nn.Module) -> Summary:
    """How many of ``model``'s residual blocks are fused, by class, and why the others are
    not (the record convert() logs to ``logging.getLogger("fusedres")``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fused, unfused, unknown = Counter(), [], Counter()
    for name, m in model.named_modules():
        if is_fused(m):
            original = type(m).__dict__.get("_fused_original") or type(m)
            fused[original.__name__] += 1
        elif _layout_of(type(m)) is not None:
            unfused.append((name, type(m).__name__, why_not_fused(m)))
        elif _BLOCK_LIKE.search(type(m).__name__) and not isinstance(
                m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            unknown[type(m).__name__] += 1
    return Summary(type(model).__name__, dict(fused), tuple(unfused), dict(unknown))


def convert(model: nn.Module) -> nn.Module:
    """Replace, in place, every ResNet block of ``model`` that fusedres can serve with its
    fused equivalent, sharing its parameters and buffers; returns ``model``.

    Blocks already fused are left as they are (converting twice changes nothing). Blocks
    of a known kind that cannot be fused (an attention layer other than timm's SEModule or
    EcaModule, an anti-aliasing layer other than
    AvgPool2d or BlurPool2d, DropBlock, another activation or norm, a conv with a bias,
    ...) are left alone and named, with the reason, in one warning. A model with no ResNet block at all also warns. Every
    nn.SyncBatchNorm outside the blocks (and inside: blocks read their norms' parameters
    but never call them) becomes a FusedSyncBatchNorm, which runs on CPU tensors too.
    What it did (fusedres.summary(model)) goes to logging.getLogger("fusedres") at INFO."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.DataParallel):
        warnings.warn("fusedres.convert: nn.DataParallel is not supported; use "
                      "DistributedDataParallel (one process per GPU)", stacklevel=2)
    skipped, seen, norms = [], 0, 0
    for name, m in model.named_modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = FusedSyncBatchNorm
            norms += 1
            continue
        if is_fused(m):
            seen += 1
            continue
        if _layout_of(type(m)) is None:
            continue
        seen += 1
        reason = why_not_fused(m)
        if reason is not None:
            skipped.append(f"{name or '<model>'} ({type(m).__name__}): {reason}")
            continue
        m.__class__ = fused_class(type(m))
    if logger.isEnabledFor(logging.INFO):
        logger.info("%s", summary(model))
    if skipped:
        warnings.warn(f"fusedres.convert left {len(skipped)} block(s) unfused:\n  "
                      + "\n  ".join(skipped), stacklevel=2)
    elif seen == 0:
        changed = (f"only its {norms} SyncBatchNorm layer(s) became FusedSyncBatchNorm"
                   if norms else "the model is unchanged")
        warnings.warn(f"fusedres.convert found no ResNet block in {type(model).__name__}; "
                      f"{changed}", stacklevel=2)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Give every fused block of ``model`` its plain class back, in place; returns ``model``.

    Converted blocks get their original class; blocks built as fusedres.FusedBasicBlock
    etc. become the matching fusedres.reference block (plain PyTorch, same state_dict).
    Needed before TorchScript, ONNX export or anything else that must see the inner
    batch norms and ReLUs."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for m in model.modules():
        original = type(m).__dict__.get("_fused_original")  # blocks and FusedSyncBatchNorm
        if original is not None:
            m.__class__ = original
    return model

