"""Residual blocks at ResNet stage shapes: eval forward, train forward, train step.

A train step here is forward + backward with a fixed output gradient and the input
requiring grad (it is the previous block's output in a network); the optimizer step is
in the model benchmarks. Each result records images/s, the median device time, peak
memory, and for the fused providers the bytes their primitives must move, the time the
fused kernels took (profiler) and that against the floor bytes / copy bandwidth.
"""
from __future__ import annotations

import pytest
import torch

import benchlib
from blockcases import (DTYPES, FUSED_PROVIDERS, BlockCase, block_steps, check_against,
                        compiled_graphs, make_fused_twin, measure, place, provider_backend,
                        randomize_bn, require_provider)

pytestmark = pytest.mark.block

PROFILE = benchlib.profile()
MODES = ["eval_forward", "train_forward", "train_step"]

if PROFILE == "cpu":
    CASES = [BlockCase("basic", 8, 8, 8), BlockCase("bottleneck", 16, 4, 8),
             BlockCase("bottleneck", 16, 8, 8, stride=2, projection=True)]
    # (dtype, layout, batch)
    CONFIGS = [("fp32", "nchw", 2), ("bf16", "cl", 2)]
    PROVIDERS = ["eager", "compile", "fused", "fused_recompute", "csrc_ref"]
    WARMUP, ROUNDS = 1, 3
else:
    CASES = [BlockCase("basic", 64, 64, 56), BlockCase("bottleneck", 256, 64, 56),
             BlockCase("bottleneck", 2048, 512, 7),
             BlockCase("bottleneck", 256, 128, 56, stride=2, projection=True)]
    PROVIDERS = ["eager", "compile", "fused", "fused_recompute", "csrc_ref"]
    if PROFILE == "gpu-quick":
        # All providers in bf16 channels_last at batch 256; fp32 NCHW for one block only
        # and without torch.compile.
        CONFIGS = [("bf16", "cl", 256), ("fp32", "nchw", 256)]
        WARMUP, ROUNDS = 5, 20
    else:
        CONFIGS = [("bf16", "cl", 256), ("bf16", "nchw", 256), ("fp32", "cl", 256),
                   ("fp32", "nchw", 256), ("bf16", "cl", 64)]
        WARMUP, ROUNDS = 5, 50


def _selected(case: BlockCase, mode: str, config, provider: str) -> bool:
    dtype, layout, batch = config
    if provider == "fused_recompute" and mode == "eval_forward":
        return False                      # recompute changes only what training saves
    if PROFILE == "cpu":
        # One tiny torch.compile case: it proves the path, and compiling costs seconds.
        if provider == "compile":
            return case.block == "basic" and mode == "eval_forward" and dtype == "fp32"
        return dtype == "fp32" or provider in ("eager", "fused")
    if PROFILE == "gpu-quick":
        if (dtype, layout) != ("bf16", "cl"):
            return (case.name == "bneck_c256_56" and mode == "train_step"
                    and provider in ("eager", "fused"))
        # Compiling costs 10-20 s a graph: eval and the train step (its forward is what
        # train_forward would compile again) keep gpu_check.sh inside its budget.
        return provider != "compile" or mode != "train_forward"
    return True


PARAMS = [pytest.param(case, mode, cfg, prov,
                       id=f"{case.name}-{mode}-{cfg[0]}-{cfg[1]}-N{cfg[2]}-{prov}")
          for case in CASES for mode in MODES for cfg in CONFIGS for prov in PROVIDERS
          if _selected(case, mode, cfg, prov)]


@pytest.mark.parametrize("case, mode, config, provider", PARAMS)
def test_block(benchmark, case: BlockCase, mode: str, config, provider: str):
    require_provider(provider)
    dtype, layout, batch = config
    torch.manual_seed(0)
    eager = case.build(fused=False)
    randomize_bn(eager)
    eager = place(eager, dtype, layout)
    x = torch.randn(batch, case.inplanes, case.hw, case.hw, device=benchlib.DEVICE,
                    dtype=DTYPES[dtype])
    x = x.contiguous(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)

    backend = provider_backend(provider)
    if provider == "eager":
        module = eager
    elif provider == "compile":
        module = torch.compile(eager)
    else:
        module = make_fused_twin(eager, lambda: place(case.build(fused=True), dtype, layout),
                                 recompute=provider == "fused_recompute")
    graphs0 = compiled_graphs()
    ref_x = x.detach().clone()

    def ref_forward():  # the plain eager module, even behind torch.compile
        eager.train(mode != "eval_forward")
        with torch.no_grad():
            return eager(ref_x)
    forward, step = block_steps(module, x, mode, backend)

    info = {"kind": "block", "case": case.name, "mode": mode, "dtype": dtype, "layout": layout,
            "batch": batch, "provider": provider, "backend": backend,
            "shape": [batch, case.inplanes, case.hw, case.hw]}
    info.update(check_against(ref_forward, forward, dtype))
    benchmark.group = f"block {case.name} {mode} {dtype} {layout} N{batch}"
    info.update(measure(benchmark, step, batch, provider, graphs0, WARMUP, ROUNDS,
                        3 if benchlib.HAS_CUDA else 1))
    benchlib.record(benchmark, info)
    if provider in FUSED_PROVIDERS and "profile failed" not in info.get("fused_note", ""):
        # the byte floor column must not go blank unnoticed
        assert info.get("fused_bytes", 0) > 0 and info.get("fused_ms", 0) > 0, info.get("fused_note")
