"""Where a ResNet-50 step's GPU time goes, by category, and its host time against its GPU time.

    python bench/profile_resnet.py [--budget 150]        (a CUDA GPU; skips without one)

1. torch.profiler over eager, torch.compile and fused (fusedres.convert) ResNet-50, train
   step and inference, batch 64 and 256, bf16 autocast, channels_last: GPU time per step in
   convolutions (cuDNN / implicit-GEMM kernels), fused kernels (fusedres's Triton kernels,
   named ``_bn_*``), other elementwise and reduction kernels, and GPU idle (the step's wall
   time on the GPU timeline not covered by any kernel).
2. The host-path issue's figure: a fused ResNet-50 train step's host time (CPU wall time of
   forward and backward, ``torch.cuda.synchronize`` only at the end) against its GPU time
   (CUDA events around the same step), at batch 32, 64 and 256; eager alongside.

Prints markdown tables (gpu_check appends them to table.md). Cases left when ``--budget``
seconds are spent are listed as not run. Every number is measured in this run on this GPU.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CONV_MARKERS = ("conv", "cudnn", "implicit_gemm", "xmma", "fprop", "dgrad", "wgrad", "cutlass",
                "gemm", "nchwToNhwc", "nhwcToNchw")


def category(name: str) -> str:
    """The category of a GPU kernel by its name."""
    if name.startswith("_bn_"):
        return "fused"
    low = name.lower()
    if "bn_" in low or "batch_norm" in low or "batchnorm" in low:  # cuDNN's own BN kernels
        return "other"
    if any(m.lower() in low for m in CONV_MARKERS):
        return "conv"
    return "other"


def _models(batch: int):
    import torchvision

    import fusedres
    eager = torchvision.models.resnet50().cuda().to(memory_format=torch.channels_last)
    fused = fusedres.convert(copy.deepcopy(eager))
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    return eager, fused, x


def _step_fn(model, x, mode: str):
    if mode == "inference":
        model.eval()

        def step():
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                model(x)
        return step
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(x).float().sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def profile_step(step, iters: int = 3) -> dict:
    """ms per step of GPU time by category, and idle ms, from a torch.profiler trace."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    spans, totals = [], {"conv": 0.0, "fused": 0.0, "other": 0.0}
    for e in prof.events():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        start, dur = e.time_range.start, e.time_range.end - e.time_range.start
        if dur <= 0:
            continue
        spans.append((start, start + dur))
        totals[category(e.name)] += dur
    spans.sort()
    busy, end, first, last = 0.0, None, spans[0][0] if spans else 0, 0
    for s, t in spans:  # the union of kernel intervals
        if end is None or s > end:
            busy += t - s
            end = t
        elif t > end:
            busy += t - end
            end = t
        last = max(last, t)
    out = {k: v / iters / 1e3 for k, v in totals.items()}  # us -> ms per step
    out["idle"] = max(0.0, (last - first) - busy) / iters / 1e3
    out["wall"] = (last - first) / iters / 1e3
    return out


def host_vs_gpu(step, iters: int = 10) -> tuple:
    """(host ms, GPU ms) per step: the CPU time until the step has been issued, then the
    CUDA events' time once it has run (one synchronize, at the end)."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    host, gpu = [], []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
        stop.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(stop))
    host.sort()
    gpu.sort()
    return host[len(host) // 2], gpu[len(gpu) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for all cases")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_resnet: skipped, no CUDA device (these are GPU measurements)")
        return 0
    torch.backends.cudnn.benchmark = True
    deadline = time.time() + a.budget
    skipped = []
    models = {}

    def model(batch, name):
        if batch not in models:
            models.clear()
            torch.cuda.empty_cache()
            models[batch] = _models(batch)
        eager, fused, x = models[batch]
        if name == "torch.compile":
            return torch.compile(copy.deepcopy(eager)), x
        return (fused if name == "fused" else eager), x

    print(f"## Where a ResNet-50 step's GPU time goes ({torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}; bf16 autocast, channels_last; ms per step)\n")
    print("| mode | batch | provider | conv | fused | other kernels | GPU idle | GPU wall |")
    print("|---|---|---|---|---|---|---|---|")
    # torch.compile last: compiling a ResNet-50 train step takes a minute or two
    providers = ("eager", "fused") if a.no_compile else ("eager", "fused", "torch.compile")
    cases = sorted(((mode, batch, name) for name in providers for mode in ("train_step", "inference")
                    for batch in (64, 256)), key=lambda c: (c[2] == "torch.compile", c[1]))
    for mode, batch, name in cases:
        if time.time() > deadline:
            skipped.append(f"{mode} batch {batch} {name}")
            continue
        try:
            m, x = model(batch, name)
            r = profile_step(_step_fn(m, x, mode))
        except Exception as e:  # noqa: BLE001 - one case's failure is reported, not fatal
            print(f"| {mode} | {batch} | {name} | failed: {type(e).__name__}: {e} |||||")
            continue
        print(f"| {mode} | {batch} | {name} | {r['conv']:.2f} | {r['fused']:.2f} | "
              f"{r['other']:.2f} | {r['idle']:.2f} | {r['wall']:.2f} |")
    print("\n## ResNet-50 train step: host time against GPU time (ms; host = CPU time of "
          "forward and backward, synchronize only at the end)\n")
    print("| batch | provider | host ms | GPU ms | host / GPU |")
    print("|---|---|---|---|---|")
    for batch in (32, 64, 256):
        for name in ("fused", "eager"):
            if time.time() > deadline:
                skipped.append(f"host-vs-gpu batch {batch} {name}")
                continue
            m, x = model(batch, name)
            h, g = host_vs_gpu(_step_fn(m, x, "train_step"))
            print(f"| {batch} | {name} | {h:.2f} | {g:.2f} | {h / g:.2f} |")
    if skipped:
        print(f"\nnot run (the {a.budget:.0f} s budget was spent): " + "; ".join(skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
