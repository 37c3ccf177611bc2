"""Drop-in nn.Module blocks over FusedResidualBlock.

They subclass the plain-PyTorch blocks of fusedres.reference, which copy torchvision's
constructor, attribute names and errors, so state_dict keys match torchvision's and
``torchvision.models.resnet.ResNet(FusedBottleneck, [3, 4, 6, 3])`` builds a fused model.
Norm layers stay the modules they are; each follows its own ``.train()``/``.eval()``.

The forward is one generic function driven by a BlockLayout (which attribute holds which
conv and norm), so the same code serves these blocks and the torchvision and timm blocks
that fusedres.convert turns into fused ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from . import reference
from . import distributed, parity
from .batchnorm import fused_batch_norm
from .plan import check_sizes, run_module
from .records import BNParams


@dataclass(frozen=True)
class BlockLayout:
    """Where a block class keeps its parts, by attribute name."""
    convs: tuple                       # main-path convs in order
    norms: tuple                       # one norm per conv: after it, or before it if preact
    preact: bool = False               # pre-activation (ResNet v2): no ReLU after the add
    relus: tuple = ()                  # activation modules the fused block applies as ReLU
    absent: tuple = ()                 # optional layers that must be None or nn.Identity
    drop_path: Optional[str] = None    # a timm DropPath module, or a float drop rate
    norm_act: bool = False             # the norms carry the ReLU (timm's BatchNormAct2d)
    aa: Optional[str] = None           # an anti-aliasing layer (timm's aa), nn.Identity if none,
    aa_after: int = 0                  # ... applied to inner activation aa_after (0: the first)
    gate: Optional[str] = None         # an SE/ECA gate on the last BN's output (timm's se)


def _pool_kernel(pool: nn.Module) -> int:
    """0 for no pool, else k of AvgPool2d(k, k, ceil_mode=True, count_include_pad=False),
    the only pool the fused shortcut computes; TypeError for any other pool."""
    if type(pool) is not nn.AvgPool2d:
        raise TypeError(f"the shortcut's pool must be an nn.AvgPool2d, got {type(pool).__name__}")
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    k, s, p = pair(pool.kernel_size), pair(pool.stride), pair(pool.padding)
    if (k[0] != k[1] or s != k or p != (0, 0) or not pool.ceil_mode or pool.count_include_pad
            or pool.divisor_override is not None):
        raise TypeError("the shortcut's pool must be AvgPool2d(k, k, ceil_mode=True, "
                        f"count_include_pad=False), got {pool}")
    return 0 if k[0] == 1 else k[0]


def split_downsample(ds: Optional[nn.Module], preact: bool = False):
    """(pool, conv, norm) of a projection shortcut, or None for the identity.

    Accepts ``Sequential([AvgPool2d,] conv, norm)`` as torchvision and timm's ResNet build
    it (an nn.Identity in place of the pool is skipped), timm resnetv2's DownsampleConv /
    DownsampleAvg (``pool``, ``conv``, ``norm`` attributes, norm an nn.Identity when
    preact), or a bare conv. ``norm`` is None when there is none. TypeError otherwise."""
    if ds is None:
        return None
    if isinstance(ds, nn.Conv2d):
        parts = [ds]
    elif isinstance(ds, nn.Sequential):
        parts = list(ds)
    elif hasattr(ds, "conv") and type(ds).__name__ in ("DownsampleConv", "DownsampleAvg"):
        parts = [getattr(ds, "pool", None), ds.conv, getattr(ds, "norm", None)]
    else:
        raise TypeError(f"unsupported downsample module {type(ds).__name__}")
    parts = [m for m in parts if m is not None and not isinstance(m, nn.Identity)]
    pool = _pool_kernel(parts.pop(0)) if parts and isinstance(parts[0], nn.AvgPool2d) else 0
    if not parts or not isinstance(parts[0], nn.Conv2d) or len(parts) > 2:
        raise TypeError("the shortcut must be [AvgPool2d,] Conv2d[, norm], got "
                        f"{[type(m).__name__ for m in parts]}")
    conv, norm = parts[0], (parts[1] if len(parts) == 2 else None)
    if norm is None and not preact:
        raise TypeError("a post-activation block's shortcut conv needs a norm layer")
    return pool, conv, norm


def drop_path_factor(x: Tensor, drop_prob: float, training: bool,
                     scale_by_keep: bool = True) -> Optional[Tensor]:
    """The [N] per-sample factor of timm's ``drop_path``, drawn the way it draws it (one
    ``bernoulli_`` on an [N, 1, 1, 1] tensor of the branch's dtype, on the device), so
    the same RNG state gives the same samples. None when nothing is dropped."""
    if drop_prob == 0.0 or not training:
        return None
    keep_prob = 1.0 - drop_prob
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        dtype = torch.get_autocast_dtype(x.device.type)  # the branch's dtype under autocast
    factor = x.new_empty((x.shape[0], 1, 1, 1), dtype=dtype).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        factor.div_(keep_prob)
    return factor.view(-1)


_NOT_EXPORTABLE = ("{what} cannot see inside the fused block {block}: it runs its batch norms, "
                   "ReLUs and residual add as one fused op. Call fusedres.revert(model) first "
                   "(same parameters and state_dict), then export the reverted model.")


def _onnx_flags():
    """The two flags torch.onnx.is_in_onnx_export reads; it imports them on every call,
    microseconds of a block call's host budget. None where this torch has neither."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return None
    return _flags, GLOBALS


