"""What every launcher shares: the launch itself, stand-ins for absent operands, the
zeroed counters of the one-launch reductions, and small host-side conversions.

Each op's launcher sits beside its kernel (stats.py, epilogue.py, backward.py).
"""
from __future__ import annotations

import collections
import functools
import inspect
import math
import struct
import weakref
from typing import Optional

import torch
import triton.language as tl

from ..layout import stats_dtype
from . import config
from .config import MAX_REGISTERS

#: Kernel launches since import, by kernel name: tests use it to prove the kernels ran.
LAUNCHES: collections.Counter = collections.Counter()

Tensor = torch.Tensor
_CHANNELS_LAST = torch.channels_last
_CONTIGUOUS = torch.contiguous_format


_SMS: dict = {}


def num_sms(device: torch.device) -> int:
    """SMs of a CUDA device (1 elsewhere: the interpreter runs programs one by one);
    memoised per device, since every launch asks."""
    n = _SMS.get(device)
    if n is None:
        n = _num_sms(device)
        if device.type != "cuda" or device.index is not None:  # (None: the current device)
            _SMS[device] = n
    return n


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "meta":  # the compile report's stand-in for a GPU
        return config.META_SMS
    return 1


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, counted in LAUNCHES; on a GPU with .maxnreg set."""
    bind_launch(kernel, grid, **kwargs)(*args)


def bind_launch(kernel, grid, **kwargs):
    """One kernel's launch with its grid, constexprs and options fixed: the function
    returned, called with the kernel's run-time arguments, launches it, counted in
    LAUNCHES. It calls ``kernel.run``, what ``kernel[grid]``'s proxy calls, without making
    the proxy (Triton's API in 3.6 and 3.8 alike), and looks ``run`` up on each call, so
    a recorder patched onto the class (compile_check, the host benchmark's stub) sees
    every launch. The constexprs go by position after the call's own arguments (each
    kernel declares them last): a keyword dict of a dozen of them, built per launch and
    bound again by Triton, cost more host time than the rest of the call
    (bench/bench_host.py). Only the launch options (num_warps, ...) are keywords. A
    closure, not an object with ``__call__``: that call's own overhead was half of a
    stubbed launch's host time (0.9 of 1.9 us)."""
    if not config.INTERPRET:
        kwargs["maxnreg"] = MAX_REGISTERS
    name = kernel.fn.__name__
    names = constexpr_params(kernel.fn)
    missing = [n for n in names if n not in kwargs]
    if missing:  # (every launcher passes each constexpr: none relies on a default)
        raise TypeError(f"{name}: constexpr arguments {missing} not given")
    consts = tuple(kwargs.pop(n) for n in names)
    # (one dict for run's keywords, made once: grid, warmup and the options)
    run_kwargs = {"grid": grid, "warmup": False, **kwargs}

    def bound(*args):
        LAUNCHES[name] += 1
        # (a call with too few or too many arguments leaves Triton's binder a parameter
        # short or over, which it refuses: no count check here)
        kernel.run(*(args + consts), **run_kwargs)

    return bound


@functools.lru_cache(maxsize=None)
def constexpr_params(fn) -> tuple:
    """The constexpr parameters' names of a kernel function, which must come last."""
    params = list(inspect.signature(fn).parameters.values())
    flags = [p.annotation is tl.constexpr or "constexpr" in str(p.annotation) for p in params]
    first = flags.index(True) if True in flags else len(flags)
    if not all(flags[first:]):
        raise TypeError(f"{fn.__name__}: a runtime parameter follows a constexpr one")
    return tuple(p.name for p in params[first:])


def in_layout(t: Optional[Tensor], channels_last: bool) -> Optional[Tensor]:
    """``t`` in the given layout; copies only a tensor that is in neither (rare: a strided view)."""
    if t is None:
        return None
    fmt = _CHANNELS_LAST if channels_last else _CONTIGUOUS
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def as_dtype(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t`` in ``dtype``, without a call when it already is."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def branch_factor_arg(factor: Optional[Tensor], z: Tensor) -> Optional[Tensor]:
    """The factor as the kernels read it: [N] in z's dtype (one variant with and without
    it), [N, C] contiguous in the statistics dtype (a gate is never rounded to bf16)."""
    if factor is None:
        return None
    if factor.dim() == 1:
        return as_dtype(factor, z.dtype)
    N, C = z.shape[:2]
    if tuple(factor.shape) != (N, C):
        raise ValueError(f"factor: expected shape ({N},) or ({N}, {C}), got "
                         f"{tuple(factor.shape)}")
    return as_dtype(factor, stats_dtype(z)).contiguous()


_SCRATCH: dict = {}


def scratch(device: torch.device, dtype: torch.dtype) -> Tensor:
    """A one-element tensor standing in for an absent operand: its loads are predicated
    off, and a fixed dtype keeps the compiled variant the same with and without it."""
    t = _SCRATCH.get((device, dtype))
    if t is None:
        t = _SCRATCH[(device, dtype)] = torch.zeros(1, device=device, dtype=dtype)
    return t


_COUNTERS: dict = {}
#: every counter buffer made, the ones a larger buffer replaced in _COUNTERS too (a
#: binding's Tickets may still hold one): what the tests check is left zeroed
_ALL_COUNTERS: list = []  # weak references (a tensor's == is elementwise: no WeakSet)


def all_counters() -> list:
    """Every live counter buffer, for the checks that each launch leaves its zeroed."""
    return [b for b in (r() for r in _ALL_COUNTERS) if b is not None]


def counters(device: torch.device, n: int) -> Tensor:
    """``n`` int32 tickets, zero, for one launch of a one-launch reduction: each program
    takes a ticket when its partial is written, and the last one merges the partials and
    resets its ticket to zero. One buffer per device and stream, so launches that can run
    at once (other streams, other devices) never share one; launches on one stream run
    one after another and each leaves the buffer zeroed."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        # (grown, never shrunk; the old buffer stays valid for launches queued before)
        buf = _COUNTERS[key] = torch.zeros(max(n, 64), device=device, dtype=torch.int32)
        _ALL_COUNTERS.append(weakref.ref(buf))
    return buf


class Tickets:
    """``counters(device, n)`` for one binding: off CUDA the buffer itself, found once
    (launches there run one after another); on CUDA looked up on each call, since the
    current stream may differ from call to call."""
    __slots__ = ("device", "n", "buf")

    def __init__(self, device: torch.device, n: int):
        self.device, self.n = device, n
        self.buf = None if device.type == "cuda" else counters(device, n)

    def get(self) -> Tensor:
        buf = self.buf
        return buf if buf is not None else counters(self.device, self.n)


_TEMPLATES: dict = {}


def template(device: torch.device, shape: tuple, dtype: torch.dtype) -> Tensor:
    """A small tensor that per-channel outputs are allocated like, ``torch.empty_like``
    being the cheapest allocation from Python (a microsecond less than ``torch.empty``
    with a shape, device and dtype). Kept per device, shape and dtype; small shapes only."""
    key = (device, shape, dtype)
    t = _TEMPLATES.get(key)
    if t is None:
        t = _TEMPLATES[key] = torch.empty(shape, device=device, dtype=dtype)
    return t


_WORKSPACES: dict = {}


def workspace(role: str, device: torch.device, numel: int, dtype: torch.dtype) -> Tensor:
    """A flat buffer of at least ``numel`` elements for a launch's partials, kept per role,
    device, stream and dtype instead of allocated per launch: each launch reads its
    partials back within itself (the last program merges them), and launches on one
    stream run one after another, so the next launch that takes the buffer finds it free.
    Like the counters, one per stream keeps launches that can run at once apart, and it
    grows, never shrinks (so new input shapes cost no buffer each). ``role`` keeps the
    buffers one launch takes apart."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (role, device, stream, dtype)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        # (the old buffer stays valid for a binding, or a queued launch, that holds it)
        buf = _WORKSPACES[key] = torch.empty(numel, device=device, dtype=dtype)
    return buf


class Workspace:
    """One binding's ``shape`` view of ``workspace(role, ...)``: made once off CUDA, and
    on CUDA remade only when the current stream's buffer is another (Tickets likewise)."""
    __slots__ = ("role", "device", "shape", "numel", "dtype", "base", "view", "fixed")

    def __init__(self, role: str, device: torch.device, shape: tuple, dtype: torch.dtype):
        self.role, self.device, self.shape, self.dtype = role, device, tuple(shape), dtype
        self.numel = math.prod(self.shape)
        self.base = self.view = None
        self.fixed = device.type != "cuda"  # (no streams: the one view, made now)
        if self.fixed:
            self.get()

    def get(self) -> Tensor:
        if self.fixed and self.view is not None:
            return self.view
        buf = workspace(self.role, self.device, self.numel, self.dtype)
        if buf is not self.base:
            self.base, self.view = buf, buf[:self.numel].view(self.shape)
        return self.view


@functools.lru_cache(maxsize=64)
def hi_lo(v: float) -> tuple:
    """A double as two fp32 scalars, hi + lo (Triton passes float arguments as fp32), so
    an fp64 buffer gets the whole double that PyTorch would use."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, v - hi


def acc_dtype(t: Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def shape3(t: Tensor):
    N, C, H, W = t.shape
    return N, C, H * W
