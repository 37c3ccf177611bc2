"""Which implementation runs the fused primitives.

CUDA tensors take the compiled Triton kernels; CPU tensors take the plain-PyTorch reference,
unless TRITON_INTERPRET=1 is set, when the same Triton kernels run in Triton's interpreter.
``FUSEDRES_BACKEND=triton|reference|csrc_ref`` forces one, and ``use_backend(name)``
(a context manager) takes precedence over the environment.
"""
from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("triton", "reference", "csrc_ref")
# Process-wide, not thread-local: the autograd engine runs CUDA backward passes on its own
# threads, and `with use_backend(...): loss.backward()` must reach them.
_forced: list = []




def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the fused primitives on backend ``name`` inside the ``with`` block."""
    _check(name, "use_backend(name)")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


# os.environ.get encodes the key and decodes the value on every call (microseconds, and
# this runs once per fused op): read the raw bytes mapping behind it where there is one.
_ENV_RAW = getattr(os.environ, "_data", None)


_ENV_KEYS = {n: os.environ.encodekey(n) for n in ("FUSEDRES_BACKEND", "TRITON_INTERPRET")}


def _env(name: str) -> str:
    if _ENV_RAW is None:
        return os.environ.get(name, "").strip()
    raw = _ENV_RAW.get(_ENV_KEYS[name])
    return "" if raw is None else os.environ.decodevalue(raw).strip()


def _interpreting() -> bool:
    return _env("TRITON_INTERPRET") not in ("", "0")


def backend_for(device: torch.device) -> str:
    """The backend that a tensor on ``device`` runs on right now."""
    forced = _forced[-1] if _forced else None
    if forced is None:
        env = _env("FUSEDRES_BACKEND")
        forced = _check(env, "FUSEDRES_BACKEND") if env else None
    if forced is not None:
        if forced == "triton" and device.type != "cuda" and not _interpreting():
            raise RuntimeError("the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 "
                               f"to run its kernels on the CPU; got a tensor on {device}")
        return forced
    if device.type == "cuda" or _interpreting():
        return "triton"
    return "reference"


def implementation(device: torch.device):
    """The module holding bn_stats / bn_act_fwd / bn_act_bwd for ``device``."""
    name = backend_for(device)
    if name == "triton":
        from . import kernels
        return kernels
    if name == "csrc_ref":
        from . import csrc
        return csrc.load(device)
    from . import reference
    return reference
