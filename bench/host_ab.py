"""Host time of fusedres/straight.py at another revision against this tree's, A/B in one
process: what bench_host.py's whole-run medians are too noisy to show.

Two copies of each block run side by side, one with the StraightBlock methods of
``--base``'s straight.py, one with this tree's, called in alternating order (A B, B A,
...) so that the machine's drift and the cost of going first fall on both alike. Every
Triton launch is stubbed as in bench_host.py. By default the convolutions are stubbed too
(an output of the right shape allocated, nothing computed), so that only host code
differs; ``--real-convs`` runs them, and times eager PyTorch's block beside.

    TRITON_INTERPRET=1 python bench/host_ab.py [--base HEAD] [--steps 3000] [--real-convs]

A straight.py that records its convolutions with autograd in a training call (from
ea582d2 on) calls torch.conv2d and the nodes itself, which the stubs (of function.py's
``_conv`` and ``_conv_backward``) do not replace: compare such a revision with
``--real-convs``.

A revision before d701b84 returns FusedResidualBlock's gradients (one per flat-list
slot) from StraightBlock.backward, where this tree's StraightResidualBlock takes one per
parameter: such a base cannot run here (compare whole trees with bench_host.py instead).
Only StraightBlock's methods come from ``--base``: straight.py's module functions
(``program``, ``covers``), the launchers and the kernels are this tree's, so a revision
that changed those, or whose straight.py calls the launchers otherwise than this tree's,
is not measured here. These are CPU host-time figures, not GPU measurements.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import fusedres  # noqa: E402
from fusedres import function as F  # noqa: E402
from fusedres import straight  # noqa: E402

import bench_host  # noqa: E402


def _straight_at(rev: str) -> types.ModuleType:
    """fusedres/straight.py as it is at ``rev``, as a module of the fusedres package."""
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:fusedres/straight.py"],
                         capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType("fusedres._straight_at_base")
    mod.__package__ = "fusedres"
    mod.__file__ = f"{rev}:fusedres/straight.py"
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod


def _methods(cls) -> dict:
    return {k: v for k, v in cls.__dict__.items()
            if callable(v) and (k == "__init__" or not k.startswith("__"))}


def _stub_conv(h, w, cs):
    """F._conv's output, allocated, not computed."""
    N, _, H, W = h.shape
    oh = (H + 2 * cs.padding[0] - cs.dilation[0] * (w.shape[2] - 1) - 1) // cs.stride[0] + 1
    ow = (W + 2 * cs.padding[1] - cs.dilation[1] * (w.shape[3] - 1) - 1) // cs.stride[1] + 1
    cl = h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()
    return torch.empty((N, w.shape[0], oh, ow), dtype=h.dtype,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)


def _stub_conv_backward(dout, inp, w, cs, need_in, need_w):
    return (torch.empty_like(inp) if need_in else None,
            torch.empty_like(w) if need_w else None)


def _step(block, x):
    out = block(x)
    out.backward(torch.ones_like(out))


def compare(case, base_methods: dict, steps: int, real_convs: bool) -> dict:
    """Median µs of a train step: base's straight.py, this tree's, and (with real_convs)
    eager PyTorch's block."""
    torch.manual_seed(0)
    eager = case.make()
    bench_host._randomize(eager)
    blocks = {"base": fusedres.convert(copy.deepcopy(eager)),
              "tree": fusedres.convert(copy.deepcopy(eager))}
    methods = {"base": base_methods, "tree": _methods(straight.StraightBlock)}
    x = torch.randn(2, case.channels, 2, 2).requires_grad_(True)
    times = {"base": [], "tree": [], "eager": []}
    convs = F._conv, F._conv_backward
    try:
        with bench_host.stubbed_launches():
            if not real_convs:
                F._conv, F._conv_backward = _stub_conv, _stub_conv_backward
            for i in range(-20, steps):  # (20 warm-up steps each: plans, bindings)
                for tag in (("base", "tree") if i % 2 else ("tree", "base")):
                    for name, fn in methods[tag].items():
                        setattr(straight.StraightBlock, name, fn)
                    t0 = time.perf_counter()
                    _step(blocks[tag], x)
                    t1 = time.perf_counter()
                    if real_convs:
                        _step(eager, x)
                    if i >= 0:
                        times[tag].append(t1 - t0)
                        if real_convs:
                            times["eager"].append(time.perf_counter() - t1)
    finally:
        F._conv, F._conv_backward = convs
        for name, fn in methods["tree"].items():
            setattr(straight.StraightBlock, name, fn)
    return {k: statistics.median(v) * 1e6 for k, v in times.items() if v}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD", help="the revision to compare with (git)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--real-convs", action="store_true")
    args = ap.parse_args(argv)
    if not bench_host.INTERPRET:
        print("set TRITON_INTERPRET=1: the launches stubbed are the interpreter's",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    if not args.real_convs and hasattr(straight, "_conv_recorded"):
        print("note: this tree's straight.py records its convolutions, which the stubs do "
              "not replace: --real-convs compares it fairly", file=sys.stderr)
    base = _methods(_straight_at(args.base).StraightBlock)
    print(f"train step, median µs of {args.steps} each, straight.py at {args.base} against "
          f"this tree ({'real' if args.real_convs else 'stubbed'} convolutions, launches "
          f"stubbed, torch {torch.__version__}, 1 thread)")
    for case in bench_host.CASES:
        m = compare(case, base, args.steps, args.real_convs)
        line = (f"  {case.name:<36}{m['base']:8.1f}{m['tree']:8.1f}  delta "
                f"{m['tree'] - m['base']:+7.1f} ({(m['tree'] / m['base'] - 1) * 100:+5.1f} %)")
        if "eager" in m:
            line += f"  eager {m['eager']:7.1f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
