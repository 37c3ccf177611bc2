"""``--model``: a torchvision name, ``timm:<name>`` or ``package.module:factory``.

Models are built with random weights (nothing is downloaded). Without ``--checkpoint``
the batch norms get random parameters and statistics, so that every term of the fused
math matters in a check; with one, its state_dict is loaded before converting.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import os
from typing import Optional

from ..api import UsageError

DEFAULT_MODEL = "resnet50"
MODEL_HELP = ("a torchvision model name (e.g. resnet18, resnext50_32x4d), timm:<name> (e.g. "
              "timm:resnet50d; timm's keyword arguments go in --model-kwargs) or "
              "package.module:factory (your own: a function returning the nn.Module, called "
              "with --model-kwargs; the package must be importable, e.g. via PYTHONPATH)")


def parse_kwargs(text: Optional[str]) -> dict:
    """``k=v,k2=v2`` -> dict; values are Python literals where they parse, else strings."""
    out: dict = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UsageError(f"--model-kwargs takes k=v,k2=v2 (e.g. drop_path_rate=0.1), got "
                             f"{item.strip()!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _close(name: str, names) -> str:
    near = difflib.get_close_matches(name, list(names), n=4, cutoff=0.6)
    return f" (close: {', '.join(near)})" if near else ""


def _timm(name: str, kwargs: dict):
    try:
        import timm
    except ImportError:
        raise UsageError("--model timm:...: timm is not installed (pip install timm)") from None
    if not timm.is_model(name):
        raise UsageError(f"--model timm:{name}: timm has no model {name!r}"
                         f"{_close(name, timm.list_models())}")
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise UsageError(f"--model-kwargs for timm:{name}: {e}") from None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return model, tuple(cfg.get("input_size", (3, 224, 224)))


def _factory(spec: str, kwargs: dict):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        path = os.environ.get("PYTHONPATH", "not set")
        raise UsageError(f"--model {spec}: cannot import {module_name} ({e}); is its folder "
                         f"on PYTHONPATH? (now: {path})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"--model {spec}: {module_name} has no function {attr!r}")
    try:
        return factory(**kwargs), (3, 224, 224)
    except TypeError as e:
        raise UsageError(f"--model {spec}: calling {attr}(**{kwargs}) failed: {e}") from None


def _torchvision(name: str, kwargs: dict):
    import torchvision
    names = torchvision.models.list_models()
    if name not in names:
        raise UsageError(f"--model {name}: not a torchvision model{_close(name, names)}; for "
                         "timm write timm:<name>, for your own model package.module:factory")
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs), (3, 224, 224)
    except TypeError as e:
        raise UsageError(f"--model-kwargs for {name}: {e}") from None


def randomize_norms(model, seed: int) -> None:
    """Random batch-norm parameters and statistics (a fresh model's are 1, 0, 0, 1, which
    would leave terms of the fused math untested)."""
    import torch
    from torch import nn
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            c = m.num_features
            if m.weight is not None:
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def load_checkpoint(model, path: str) -> None:
    """Load a state_dict (or a dict holding one under 'state_dict' or 'model') into ``model``."""
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"--checkpoint {path}: no such file") from None
    except Exception as e:  # a file torch cannot read: the user's to fix
        raise UsageError(f"--checkpoint {path}: cannot read it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UsageError(f"--checkpoint {path}: expected a state_dict, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise UsageError(f"--checkpoint {path} does not fit the model: "
                         + " ".join(line.strip() for line in lines[:3])) from None


def load_model(spec: str, kwargs_text: Optional[str] = None, checkpoint: Optional[str] = None,
               seed: int = 0):
    """(model, default input size C,H,W) for a ``--model`` value; UsageError when unknown."""
    import torch
    from torch import nn
    kwargs = parse_kwargs(kwargs_text)
    torch.manual_seed(seed)
    if spec.startswith("timm:"):
        model, size = _timm(spec[len("timm:"):], kwargs)
    elif ":" in spec:
        model, size = _factory(spec, kwargs)
    else:
        model, size = _torchvision(spec, kwargs)
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec}: the factory returned {type(model).__name__}, "
                         "not a torch.nn.Module")
    if checkpoint:
        load_checkpoint(model, checkpoint)
    else:
        randomize_norms(model, seed)
    return model, size


def model_from_args(args, command: str):
    """(device, model, default input size) for check and bench: the device and backend
    checked first, then the model built (a progress line: timm models take seconds)."""
    from ..api import Progress
    from . import common
    dev = common.device(args.device)
    common.require_backend(dev)
    if getattr(args, "results_file", None):
        common.require_writable_file(args.results_file, "--results-file")
    steps = Progress(True, 1, f"fusedres {command}")
    steps.step(f"building {args.model}")
    try:
        model, size = load_model(args.model, args.model_kwargs, args.checkpoint, args.seed)
    finally:
        steps.close()
    return dev, model, size
