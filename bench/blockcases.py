"""Building the benchmarked modules and the step each mode times.

Providers: ``eager`` (fusedres.reference blocks, which are torchvision's, or torchvision's
models), ``compile`` (torch.compile, default mode, of the eager module), ``fused`` (the
Triton blocks with the eager module's state_dict), ``fused_recompute`` (the same with
``recompute = True``: inner activations recomputed in the backward) and ``csrc_ref``
(the fused blocks on the C++/CUDA backend). Without CUDA, ``fused`` runs on the
reference backend, never the Triton interpreter.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import benchlib

PROVIDERS = ("eager", "compile", "fused", "fused_recompute", "csrc_ref")
FUSED_PROVIDERS = ("fused", "fused_recompute", "csrc_ref")
# bf16: bf16 convs and activations, fp32 batch norms; amp: an fp32 model under bf16 autocast.
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "amp": torch.float32}
LAYOUTS = {"cl": torch.channels_last, "nchw": torch.contiguous_format}
# Forward relative error against eager above which a result is flagged (and fails on CPU).
TOLERANCE = {"bf16": 5e-2, "amp": 5e-2, "fp32": 5e-3}


@dataclass(frozen=True)
class BlockCase:
    block: str          # "basic" | "bottleneck"
    inplanes: int
    planes: int
    hw: int
    stride: int = 1
    projection: bool = False

    @property
    def name(self) -> str:
        kind = "basic" if self.block == "basic" else "bneck"
        s = f"{kind}_c{self.inplanes}_{self.hw}"
        return s + (f"_proj_s{self.stride}" if self.projection else "")

    def build(self, fused: bool) -> nn.Module:
        import fusedres
        from fusedres import reference
        if self.block == "basic":
            cls = fusedres.FusedBasicBlock if fused else reference.BasicBlock
            out = self.planes
        else:
            cls = fusedres.FusedBottleneck if fused else reference.Bottleneck
            out = self.planes * 4
        ds = reference.projection(self.inplanes, out, self.stride) if self.projection else None
        return cls(self.inplanes, self.planes, self.stride, ds)


def randomize_bn(module: nn.Module) -> None:
    """Non-trivial BN parameters and running statistics (defaults are 1, 0, 0, 1)."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def place(module: nn.Module, dtype: str, layout: str) -> nn.Module:
    """Move to the device and layout; in bf16 every weight is bf16 but the batch norms'
    parameters and statistics stay fp32 (as under autocast); amp and fp32 stay fp32."""
    module = module.to(device=benchlib.DEVICE, memory_format=LAYOUTS[layout])
    if dtype == "bf16":
        module = module.to(torch.bfloat16)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.float()
    return module


def provider_backend(provider: str) -> Optional[str]:
    if provider in ("fused", "fused_recompute"):
        return benchlib.fused_backend()
    if provider == "csrc_ref":
        return "csrc_ref"
    return None


def require_provider(provider: str) -> None:
    if provider == "csrc_ref":
        mod, why = benchlib.csrc_status()
        if mod is None:
            pytest.skip(why)
    if provider == "compile" and not hasattr(torch, "compile"):
        pytest.skip("torch.compile not available")


def make_fused_twin(eager: nn.Module, build_fused: Callable[[], nn.Module],
                    recompute: bool) -> nn.Module:
    fused = build_fused()
    missing = fused.load_state_dict(eager.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    for m in fused.modules():
        if hasattr(m, "recompute"):
            m.recompute = recompute
    return fused


def with_backend(fn: Callable[[], object], backend: Optional[str]) -> Callable[[], object]:
    if backend is None:
        return fn

    def run():
        with benchlib.forced_backend(backend):
            return fn()
    return run


def compiled_graphs() -> Optional[int]:
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return None


def measure(benchmark, step: Callable, batch: int, provider: str, graphs0: Optional[int],
            warmup: int, rounds: int, profile_iters: int) -> dict:
    """Time ``step`` (images/s), its peak memory, the graphs torch.compile made for it and,
    for the fused providers, the fused kernels' time against the byte floor."""
    info = benchlib.time_device(step, warmup, rounds, benchmark)
    info["images_per_s"] = batch / (info["median_ms"] * 1e-3)
    info.update(benchlib.peak_memory(step))
    if provider == "compile" and graphs0 is not None:
        info["compiled_graphs"] = compiled_graphs() - graphs0
    if provider in FUSED_PROVIDERS:
        try:
            info.update(benchlib.fused_op_profile(step, iters=profile_iters))
        except Exception as e:  # a profiler problem must not cost the timing
            info["fused_note"] = f"profile failed: {type(e).__name__}: {e}"
    return info


# ---------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------


def block_steps(module: nn.Module, x: torch.Tensor, mode: str, backend: Optional[str]):
    """(forward, step) for a block, both on ``backend``: forward returns the output of
    one forward in the mode's grad setting; step is what is timed."""
    if mode == "eval_forward":
        module.eval()

        def forward():
            with torch.no_grad():
                return module(x)
        forward = with_backend(forward, backend)
        return forward, forward
    module.train()
    x.requires_grad_(True)
    forward = with_backend(lambda: module(x), backend)
    if mode == "train_forward":
        return forward, forward
    dy = torch.randn_like(forward(), memory_format=torch.preserve_format).detach()
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        module(x).backward(dy)
    return forward, with_backend(step, backend)


def model_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, amp: bool,
                backend: Optional[str]):
    """(forward, step) for a whole model on ``backend``: inference (eval, no_grad) or a
    train step (forward, cross-entropy, backward, SGD with momentum)."""
    autocast = (lambda: torch.autocast(benchlib.DEVICE.type, dtype=torch.bfloat16)) if amp \
        else contextlib.nullcontext
    if mode == "inference":
        model.eval()

        def forward():
            with torch.no_grad(), autocast():
                return model(x)
        forward = with_backend(forward, backend)
        return forward, forward
    model.train()
    # Small steps: the same batch over and over must not drive the weights to inf/NaN.
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def forward():
        with autocast():
            return model(x)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss
    return with_backend(forward, backend), with_backend(step, backend)


def check_against(eager_forward, forward, dtype: str) -> dict:
    """Relative error of one forward against eager's (flagged, and fatal on the CPU)."""
    ref = eager_forward().float()
    out = forward().float()
    err = benchlib.rel_err(out, ref)
    ok = bool(err <= TOLERANCE[dtype])
    if not benchlib.HAS_CUDA:
        assert ok, f"forward differs from eager: rel err {err:.2e} > {TOLERANCE[dtype]:.0e}"
    return {"check_rel_err": err, "check_ok": ok}