_ONNX = _onnx_flags()


def _in_onnx_export() -> bool:
    if _ONNX is None:
        return torch.onnx.is_in_onnx_export()
    return bool(_ONNX[1].in_onnx_export or _ONNX[0]._is_onnx_exporting)


def _refuse_tracing(x, block) -> None:
    """RuntimeError naming fusedres.revert under torch.fx.symbolic_trace (x is a Proxy) and
    torch.onnx.export's TorchScript exporter; torch.compile (dynamo) traces the block fine."""
    if torch.compiler.is_compiling():
        return
    what = ("torch.fx tracing" if isinstance(x, torch.fx.Proxy)
            else "torch.onnx.export" if torch.onnx.is_in_onnx_export() else None)
    if what is not None:
        raise RuntimeError(_NOT_EXPORTABLE.format(what=what, block=type(block).__name__))


class _FusedMixin:
    """The fused forward of every block, from the class's BlockLayout.

    Classes using it set ``_fused_layout`` and ``_fused_original`` (the plain class that
    fusedres.revert restores) in their own body."""

    recompute: bool = False
    _fused_layout: BlockLayout

    def _drop_factor(self, x: Tensor) -> Optional[Tensor]:
        name = self._fused_layout.drop_path
        dp = getattr(self, name, None) if name else None
        if dp is None or dp == 0.0 or isinstance(dp, nn.Identity):  # (no drop: most blocks)
            return None
        if isinstance(dp, (int, float)):
            return drop_path_factor(x, float(dp), self.training)
        return drop_path_factor(x, float(dp.drop_prob), dp.training,
                                getattr(dp, "scale_by_keep", True))

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling it
        raise RuntimeError(_NOT_EXPORTABLE.format(what="TorchScript", block=type(self).__name__))

    def forward(self, x: Tensor) -> Tensor:
        # a Proxy (fx) or an ONNX export would otherwise fail deep inside: say what to do
        if not isinstance(x, Tensor) or (not torch.compiler.is_compiling()
                                         and _in_onnx_export()):
            _refuse_tracing(x, self)
        return run_module(self, x, split_downsample, self._drop_factor(x))


class FusedBasicBlock(_FusedMixin, reference.BasicBlock):
    """torchvision's BasicBlock with its BN, ReLU and residual add fused."""

    _fused_layout = BlockLayout(("conv1", "conv2"), ("bn1", "bn2"), relus=("relu",),
                                drop_path="drop_path_rate")
    _fused_original = reference.BasicBlock


class FusedBottleneck(_FusedMixin, reference.Bottleneck):
    """torchvision's Bottleneck with its BNs, ReLUs and residual add fused."""

    _fused_layout = BlockLayout(("conv1", "conv2", "conv3"), ("bn1", "bn2", "bn3"),
                                relus=("relu",), drop_path="drop_path_rate")
    _fused_original = reference.Bottleneck


class FusedPreActBlock(_FusedMixin, reference.PreActBasicBlock):
    """Pre-activation (ResNet v2) basic block, fused."""

    _fused_layout = BlockLayout(("conv1", "conv2"), ("bn1", "bn2"), preact=True,
                                relus=("relu",), drop_path="drop_path_rate")
    _fused_original = reference.PreActBasicBlock


class FusedPreActBottleneck(_FusedMixin, reference.PreActBottleneck):
    """Pre-activation (ResNet v2) bottleneck block, fused."""

    _fused_layout = BlockLayout(("conv1", "conv2", "conv3"), ("bn1", "bn2", "bn3"),
                                preact=True, relus=("relu",), drop_path="drop_path_rate")
    _fused_original = reference.PreActBottleneck


class FusedSyncBatchNorm(nn.BatchNorm2d):
    """nn.SyncBatchNorm whose synchronised 4-D forward runs on the fused primitives, so that
    it also works on CPU tensors (gloo), where nn.SyncBatchNorm refuses them. Otherwise
    (eval mode, one rank, no torch.distributed, an input that is not 4-D) it runs
    nn.SyncBatchNorm's own forward.

    fusedres.convert gives every nn.SyncBatchNorm of a model this class (revert gives
    theirs back; same attributes, same state_dict). It is a BatchNorm2d, not an
    nn.SyncBatchNorm, because DistributedDataParallel refuses any nn.SyncBatchNorm in a CPU
    model; fusedres.distributed treats both alike."""

    _fused_original = nn.SyncBatchNorm
    _fusedres_sync = True  # what fusedres.distributed looks for, besides nn.SyncBatchNorm

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, **kwargs) -> None:
        # kwargs: what newer BatchNorm2d constructors take besides (torch 2.14: bias=)
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **kwargs)
        self.process_group = process_group

    # nn.SyncBatchNorm's forward, which the fallback runs, calls these two of its methods
    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and self.training and distributed.world_size(
                distributed.block_group([self])) > 1:
            return fused_batch_norm(x, self)
        # fusedres's checks and rule, as on the fused path: a wrong size raises ShapeError,
        # and a failed call leaves num_batches_tracked alone (nn.SyncBatchNorm counts first)
        self._check_input_dim(x)
        check_sizes("norm", BNParams(self.weight, self.bias, self.running_mean,
                                     self.running_var, None), x.shape[1])
        return parity.leave_count_on_error(self, nn.SyncBatchNorm.forward, x)
