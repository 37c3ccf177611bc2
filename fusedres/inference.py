"""fold_for_inference(model): a copy of a ResNet with every batch norm folded into its conv.

An eval-mode batch norm after a convolution is an affine map per output channel, so it
folds into the convolution once, in float64, and is cast to the weight's dtype:

    s = gamma / sqrt(running_var + eps),   W' = W * s,   b' = beta + (b0 - running_mean) * s

(b0 the conv's own bias, 0 if none). A post-activation block (torchvision, timm ResNet)
then runs ``relu(conv(a; W', b'))`` for its inner convs and
``relu(conv(a; W', b' + b_d') + conv_d(pool(x); W_d'))`` at its end (the projection
shortcut's folded bias joins the last conv's, so the shortcut is a bare conv). A
pre-activation block (ResNet v2) folds the norm that follows each of its convs into that
conv; its leading norm, which precedes the first conv, stays a per-channel scale and shift
with a ReLU (nothing precedes it to fold it into). The stem's conv + norm folds too.

On a CUDA GPU each conv + bias (+ add) + ReLU runs as the faster of two paths, chosen once
per input shape, dtype and layout by ``FoldedModel.tune`` (timing both), else
``DEFAULT_PATH`` (torch.compile reads the choice per dtype and layout, see
FoldedConv.remember):

* ``cudnn_fused``: cuDNN's fused ``cudnn_convolution_relu`` / ``cudnn_convolution_add_relu``;
* ``conv_epilogue``: the cuDNN convolution, then fusedres's epilogue kernel
  ``relu(z*1 + b [+ skip])`` in one memory pass.

On other devices: plain torch convolutions with bias, then relu / add + relu.

The folded model is for inference only: it refuses ``.train()``, a forward in training
mode and inputs that require grad. A model that keeps training needs fusedres.convert.
"""
from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layout import is_channels_last, stats_dtype

__all__ = ["DEFAULT_PATH", "PATHS", "FoldedBlock", "FoldedConv", "FoldedModel", "FoldedNormReLU",
           "fold_for_inference"]

#: The CUDA paths of a conv site that ends in a ReLU.
PATHS = ("cudnn_fused", "conv_epilogue")
#: Taken where no tuned choice exists: it runs for every dtype and layout the fused
#: training path runs (cuDNN's runtime-fusion engines cover only some, and raise for the
#: rest), with one memory pass after the conv; ``tune`` replaces it where cuDNN's is faster.
DEFAULT_PATH = "conv_epilogue"

_REFUSAL = ("fusedres.fold_for_inference made this model for inference only (its batch norms "
            "are folded into the convolutions and can no longer learn); {what}. For a model "
            "that keeps training use fusedres.convert(model).")


def _refuse(module: nn.Module, args) -> None:
    if module.training:
        raise RuntimeError(_REFUSAL.format(what="it cannot run in training mode"))
    for a in args:
        if isinstance(a, Tensor) and a.requires_grad:
            raise RuntimeError(_REFUSAL.format(what="it refuses inputs that require grad"))


# --------------------------------------------------------------------------------------
# The folding arithmetic (float64)
# --------------------------------------------------------------------------------------


def _is_class(m: nn.Module, module: str, name: str) -> bool:
    return type(m).__module__ == module and type(m).__qualname__ == name


def norm_kind(norm: nn.Module) -> Optional[str]:
    """"plain" for a batch norm that folds, "relu" for one that also applies a ReLU (timm's
    BatchNormAct2d), None for anything else (another norm or activation, no running
    statistics)."""
    from .modules import FusedSyncBatchNorm
    if type(norm) in (nn.BatchNorm2d, nn.SyncBatchNorm, FusedSyncBatchNorm):
        if not norm.track_running_stats or norm.running_mean is None:
            return None  # normalises with batch statistics even in eval mode
        return "plain"
    if _is_class(norm, "torchvision.ops.misc", "FrozenBatchNorm2d"):
        return "plain"
    if (_is_class(norm, "timm.layers.norm_act", "BatchNormAct2d")
            or _is_class(norm, "timm.layers.norm_act", "FrozenBatchNormAct2d")):
        if getattr(norm, "running_mean", None) is None or not isinstance(norm.drop, nn.Identity):
            return None
        if type(norm.act) is nn.ReLU:
            return "relu"
        return "plain" if isinstance(norm.act, nn.Identity) else None
    return None


