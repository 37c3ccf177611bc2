"""Whole torchvision ResNet-18 and ResNet-50: inference and a train step.

A train step is forward, cross-entropy, backward and an SGD step (momentum 0.9).
Precisions: ``amp`` runs the fp32 model under bf16 autocast (mixed precision, as training
usually does); ``bf16`` holds bf16 weights and activations with fp32 batch norms (no
casts per step); ``fp32`` is fp32 throughout (cuDNN's default TF32 convolutions). The fused model is fusedres.convert(model)
when that exists, else torchvision's ResNet built with the fused blocks; either way it
starts from the eager model's state_dict.
"""
from __future__ import annotations

import copy
import importlib
import os

import pytest
import torch
from torch import nn

import benchlib
from blockcases import (DTYPES, FUSED_PROVIDERS, compiled_graphs, measure, model_steps, place, provider_backend,
                        randomize_bn, require_provider)

pytestmark = pytest.mark.model
torchvision = pytest.importorskip("torchvision")

PROFILE = benchlib.profile()
COMPILE_TRAIN = os.environ.get("FUSEDRES_BENCH_COMPILE_TRAIN", "0") not in ("", "0")
MODES = ["train_step", "inference"]
LAYERS = {"resnet18": ("FusedBasicBlock", [2, 2, 2, 2]),
          "resnet50": ("FusedBottleneck", [3, 4, 6, 3])}
# Relative error of the logits against eager above which a result is flagged.
TOLERANCE = {"amp": 0.1, "bf16": 0.1, "fp32": 1e-2}

if PROFILE == "cpu":
    MODELS = ["resnet18"]
    # 48x48 images: at 32x32 the last stage normalises 2 values per channel at batch 2,
    # and bf16 rounding alone moves the logits by half their norm.
    CONFIGS = [("fp32", "nchw", 2), ("bf16", "cl", 2), ("amp", "cl", 2)]  # dtype, layout, N
    PROVIDERS = ["eager", "fused", "fused_recompute", "csrc_ref"]
    IMAGE = 48
    WARMUP, ROUNDS = 0, 1
elif PROFILE == "gpu-quick":
    MODELS = ["resnet50"]
    CONFIGS = [("amp", "cl", 256), ("bf16", "cl", 256)]
    PROVIDERS = ["eager", "fused", "compile"]
    IMAGE = 224
    WARMUP, ROUNDS = 3, 10
else:
    MODELS = ["resnet18", "resnet50"]
    CONFIGS = [("amp", "cl", 256), ("bf16", "cl", 256), ("amp", "nchw", 256),
               ("fp32", "cl", 256), ("fp32", "nchw", 256), ("amp", "cl", 128)]
    PROVIDERS = ["eager", "compile", "fused", "fused_recompute", "csrc_ref"]
    IMAGE = 224
    WARMUP, ROUNDS = 3, 20

def _selected(mode, config, provider) -> bool:
    if provider == "fused_recompute" and mode == "inference":
        return False
    if PROFILE == "cpu" and config[0] != "fp32":
        # A CPU figure is a harness check: all providers once, the precisions once each.
        return provider == ("fused" if config[0] == "amp" else "eager") or provider == "fused"
    if PROFILE == "gpu-quick" and provider == "compile":
        # Inference only, one precision: compiling ResNet-50's train step (forward and
        # backward graphs) takes a minute or two, which gpu_check.sh's 8-minute budget
        # holds only when the tests are quick: it asks for it last, with
        # FUSEDRES_BENCH_COMPILE_TRAIN=1, if time is left.
        return config[0] == "amp" and (mode == "inference" or COMPILE_TRAIN)
    return True


PARAMS = [pytest.param(name, mode, cfg, prov, id=f"{name}-{mode}-{cfg[0]}-{cfg[1]}-N{cfg[2]}-{prov}")
          for name in MODELS for mode in MODES for cfg in CONFIGS for prov in PROVIDERS
          if _selected(mode, cfg, prov)]


def _convert_fn():
    """fusedres.convert(model) if the package has it (it may not be written yet)."""
    import fusedres
    fn = getattr(fusedres, "convert", None)
    if callable(fn):
        return fn
    try:
        return getattr(importlib.import_module("fusedres.convert"), "convert", None)
    except Exception:
        return None


def fused_model(name: str, eager: nn.Module):
    """(fused model with eager's weights copied, how it was made)."""
    import fusedres
    fused_types = (fusedres.FusedBasicBlock, fusedres.FusedBottleneck)
    convert = _convert_fn()
    if convert is not None:
        try:
            model = copy.deepcopy(eager)
            out = convert(model)
            model = out if isinstance(out, nn.Module) else model
            found = getattr(fusedres, "fused_blocks", None)
            if (found(model) if found else
                    any(isinstance(m, fused_types) for m in model.modules())):
                return model, "fusedres.convert"
        except Exception:
            pass  # fall back to building it
    block, layers = LAYERS[name]
    model = torchvision.models.resnet.ResNet(getattr(fusedres, block), layers)
    model.load_state_dict(eager.state_dict())
    return model, "ResNet(fused blocks)"


@pytest.mark.parametrize("name, mode, config, provider", PARAMS)
def test_model(benchmark, name, mode, config, provider):
    require_provider(provider)
    dtype, layout, batch = config
    torch.manual_seed(0)
    eager = getattr(torchvision.models, name)(weights=None)
    randomize_bn(eager)
    via = None
    if provider in FUSED_PROVIDERS:
        module, via = fused_model(name, eager)
        for m in module.modules():
            if hasattr(m, "recompute"):
                m.recompute = provider == "fused_recompute"
        module = place(module, dtype, layout)
        ref = place(eager, dtype, layout)
    else:
        ref = place(eager, dtype, layout)
        module = torch.compile(ref) if provider == "compile" else ref
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = torch.randn(batch, 3, IMAGE, IMAGE, device=benchlib.DEVICE, dtype=DTYPES[dtype])
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=benchlib.DEVICE)
    amp = dtype == "amp"
    backend = provider_backend(provider)
    forward, step = model_steps(module, x, y, mode, amp, backend)

    info = {"kind": "model", "case": name, "mode": mode, "dtype": dtype, "layout": layout,
            "batch": batch, "provider": provider, "backend": backend, "image": IMAGE,
            "fused_via": via}
    # One forward of each against the other before any optimizer step.
    ref_fwd, _ = (model_steps(ref, x, y, mode, amp, None) if ref is not module
                  else (forward, None))
    graphs0 = compiled_graphs()
    out = forward().detach().float()   # in the mode's own grad setting: no extra compile
    with torch.no_grad():
        expect = ref_fwd().float()
    err = benchlib.rel_err(out, expect)
    info.update(check_rel_err=err, check_ok=bool(err <= TOLERANCE[dtype]))
    if not benchlib.HAS_CUDA:
        assert info["check_ok"], f"logits differ from eager: rel err {err:.2e}"

    benchmark.group = f"model {name} {mode} {dtype} {layout} N{batch}"
    last = {}
    timed_step = step

    def step():
        last["out"] = timed_step()
    info.update(measure(benchmark, step, batch, provider, graphs0, WARMUP, ROUNDS,
                        2 if benchlib.HAS_CUDA else 1))
    if mode == "train_step":
        loss = last["out"]
        info["final_loss"] = float(loss.detach())
        assert torch.isfinite(loss), "the repeated train step diverged"
    benchlib.record(benchmark, info)
