"""``python -m fusedres check``: convert a torchvision ResNet and check it against the original.

Builds the model with random weights (nothing is downloaded) and random batch-norm
parameters and statistics, so that every term of the fused math matters, converts a copy,
and runs one train step (forward, backward) and one eval forward through both:

1. in float64, fused against PyTorch: outputs, every gradient, every running statistic
   must agree to 1e-9 of max|ref| (rounding never reaches a ReLU boundary in fp64, so this
   checks the whole model exactly);
2. in the chosen dtype (fp32, or bf16/fp16 through autocast), fused and PyTorch both
   against the float64 model: the fused error in outputs and running statistics must be
   at most max(floor, 2 x PyTorch's own) (flash-attention's rule). Gradients are judged
   the same way on their norm over all parameters, but only warn: in low precision a
   pre-activation within rounding of zero flips a ReLU, and on small inputs that moves
   the gradients of a deep network by up to tens of percent, PyTorch's as much as ours.

On a CUDA GPU it then times eager PyTorch, torch.compile and the fused model (train step
and inference, images/s and peak memory). On a CPU-only machine the Triton kernels run in
Triton's interpreter (TRITON_INTERPRET=1, set by ``python -m fusedres`` before Triton is
imported) on a small input.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Callable, Optional

import torch
from torch import nn

from . import backend_for, convert, fused_blocks

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Error floors relative to max|ref| for a whole model: ~15-50 batch norms of rounding.
_FLOOR = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}
TOL64 = 1e-9


def resnet_names() -> list:
    import torchvision.models.resnet as tv
    return [n for n in tv.__all__ if n[0].islower()]


def build(name: str, seed: int = 0) -> nn.Module:
    """torchvision ResNet ``name``, random weights, random BN parameters and statistics."""
    import torchvision
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def rel_err(result: torch.Tensor, ref: torch.Tensor) -> float:
    """max|result - ref| / max|ref|, in float64."""
    ref = ref.detach().double()
    scale = ref.abs().max().item() or 1.0
    return (result.detach().double() - ref).abs().max().item() / scale


def norm_err(results: dict, refs: dict) -> float:
    """||result - ref|| / ||ref|| over all the tensors together."""
    num = sum((results[n].double() - refs[n].double()).square().sum() for n in refs)
    den = sum(refs[n].double().square().sum() for n in refs)
    return (num / den).sqrt().item() if den > 0 else float(num > 0)


class Run:
    """One model's train step and eval forward, and what they produced."""

    def __init__(self, model: nn.Module, x: torch.Tensor, amp: Optional[torch.dtype]):
        dev = x.device.type
        model.train()
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
        out.float().square().mean().backward()
        self.train_out = out.detach()
        self.grads = {n: p.grad.detach() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        model.eval()
        with torch.no_grad(), torch.autocast(dev, dtype=amp or torch.float32,
                                             enabled=amp is not None):
            self.eval_out = model(x).detach()


def _worst(results: dict, refs: dict, names) -> tuple:
    errs = [(rel_err(results[n], refs[n]), n) for n in names]
    return max(errs) if errs else (0.0, "-")


def _counts_equal(a: Run, b: Run) -> bool:
    return all(torch.equal(a.buffers[n], b.buffers[n])
               for n, t in b.buffers.items() if not t.is_floating_point())


def compare64(fused: Run, ref: Run) -> list:
    """Rows (what, fused error, PyTorch error, limit, worst tensor, status) in float64."""
    stats = [n for n, b in ref.buffers.items() if b.is_floating_point()]
    rows = [("train output", rel_err(fused.train_out, ref.train_out), ""),
            ("param grads (worst)", *_worst(fused.grads, ref.grads, ref.grads)),
            ("running stats (worst)", *_worst(fused.buffers, ref.buffers, stats)),
            ("eval output", rel_err(fused.eval_out, ref.eval_out), "")]
    out = [(what, f, None, TOL64, worst, "ok" if f <= TOL64 else "FAIL") for what, f, worst in rows]
    same = _counts_equal(fused, ref)
    out.append(("num_batches_tracked", 0.0 if same else 1.0, None, 0.0, "",
                "ok" if same else "FAIL"))
    return out


def compare_dtype(fused: Run, torch_run: Run, ref: Run, floor: float) -> list:
    """Rows as compare64, fused and PyTorch at the checked dtype against float64."""
    rows = []

    def row(what, f, t, worst="", soft=False):
        limit = max(floor, 2.0 * t)
        status = "ok" if f <= limit else ("warn" if soft else "FAIL")
        rows.append((what, f, t, limit, worst, status))

    row("train output", rel_err(fused.train_out, ref.train_out),
        rel_err(torch_run.train_out, ref.train_out))
    stats = [n for n, b in ref.buffers.items() if b.is_floating_point()]
    f, fn = _worst(fused.buffers, ref.buffers, stats)
    row("running stats (worst)", f, _worst(torch_run.buffers, ref.buffers, stats)[0], fn)
    row("eval output", rel_err(fused.eval_out, ref.eval_out),
        rel_err(torch_run.eval_out, ref.eval_out))
    row("param grads (norm)", norm_err(fused.grads, ref.grads),
        norm_err(torch_run.grads, ref.grads), soft=True)
    return rows


def _print_rows(rows):
    print(f"  {'check':<24}{'fused':>10}{'pytorch':>10}{'limit':>10}  status  worst tensor")
    for what, f, t, limit, worst, status in rows:
        t = "-" if t is None else f"{t:.2e}"
        print(f"  {what:<24}{f:>10.2e}{t:>10}{limit:>10.2e}  {status:<7} {worst}")


# --------------------------------------------------------------------------------------
# GPU timing
# --------------------------------------------------------------------------------------


def _time_cuda(fn: Callable[[], None], warmup: int, iters: int) -> float:
    """Median seconds per call of ``fn`` over ``iters`` CUDA-event-timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def benchmark(models: dict, x: torch.Tensor, amp: Optional[torch.dtype], warmup: int,
              iters: int) -> list:
    """Rows (provider, mode, images/s, peak GiB above what was allocated before)."""
    rows = []
    dev = x.device.type
    for provider, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def train_step():
            with torch.autocast(dev, dtype=amp or torch.float32, enabled=amp is not None):
                loss = model(x).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def infer():
            with torch.no_grad(), torch.autocast(dev, dtype=amp or torch.float32,
                                                 enabled=amp is not None):
                model(x)

        for mode, fn, train in (("train step", train_step, True), ("inference", infer, False)):
            model.train(train)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t = _time_cuda(fn, warmup, iters)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            rows.append((provider, mode, x.shape[0] / t, peak))
    return rows


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fusedres check", epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Convert a torchvision ResNet with fusedres and "
                                            "check it against the original.")
    p.add_argument("--model", default="resnet50",
                   help="a torchvision ResNet: " + ", ".join(resnet_names()))
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (default 64 on a GPU, 2 on the CPU)")
    p.add_argument("--size", type=int, default=None,
                   help="image side (default 224 on a GPU, 64 on the CPU)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                   help="float32, or bfloat16/float16 through torch.autocast")
    p.add_argument("--channels-last", action="store_true", help="channels_last input and model")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bench", action="store_true", help="skip the GPU timing")
    p.add_argument("--no-compile", action="store_true",
                   help="leave torch.compile out of the timing")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    return p


def _backend_line(device: torch.device) -> str:
    name = backend_for(device)
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if name == "triton":
        how = ("Triton kernels in Triton's interpreter (TRITON_INTERPRET=1)"
               if device.type != "cuda" and interp else "Triton kernels compiled for the GPU")
    elif name == "reference":
        how = ("the plain-PyTorch reference, not the Triton kernels (set TRITON_INTERPRET=1 "
               "to run them on the CPU)")
    else:
        how = "the hand-written C++/CUDA reference (csrc_ref)"
    return f"backend checked: {name}: {how}"


def check(args: argparse.Namespace) -> int:
    names = resnet_names()
    if args.model not in names:
        print(f"--model must be one of {', '.join(names)}; got {args.model!r}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    batch = args.batch or (64 if on_gpu else 2)
    size = args.size or (224 if on_gpu else 64)
    dtype = _DTYPES[args.dtype]
    amp = None if dtype == torch.float32 else dtype
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    print(f"fusedres check: {args.model}, batch {batch}, 3x{size}x{size}, {args.dtype}"
          f"{' (autocast)' if amp else ''}, {'channels_last' if args.channels_last else 'NCHW'}")
    if on_gpu:
        tf32 = torch.backends.cudnn.allow_tf32
        print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
              f"TF32 convolutions {'on' if tf32 else 'off'} (both models alike)")
    else:
        print("device: CPU, no CUDA GPU in use: a small input, no timing; "
              f"torch {torch.__version__}")
    print(_backend_line(device))
    last = batch * (-(-size // 32)) ** 2
    if last < 8:
        print(f"note: the last stage's batch norms see {last} values per channel; with so few "
              "the low-precision rows measure their ill-conditioning (try --size 64 or more)")

    original = build(args.model, args.seed).to(device=device, memory_format=fmt)
    fused = convert(copy.deepcopy(original))
    print(f"blocks fused: {len(fused_blocks(fused))}")
    torch.manual_seed(args.seed + 1)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)

    t0 = time.perf_counter()
    reference = copy.deepcopy(original).double()
    ref = Run(reference, x.double(), None)
    rows64 = compare64(Run(copy.deepcopy(fused).double(), x.double(), None), ref)
    rows = compare_dtype(Run(fused, x, amp), Run(original, x, amp), ref, _FLOOR[dtype])
    del reference
    print(f"errors: max|x - ref| / max|ref| per tensor ({time.perf_counter() - t0:.1f} s)")
    print(f"float64, fused against PyTorch (limit {TOL64:g}):")
    _print_rows(rows64)
    print(f"{args.dtype}, fused and PyTorch against float64 (limit max({_FLOOR[dtype]:g}, "
          "2 x PyTorch's); gradients only warn, see --help):")
    _print_rows(rows)
    ok = all(r[-1] != "FAIL" for r in rows64 + rows) and len(fused_blocks(fused)) > 0

    if on_gpu and not args.no_bench:
        models = {"eager": original, "fused": fused}
        if not args.no_compile:
            models["torch.compile"] = torch.compile(copy.deepcopy(original))
            models["fused+compile"] = torch.compile(fused)
        warmup = 3 if args.no_compile else 5
        print(f"timing: median of {args.iters} iterations after {warmup} warm-up "
              "(torch.compile compiles in its warm-up); peak = memory above the models")
        print(f"  {'provider':<16}{'mode':<12}{'images/s':>12}{'peak GiB':>10}")
        for provider, mode, ips, peak in benchmark(models, x, amp, warmup, args.iters):
            print(f"  {provider:<16}{mode:<12}{ips:>12.1f}{peak:>10.2f}")
    print("PASS" if ok else "FAIL: fused errors exceed the limits")
    return 0 if ok else 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "check":
        print("usage: python -m fusedres check [--model NAME] [--batch N] [--size S] "
              "[--dtype float32|bfloat16|float16] [--channels-last] [--device cuda|cpu]",
              file=sys.stderr)
        return 2
    return check(_parser().parse_args(argv[1:]))
