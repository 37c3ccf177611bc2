"""Whole torchvision ResNet-18 and ResNet-50: inference and a train step.

A train step is forward, cross-entropy, backward and an SGD step (momentum 0.9).
Precisions: ``amp`` runs the fp32 model under bf16 autocast (mixed precision, as training
usually does); ``bf16`` holds bf16 weights and activations with fp32 batch norms (no
casts per step); ``fp32`` is fp32 throughout (cuDNN's default TF32 convolutions). The fused model is fusedres.convert(model)
when that exists, else torchvision's ResNet built with the fused blocks; either way it
starts from the eager model's state_dict.

Inference only: ``folded`` is fusedres.fold_for_inference of the eager model (batch norms
folded into the convs), tuned on the benchmark's input under the same autocast; and
``compile_freezing`` is torch.compile with ``torch._inductor.config.freezing = True``,
Inductor's own conv-BN folding, as a reference.
"""
from __future__ import annotations

import contextlib
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
INFERENCE_ONLY = ("folded", "compile_freezing")
LAYERS = {"resnet18": ("FusedBasicBlock", [2, 2, 2, 2]),
          "resnet50": ("FusedBottleneck", [3, 4, 6, 3])}
# Relative error of the logits against eager above which a result is flagged.
TOLERANCE = {"amp": 0.1, "bf16": 0.1, "fp32": 1e-2}

if PROFILE == "cpu":
    MODELS = ["resnet18"]
    # 48x48 images: at 32x32 the last stage normalises 2 values per channel at batch 2,
    # and bf16 rounding alone moves the logits by half their norm.
    CONFIGS = [("fp32", "nchw", 2), ("bf16", "cl", 2), ("amp", "cl", 2)]  # dtype, layout, N
    PROVIDERS = ["eager", "fused", "fused_recompute", "csrc_ref", "folded"]
    IMAGE = 48
    WARMUP, ROUNDS = 0, 1
elif PROFILE == "gpu-quick":
    MODELS = ["resnet50"]
    CONFIGS = [("amp", "cl", 256), ("bf16", "cl", 256)]
    PROVIDERS = ["eager", "fused", "folded", "compile", "compile_freezing"]
    IMAGE = 224
    WARMUP, ROUNDS = 3, 10
else:
    MODELS = ["resnet18", "resnet50"]
    CONFIGS = [("amp", "cl", 256), ("bf16", "cl", 256), ("amp", "nchw", 256),
               ("fp32", "cl", 256), ("fp32", "nchw", 256), ("amp", "cl", 128)]
    PROVIDERS = ["eager", "compile", "fused", "fused_recompute", "csrc_ref", "folded",
                 "compile_freezing"]
    IMAGE = 224
    WARMUP, ROUNDS = 3, 20

def _selected(mode, config, provider) -> bool:
    if provider == "fused_recompute" and mode == "inference":
        return False
    if provider in INFERENCE_ONLY and mode != "inference":
        return False
    if PROFILE == "cpu" and provider == "folded":
        return True  # plain torch convolutions on the CPU: cheap in every precision
    if PROFILE == "gpu-quick" and provider == "compile_freezing":
        return config[0] == "amp"  # one compile, as for "compile"
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


PARAMS = [pytest.param(name, mode, cfg, prov, id=f"{name}-{mode}-{cfg[0]}-{cfg[1]}-N{cfg[2]}-{prov}",
                       marks=[pytest.mark.compile] if prov == "compile_freezing" else [])
          for name in MODELS for mode in MODES for cfg in CONFIGS for prov in PROVIDERS
          if _selected(mode, cfg, prov)]
# Freezing compiles are slow: after every other case but the "compile" ones (which
# conftest.py moves last), so a run cut off by a timeout loses only compile figures.
PARAMS.sort(key=lambda p: p.values[3] == "compile_freezing")


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
        module = torch.compile(ref) if provider in ("compile", "compile_freezing") else ref
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = torch.randn(batch, 3, IMAGE, IMAGE, device=benchlib.DEVICE, dtype=DTYPES[dtype])
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=benchlib.DEVICE)
    amp = dtype == "amp"
    if provider == "folded":
        module, via = folded_model(ref, x, amp)
    with contextlib.ExitStack() as stack:
        if provider == "compile_freezing":
            # Inductor folds conv + BN only with freezing on; it compiles at the first call.
            import torch._inductor.config as inductor_config
            stack.enter_context(inductor_config.patch(freezing=True))
            via = "torch.compile, inductor freezing=True"
        _run_model(benchmark, name, mode, dtype, layout, batch, provider, module, ref, x, y,
                   amp, via)


def folded_model(ref: nn.Module, x: torch.Tensor, amp: bool):
    """(fold_for_inference(ref) tuned on x under the step's autocast, how it was made)."""
    import fusedres
    autocast = (torch.autocast(benchlib.DEVICE.type, dtype=torch.bfloat16) if amp
                else contextlib.nullcontext())
    with autocast:
        module = fusedres.fold_for_inference(ref, example_input=x)
    how = "tuned on the input" if benchlib.HAS_CUDA else "CPU: plain torch convolutions"
    return module, f"fusedres.fold_for_inference ({how})"


def _run_model(benchmark, name, mode, dtype, layout, batch, provider, module, ref, x, y, amp,
               via):
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
    if provider == "compile_freezing" and graphs0 is not None:
        info["compiled_graphs"] = compiled_graphs() - graphs0
    if mode == "train_step":
        loss = last["out"]
        info["final_loss"] = float(loss.detach())
        assert torch.isfinite(loss), "the repeated train step diverged"
    benchlib.record(benchmark, info)
