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


# This runs once per fused op, so it is memoised on what decides it: the device, the
# innermost use_backend(), and the two environment variables as raw bytes (os.environ.get
# would encode the key and decode the value on every call).
_ENV_RAW = getattr(os.environ, "_data", None)
_ENV_KEYS = {n: os.environ.encodekey(n) for n in ("FUSEDRES_BACKEND", "TRITON_INTERPRET")}


def _env(name: str) -> str:
    if _ENV_RAW is None:
        return os.environ.get(name, "").strip()
    raw = _ENV_RAW.get(_ENV_KEYS[name])
    return "" if raw is None else os.environ.decodevalue(raw).strip()


def _interpreting() -> bool:
    return _env("TRITON_INTERPRET") not in ("", "0")


def _decide(device: torch.device) -> str:
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


def _state_key(device: torch.device) -> tuple:
    if _ENV_RAW is None:
        return (device, _forced[-1] if _forced else None,
                os.environ.get("FUSEDRES_BACKEND"), os.environ.get("TRITON_INTERPRET"))
    return (device, _forced[-1] if _forced else None,
            _ENV_RAW.get(_ENV_KEYS["FUSEDRES_BACKEND"]), _ENV_RAW.get(_ENV_KEYS["TRITON_INTERPRET"]))


_DECIDED: dict = {}


def backend_for(device: torch.device) -> str:
    """The backend that a tensor on ``device`` runs on right now."""
    key = _state_key(device)
    name = _DECIDED.get(key)
    if name is None:
        name = _DECIDED[key] = _decide(device)  # raises (and caches nothing) on a bad name
    return name


_IMPLEMENTATIONS: dict = {}


def implementation(device: torch.device):
    """The module holding bn_stats / bn_act_fwd / bn_act_bwd for ``device``."""
    key = _state_key(device)
    impl = _IMPLEMENTATIONS.get(key)
    if impl is None:
        impl = _IMPLEMENTATIONS[key] = _load(backend_for(device), device)
    return impl


def _load(name: str, device: torch.device):
    if name == "triton":
        from . import kernels
        return kernels
    if name == "csrc_ref":
        from . import csrc
        return csrc.load(device)
    from . import reference
    return reference
