"""Anti-aliasing inside a fused block: timm's ``aa`` layer, in its functional form.

timm's anti-aliased ResNets (resnetaa*, resnetblur*, seresnetaa*) give the strided conv of
a block stride 1 and downsample its activation instead: in BasicBlock after act1, in
Bottleneck after act2, with ``aa`` an nn.AvgPool2d (resnetaa*) or a BlurPool2d (resnetblur*:
pad, then a depthwise conv with a fixed binomial filter). The fused block keeps that
activation's BN + ReLU fused and runs the ``aa`` step here on its output, with aten ops
and an explicit backward, so torch.compile traces it as it traces the convolutions.

The backward saves the post-``aa`` activation, the next conv's input, instead of the
pre-``aa`` one: the conv's weight gradient needs the former, the ReLU's backward is
recomputed from the BN input anyway, and the ``aa`` step's own backward needs only the
shape of its input (which the saved conv output before it has). So the saved activation
is a quarter of what a block without ``aa`` saves there (stride 2), not more. Measured
with torch.autograd.graph.saved_tensors_hooks (bytes, so the same on any device; CPU,
fp32) on resnetblur50's layer2[0] with an 8x256x56x56 input: timm's block saves 102.0 MiB,
the fused one 64.7 MiB (49.4 MiB with recompute); saving the pre-``aa`` activation too
would add 12.25 MiB (8x128x56x56 fp32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .layout import memory_format

__all__ = ["AASpec", "aa_backward", "aa_filter", "aa_forward", "aa_out_hw", "aa_problem", "read_aa"]

_PAD_MODES = ("constant", "reflect", "replicate")


@dataclass(frozen=True)
class AASpec:
    """The ``aa`` step after a block's inner activation ``after`` (0: the first)."""
    after: int
    blur: bool                 # BlurPool2d: pad, depthwise conv (the filter travels as a tensor)
    kernel: tuple
    stride: tuple
    padding: tuple             # avg pool: (ph, pw); blur: F.pad's (left, right, top, bottom)
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor_override: Optional[int] = None
    pad_mode: str = "constant"


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _is_blur_pool(m: nn.Module) -> bool:
    # that exact class: a subclass may have its own forward
    return type(m).__module__ == "timm.layers.blur_pool" and type(m).__qualname__ == "BlurPool2d"


def aa_problem(m: nn.Module, name: str = "aa") -> Optional[str]:
    """Why the fused block cannot run ``m`` (its attribute ``name``) as its anti-aliasing
    step, or None."""
    what = f"anti-aliasing layer {name} ({type(m).__name__})"
    if type(m) is nn.AvgPool2d:
        return None
    if _is_blur_pool(m):
        if m.pad_mode not in _PAD_MODES:
            return f"{what} has pad_mode={m.pad_mode!r}, not one of {_PAD_MODES}"
        filt = m._buffers.get("filt")
        if filt is None or filt.dim() != 4 or filt.shape[1] != 1:
            return f"{what} has no [C, 1, k, k] filt buffer"
        return None
    return f"{what} is neither nn.AvgPool2d nor timm's BlurPool2d"


def read_aa(m: nn.Module, after: int) -> tuple[AASpec, Optional[Tensor]]:
    """(AASpec, the blur filter or None) of an ``aa`` module; TypeError if not served."""
    problem = aa_problem(m)
    if problem is not None:
        raise TypeError(f"the block's aa layer cannot be fused: {problem}")
    if type(m) is nn.AvgPool2d:
        stride = m.stride if m.stride is not None else m.kernel_size
        return AASpec(after, False, _pair(m.kernel_size), _pair(stride), _pair(m.padding),
                      bool(m.ceil_mode), bool(m.count_include_pad), m.divisor_override), None
    filt = m._buffers["filt"]
    return AASpec(after, True, tuple(filt.shape[-2:]), _pair(m.stride), tuple(m.padding),
                  pad_mode=m.pad_mode), filt


def aa_filter(m: nn.Module) -> Optional[Tensor]:
    """The blur filter an ``aa`` module reads this call (None for an avg pool)."""
    return m._buffers.get("filt") if _is_blur_pool(m) else None


def aa_out_hw(spec: AASpec, h: int, w: int) -> tuple:
    """The ``aa`` step's output height and width (PyTorch's pooling arithmetic)."""
    if spec.blur:
        left, right, top, bottom = spec.padding
        return ((h + top + bottom - spec.kernel[0]) // spec.stride[0] + 1,
                (w + left + right - spec.kernel[1]) // spec.stride[1] + 1)
    out = []
    for size, k, s, p in zip((h, w), spec.kernel, spec.stride, spec.padding):
        n = size + 2 * p - k
        o = (-(-n // s) if spec.ceil_mode else n // s) + 1
        if spec.ceil_mode and (o - 1) * s >= size + p:  # the last window must start inside
            o -= 1
        out.append(o)
    return tuple(out)


def _depthwise(filt: Tensor, c: int, dtype: torch.dtype) -> Tensor:
    filt = filt.to(dtype)
    return filt if filt.shape[0] == c else filt.expand(c, 1, *filt.shape[-2:])


def aa_forward(a: Tensor, spec: AASpec, filt: Optional[Tensor]) -> Tensor:
    """The ``aa`` step on activation ``a``, in ``a``'s memory format."""
    if not spec.blur:
        out = torch.ops.aten.avg_pool2d(a, list(spec.kernel), list(spec.stride),
                                        list(spec.padding), spec.ceil_mode,
                                        spec.count_include_pad, spec.divisor_override)
    else:
        padded = torch.nn.functional.pad(a, list(spec.padding), mode=spec.pad_mode)
        c = a.shape[1]
        out = torch.ops.aten.convolution(padded, _depthwise(filt, c, a.dtype), None,
                                         list(spec.stride), [0, 0], [1, 1], False, [0, 0], c)
    return out.contiguous(memory_format=memory_format(a))


def aa_backward(g: Tensor, like: Tensor, spec: AASpec, filt: Optional[Tensor]) -> Tensor:
    """The gradient of the ``aa`` step's input from that of its output. ``like``: any
    tensor of the input's shape, dtype and layout (only those are read)."""
    if not spec.blur:
        g_in = torch.ops.aten.avg_pool2d_backward(
            g, like, list(spec.kernel), list(spec.stride), list(spec.padding), spec.ceil_mode,
            spec.count_include_pad, spec.divisor_override)
        return g_in.contiguous(memory_format=memory_format(like))
    left, right, top, bottom = spec.padding
    n, c, h, w = like.shape
    hp, wp = h + top + bottom, w + left + right
    # the input gradient of a conv is the transposed conv of its output gradient; the
    # output padding restores the rows and columns the stride dropped
    out_pad = [hp - ((g.shape[2] - 1) * spec.stride[0] + spec.kernel[0]),
               wp - ((g.shape[3] - 1) * spec.stride[1] + spec.kernel[1])]
    g_padded = torch.ops.aten.convolution(g, _depthwise(filt, c, g.dtype), None,
                                          list(spec.stride), [0, 0], [1, 1], True, out_pad, c)
    if spec.pad_mode == "reflect":
        g_in = torch.ops.aten.reflection_pad2d_backward(g_padded, like, list(spec.padding))
    elif spec.pad_mode == "replicate":
        g_in = torch.ops.aten.replication_pad2d_backward(g_padded, like, list(spec.padding))
    else:
        g_in = g_padded[:, :, top:hp - bottom, left:wp - right]
    return g_in.contiguous(memory_format=memory_format(like))