def _affine64(norm: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """(s, mean, beta) in float64, s = gamma / sqrt(running_var + eps)."""
    var = norm.running_var.detach().double()
    s = torch.rsqrt(var + float(norm.eps))
    if norm.weight is not None:
        s = s * norm.weight.detach().double()
    mean = norm.running_mean.detach().double()
    beta = norm.bias.detach().double() if norm.bias is not None else torch.zeros_like(mean)
    return s, mean, beta


def norm_scale_shift(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """(s, t) in float64 with ``norm(z) == z*s + t`` per channel in eval mode."""
    s, mean, beta = _affine64(norm)
    return s, beta - mean * s


def fold_conv_norm(conv: nn.Conv2d, norm: Optional[nn.Module]) -> tuple[Tensor, Optional[Tensor]]:
    """(W', b') of ``norm(conv(x))`` as one conv, new tensors in the conv weight's dtype and
    memory format: W' = W*s, b' = beta + (b0 - mean)*s. ``norm`` None: copies of the
    conv's own."""
    w = conv.weight.detach()
    if norm is None:
        return w.clone(), None if conv.bias is None else conv.bias.detach().clone()
    s, mean, beta = _affine64(norm)
    if s.shape[0] != w.shape[0]:
        raise ValueError(f"norm has {s.shape[0]} channels, expected the conv's "
                         f"{w.shape[0]} output channels")
    b0 = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(mean)
    bias = beta + (b0 - mean) * s
    weight = torch.empty_like(w)  # keeps the weight's strides (channels_last or not)
    weight.copy_(w * s.view(-1, 1, 1, 1))  # the product in float64 (s is), rounded once
    return weight, bias.to(w.dtype)


# --------------------------------------------------------------------------------------
# The CUDA paths
# --------------------------------------------------------------------------------------


def _output_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


@torch.library.custom_op("fusedres::cudnn_conv_bias_relu", mutates_args=())
def cudnn_conv_bias_relu(x: Tensor, weight: Tensor, bias: Tensor, skip: Optional[Tensor],
                         stride: list[int], padding: list[int], dilation: list[int],
                         groups: int) -> Tensor:
    """relu(conv(x, weight) + bias [+ skip]) as one cuDNN call; output in x's layout."""
    if skip is None:
        y = torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
    else:
        y = torch.cudnn_convolution_add_relu(x, weight, skip, 1.0, bias, stride, padding,
                                             dilation, groups)
    # cuDNN picks its own output layout; the fake kernel promises x's.
    return y.contiguous(memory_format=_output_format(x))


@cudnn_conv_bias_relu.register_fake
def _(x, weight, bias, skip, stride, padding, dilation, groups):
    N, _, H, W = x.shape
    K, _, kh, kw = weight.shape
    ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((N, K, ho, wo)).contiguous(memory_format=_output_format(x))


def relu_epilogue(z: Tensor, scale: Tensor, shift: Tensor, skip: Optional[Tensor]) -> Tensor:
    """relu(z*scale + shift [+ skip]) per channel in one memory pass, in z's dtype and
    layout: fusedres's batch-norm epilogue (the one place this module calls fusedres.ops)."""
    from . import ops
    from .records import BNParams, BNStats, Norm
    sdt = stats_dtype(z)  # what every backend takes for scale and shift
    scale, shift = scale.to(sdt), shift.to(sdt)
    # batch-statistics form: the forward epilogue reads only scale and shift of the BNStats
    norm = Norm(BNStats(mean=shift, rstd=scale, scale=scale, shift=shift),
                BNParams(None, None, None, None, None), 0.0)
    return ops.run_bn_act_fwd(z, norm, skip, None, None, True, False).y


def _bare_conv(x: Tensor, weight: Tensor, site: "FoldedConv") -> Tensor:
    return torch.ops.aten.convolution(x, weight, None, site.stride, site.padding, site.dilation,
                                      False, [0, 0], site.groups)


def _run_path(path: str, site: "FoldedConv", x: Tensor, weight: Tensor, bias: Tensor,
              skip: Optional[Tensor]) -> Tensor:
    if path == "cudnn_fused":
        return cudnn_conv_bias_relu(x, weight, bias.to(x.dtype), skip, site.stride,
                                    site.padding, site.dilation, site.groups)
    if path == "conv_epilogue":
        return relu_epilogue(_bare_conv(x, weight, site), site.ones, bias, skip)
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def _can_time() -> bool:
    """Timing synchronises: never while torch.compile traces or a CUDA graph captures."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _time_paths(site: "FoldedConv", x, weight, bias, skip, iters: int = 10) -> dict:
    """Mean ms per call of each path over ``iters`` calls after a warm-up, for the paths
    that run on these inputs (one that raises is left out: cuDNN has no fused engine for
    every dtype and layout). Synchronises once per path."""
    times = {}
    for path in PATHS:
        try:
            for _ in range(3):  # warm-up: cuDNN's plan search, Triton's compile
                _run_path(path, site, x, weight, bias, skip)
        except RuntimeError:
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            _run_path(path, site, x, weight, bias, skip)
        end.record()
        end.synchronize()
        times[path] = start.elapsed_time(end) / iters
    return times


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


class FoldedConv(nn.Module):
    """A conv with its batch norm folded in: ``act(conv(x; weight, bias) [+ skip])``.

    ``weight`` and ``bias`` are buffers (nothing here trains); ``bias`` may be None. With
    ``relu`` on a CUDA input it runs the path ``choices`` holds for the input's shape, dtype
    and layout (filled by FoldedModel.tune), else DEFAULT_PATH."""

    def __init__(self, conv: nn.Conv2d, weight: Tensor, bias: Optional[Tensor], relu: bool):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.relu = relu
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        # The epilogue path's scale: not state, rebuilt with the module.
        self.register_buffer("ones", torch.ones(weight.shape[0], dtype=weight.dtype,
                                                device=weight.device), persistent=False)
        self.choices: dict = {}  # (shape, dtype, channels_last) -> path
        self.traced_choices: dict = {}  # (dtype, channels_last) -> path, see remember()
        self.tuning = False
        self.train(False)  # born in eval mode: forward refuses training mode

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={tuple(self.stride)}, padding={tuple(self.padding)}, "
                f"groups={self.groups}, bias={self.bias is not None}, relu={self.relu}")

    def remember(self, key: tuple, path: str) -> None:
        """Cache ``path`` for key (shape, dtype, channels_last), and what torch.compile
        reads: per (dtype, channels_last), the one path chosen for every tuned shape, or
        DEFAULT_PATH where shapes disagree."""
        self.choices[key] = path
        same = {p for (_, dt, cl), p in self.choices.items() if (dt, cl) == key[1:]}
        self.traced_choices[key[1:]] = same.pop() if len(same) == 1 else DEFAULT_PATH

    def path_for(self, x: Tensor, weight: Tensor, bias: Tensor, skip: Optional[Tensor]) -> str:
        """The CUDA path for this input: the cached choice, a new one when tuning (and
        allowed to time), else DEFAULT_PATH."""
        if torch.compiler.is_compiling():
            # No lookup by shape: under dynamic shapes that would specialise them.
            return self.traced_choices.get((x.dtype, is_channels_last(x)), DEFAULT_PATH)
        key = (tuple(x.shape), x.dtype, is_channels_last(x))
        path = self.choices.get(key)
        if path is None:
            path = DEFAULT_PATH
            if self.tuning and _can_time():
                times = _time_paths(self, x, weight, bias, skip)
                path = min(times, key=times.get) if times else DEFAULT_PATH
                self.remember(key, path)
        return path

    def forward(self, x: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        _refuse(self, (x,))
        weight, bias = self.weight, self.bias
        if (torch.is_autocast_enabled(x.device.type) and x.is_floating_point()
                and x.dtype != torch.float64):
            # The custom op is opaque to autocast: cast here, as autocast casts a conv (not
            # fp64). The bias is cast where it is used (the epilogue reads it in fp32).
            dt = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dt), weight.to(dt)
            skip = None if skip is None else skip.to(dt)
        if x.device.type == "cuda" and self.relu and bias is not None:
            return _run_path(self.path_for(x, weight, bias, skip), self, x, weight, bias, skip)
        bias = None if bias is None else bias.to(weight.dtype)
        y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if skip is not None:
            y = y + skip
        return torch.relu(y) if self.relu else y


class FoldedNormReLU(nn.Module):
    """relu(x*scale + shift) per channel: an eval-mode batch norm and its ReLU that have no
    conv before them to fold into (a pre-activation block's leading norm). Computed in
    the wider of x's and the parameters' dtypes, returned in x's (as eager batch norm)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        s, t = norm_scale_shift(norm)
        dtype = norm.running_var.dtype
        self.register_buffer("scale", s.to(dtype))
        self.register_buffer("shift", t.to(dtype))
        self.train(False)

    def forward(self, x: Tensor) -> Tensor:
        _refuse(self, (x,))
        if x.device.type == "cuda":
            return relu_epilogue(x, self.scale, self.shift, None)
        acc = torch.promote_types(x.dtype, self.scale.dtype)
        y = x.to(acc) * self.scale.view(-1, 1, 1) + self.shift.view(-1, 1, 1)
        return torch.relu(y).to(x.dtype)


def _pool(x: Tensor, k: int) -> Tensor:
    # The only shortcut pool split_downsample accepts (0: none).
    return F.avg_pool2d(x, k, k, 0, ceil_mode=True, count_include_pad=False) if k else x


class FoldedBlock(nn.Module):
    """A residual block with its batch norms folded into its convs.

    Post-activation: ``convs[-1](h, skip)`` is conv + bias + add + ReLU, ``skip`` x or
    ``shortcut(pool(x))``. Pre-activation: ``p = pre_norm(x)``, the inner convs carry the
    norm + ReLU that followed them, the last conv is bare, and ``out = conv(h) + skip``
    with ``skip`` x or ``shortcut(pool(p))``."""

    def __init__(self, convs: list, shortcut: Optional[FoldedConv], pool: int, preact: bool,
                 pre_norm: Optional[FoldedNormReLU] = None):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.shortcut = shortcut
        self.pool = pool
        self.preact = preact
        self.pre_norm = pre_norm
        self.train(False)

    def forward(self, x: Tensor) -> Tensor:
        _refuse(self, (x,))
        h = self.pre_norm(x) if self.preact else x
        skip = x if self.shortcut is None else self.shortcut(_pool(h, self.pool))
        for conv in self.convs[:-1]:
            h = conv(h)
        return self.convs[-1](h, skip)


class FoldedModel(nn.Module):
    """What fold_for_inference returns: ``module`` is the folded copy of the model.

    Inference only: ``.train()`` raises, and so does a forward in training mode or with an
    input that requires grad; a model that keeps training needs fusedres.convert."""

    def __init__(self, module: nn.Module, folded: list, unfolded: list):
        super().__init__()
        self.module = module
        self.folded = folded        # names of the folded blocks and stems
        self.unfolded = unfolded    # (name, why) of the blocks left as they were
        self.train(False)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(_REFUSAL.format(what="it cannot be put in training mode"))
        return super().train(False)

    def forward(self, *args, **kwargs):
        _refuse(self, (*args, *kwargs.values()))
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def tune(self, example_input) -> "FoldedModel":
        """Choose each conv site's CUDA path by timing both on ``example_input`` (one
        forward; it synchronises). Call it under the autocast you infer with: choices are
        kept per input shape, dtype and layout. A CPU input chooses nothing. Returns self."""
        sites = [m for m in self.modules() if isinstance(m, FoldedConv)]
        for m in sites:
            m.tuning = True
        try:
            self(example_input)
        finally:
            for m in sites:
                m.tuning = False
        return self


# --------------------------------------------------------------------------------------
# Folding a model
# --------------------------------------------------------------------------------------


def _has_hooks(*modules) -> bool:
    return any(m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in modules)


def _plain_conv(m: nn.Module) -> bool:
    """A conv whose forward is nn.Conv2d's own (no weight standardisation, no padding
    tricks): what the folded conv computes."""
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _fold_block(block: nn.Module) -> FoldedBlock:
    """The FoldedBlock of a block why_not_fused accepts; ValueError if a norm cannot fold."""
    from .convert import _layout_of
    from .modules import split_downsample
    layout = _layout_of(type(block))
    aa = getattr(block, layout.aa, None) if layout.aa else None
    if aa is not None and not isinstance(aa, nn.Identity):  # fused, but FoldedBlock lacks it
        raise ValueError(f"its anti-aliasing layer {layout.aa} ({type(aa).__name__}) is not folded")
    gate = getattr(block, layout.gate, None) if layout.gate else None
    if gate is not None and not isinstance(gate, nn.Identity):  # fused, but FoldedBlock lacks it
        raise ValueError(f"its attention layer {layout.gate} ({type(gate).__name__}) is not folded")
    convs = [getattr(block, n) for n in layout.convs]
    norms = [getattr(block, n) for n in layout.norms]
    parts = split_downsample(getattr(block, "downsample", None), layout.preact)
    pool, dconv, dnorm = parts if parts else (0, None, None)
    for name, norm in zip(layout.norms + ("downsample norm",), norms + [dnorm]):
        if norm is not None and norm_kind(norm) is None:
            raise ValueError(f"{name} ({type(norm).__name__}) has no running statistics to fold")
    if _has_hooks(block, *convs, *norms, dconv, dnorm):
        raise ValueError("a part of it has forward hooks, which the folded block would skip")
    if not layout.preact:
        folded = [fold_conv_norm(c, n) for c, n in zip(convs, norms)]
        shortcut = None
        if dconv is not None:
            wd, bd = fold_conv_norm(dconv, dnorm)
            shortcut = FoldedConv(dconv, wd, None, relu=False)
            w, b = folded[-1]
            # One bias for the block's end: relu(conv(h) + b + conv_d(x) + b_d).
            folded[-1] = (w, (b.double() + bd.double()).to(b.dtype))
        sites = [FoldedConv(c, w, b, relu=True) for c, (w, b) in zip(convs, folded)]
        return FoldedBlock(sites, shortcut, pool, preact=False)
    # Pre-activation: norm i+1 follows conv i; the last conv has no norm after it.
    sites = [FoldedConv(c, *fold_conv_norm(c, n), relu=True) for c, n in zip(convs, norms[1:])]
    sites.append(FoldedConv(convs[-1], *fold_conv_norm(convs[-1], None), relu=False))
    shortcut = None if dconv is None else FoldedConv(dconv, *fold_conv_norm(dconv, None),
                                                     relu=False)
    return FoldedBlock(sites, shortcut, pool, preact=True, pre_norm=FoldedNormReLU(norms[0]))


def _stem_pairs(model: nn.Module):
    """(conv owner, conv name, norm name, relu name or None) of the stems whose order
    conv -> norm -> ReLU their model's own forward fixes: torchvision's ResNet
    (conv1, bn1, relu) and timm's ResNet (conv1 or the last conv of a deep-stem
    Sequential conv1, bn1, act1). Exact classes only: a subclass may change the forward."""
    if _is_class(model, "torchvision.models.resnet", "ResNet"):
        return [(model, "conv1", "bn1", "relu")]
    if _is_class(model, "timm.models.resnet", "ResNet"):
        return [(model, "conv1", "bn1", "act1")]
    return []


def _fold_pair(owner: nn.Module, conv_name: str, norm_owner: nn.Module, norm_name: str,
               relu_owner: nn.Module, relu_name: Optional[str]) -> bool:
    """Fold ``norm_owner.norm_name`` (and a ReLU after it) into ``owner.conv_name`` in
    place; the norm and the ReLU become nn.Identity. False, changing nothing, when the
    pair is not a plain conv and a batch norm that fold."""
    conv, norm = owner._modules.get(conv_name), norm_owner._modules.get(norm_name)
    relu = relu_owner._modules.get(relu_name) if relu_name else None
    kind = norm_kind(norm) if norm is not None else None
    if not (conv is not None and _plain_conv(conv) and kind is not None
            and norm.running_mean.shape[0] == conv.out_channels
            and not _has_hooks(conv, norm, relu)):
        return False
    with_relu = kind == "relu" or type(relu) is nn.ReLU
    setattr(owner, conv_name, FoldedConv(conv, *fold_conv_norm(conv, norm), relu=with_relu))
    setattr(norm_owner, norm_name, nn.Identity())
    if type(relu) is nn.ReLU:
        setattr(relu_owner, relu_name, nn.Identity())
    return True


def _fold_sequentials(model: nn.Module) -> list:
    """Fold every conv -> batch norm [-> ReLU] run of an exact nn.Sequential (whose
    forward is that chain); returns the names of the folded convs."""
    done = []
    for name, seq in list(model.named_modules()):
        if type(seq) is not nn.Sequential or _has_hooks(seq):
            continue
        keys = list(seq._modules)
        for i in range(len(keys) - 1):
            relu = keys[i + 2] if i + 2 < len(keys) else None
            if _fold_pair(seq, keys[i], seq, keys[i + 1], seq, relu):
                done.append(f"{name}.{keys[i]}" if name else keys[i])
    return done


def fold_for_inference(model: nn.Module, example_input: Optional[Tensor] = None) -> FoldedModel:
    """A new model that computes ``model.eval()``'s outputs with every batch norm folded
    into the convolution before it; ``model`` and its state_dict are left untouched.

    Folded: each batch norm of every block fusedres.convert can fuse but an anti-aliased
    one (torchvision and timm ResNet blocks, timm ResNetV2 pre-activation blocks,
    fusedres's own), their projection
    shortcuts' and the stem's (torchvision / timm ResNet, and any conv -> batch norm
    [-> ReLU] inside an nn.Sequential). A pre-activation block's leading norm, which no
    conv precedes, stays a per-channel scale/shift + ReLU. Blocks that cannot fold stay as
    they are, in eval mode, named with the reason in one warning (and in ``.unfolded``).
    A converted model (fusedres.convert) folds like its plain original.

    The result refuses training (``.train()``, a forward in training mode, inputs that
    require grad) with a RuntimeError: a model that keeps training needs fusedres.convert.
    It works with torch.compile(fullgraph=True), channels_last, fp16/bf16/fp32/fp64 (move it
    with ``.to()``) and autocast, and pickles. ``example_input`` given: ``.tune(example_input)``
    chooses each CUDA conv site's path by timing (see FoldedModel.tune)."""
    from .convert import _layout_of, is_fused, revert, why_not_fused
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    copied = copy.deepcopy(model)
    if any(is_fused(m) for m in copied.modules()):
        revert(copied)  # fold from the plain blocks (same modules, same tensors)
    copied.eval()
    folded, unfolded = [], []
    blocks = [(name, m) for name, m in copied.named_modules() if _layout_of(type(m)) is not None]
    replaced = {}
    for name, block in blocks:
        if any(name.startswith(p + ".") for p in replaced):
            continue  # inside a block already folded
        reason = why_not_fused(block)
        if reason is None:
            try:
                replaced[name] = _fold_block(block)
            except ValueError as e:
                reason = str(e)
        if reason is not None:
            unfolded.append((name or "<model>", reason))
    if "" in replaced:  # the model is one block
        copied = replaced.pop("")
        folded.append("<model>")
    for name, new in replaced.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(copied.get_submodule(parent_name), attr, new)
        folded.append(name)
    for owner, conv_name, norm_name, relu_name in _stem_pairs(copied):
        conv_owner, last = owner, conv_name
        if type(owner._modules.get(conv_name)) is nn.Sequential:  # timm's deep stem
            conv_owner = owner._modules[conv_name]
            last = list(conv_owner._modules)[-1]
        if _fold_pair(conv_owner, last, owner, norm_name, owner, relu_name):
            folded.append(f"{conv_name}.{last}" if conv_owner is not owner else conv_name)
    folded += _fold_sequentials(copied)
    if unfolded:
        warnings.warn(f"fusedres.fold_for_inference left {len(unfolded)} block(s) unfolded:\n  "
                      + "\n  ".join(f"{n}: {why}" for n, why in unfolded), stacklevel=2)
    copied.requires_grad_(False)
    result = FoldedModel(copied, folded, unfolded)
    if example_input is not None:
        result.tune(example_input)
    return result
