"""What the subcommands share: argument types, the device, the backend, the output folder.

Every user mistake becomes a UsageError (fusedres.api), which fusedres.cli.main prints as
one line on stderr with exit status 2; argparse's own errors exit 2 the same way.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from ..api import UsageError

__all__ = ["UsageError", "device", "input_size", "positive_int", "require_backend",
           "require_writable", "require_writable_file"]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def input_size(text: str) -> tuple:
    """argparse type: C,H,W (commas or spaces), each >= 1."""
    parts = [p for p in text.replace(",", " ").split() if p]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,224,224, got {text!r}")
    return tuple(positive_int(p) for p in parts)


def device(name):
    """The torch.device for ``--device`` (default: cuda when there is a GPU, else cpu);
    UsageError for a CUDA device without a GPU or a name torch does not know."""
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: expected cpu or cuda[:N], got {name!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is available here (torch "
                             f"{torch.__version__}); leave --device out to run on the CPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} GPUs")
    elif dev.type != "cpu":
        raise UsageError(f"--device: expected cpu or cuda[:N], got {name!r}")
    return dev


def require_backend(dev) -> str:
    """The fused ops' backend for ``dev``; UsageError for a bad FUSEDRES_BACKEND."""
    from ..api import _backend
    return _backend(dev)


def require_writable(folder: str, what: str = "--out") -> None:
    """Create ``folder`` if needed and prove a file can be written there, before any work."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fusedres-write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"{what} {folder}: cannot write there ({e.strerror or e})") from None


def require_writable_file(path: str, what: str) -> None:
    """``path``'s folder is writable and ``path`` is not a folder, before any work."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path}: is a folder, expected a file name")
    require_writable(os.path.dirname(os.path.abspath(path)), what)
