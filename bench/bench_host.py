"""Host time of one block call with every Triton launch stubbed out: fused against eager.

What a fused block costs the CPU before a single kernel runs (the host-path budget of
design.md section 7). Under TRITON_INTERPRET=1 on the triton backend, each Triton launch
(``InterpretedFunction.run``) returns at once, so what is timed is fusedres's own Python:
plan look-up, checks, launchers, autograd. Eager and fused blocks get the same tiny input
(2 x C x 2 x 2), where dispatch, not arithmetic, sets the time, and run the same ATen
convolutions. Each figure is the median of many calls in one process, fused and eager
interleaved in the same run, in turns of 10 calls each (so that the machine's drift falls
on both alike); ratios within a run are stable where absolute times on a shared 2-core
machine are not.

    TRITON_INTERPRET=1 python bench/bench_host.py [--runs 3] [--calls 300] [--alternate]
        [--native-convs]

prints one table per run and the median ratio over the runs. ``--alternate`` times fused
and eager call by call in turn (each call then finds colder caches), ``--native-convs``
runs ATen's native convolutions instead of mkldnn's (cheaper at this size: less of each
step, and of its noise, is the convolutions'). Under pytest (the README's
test command) each case runs once and records fused us, eager us, ratio and launches in
pytest-benchmark's extra_info. These are CPU host-time figures, not GPU measurements.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fusedres  # noqa: E402
from fusedres import reference as R  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class HostCase:
    name: str
    make: Callable[[], nn.Module]   # the eager block (plain PyTorch)
    channels: int                   # input channels


def _projection_bottleneck() -> nn.Module:
    return R.Bottleneck(64, 32, stride=2, downsample=R.projection(64, 128, 2))


CASES = [
    HostCase("BasicBlock(16, 16)", lambda: R.BasicBlock(16, 16), 16),
    HostCase("Bottleneck(64, 16)", lambda: R.Bottleneck(64, 16), 64),
    HostCase("projection Bottleneck(64, 32, s2)", _projection_bottleneck, 64),
    HostCase("PreActBasicBlock(16, 16)", lambda: R.PreActBasicBlock(16, 16), 16),
]
MODES = ("train_step", "eval_forward")


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton launch returns at once (the interpreter's run is replaced); counts them."""
    from triton.runtime.interpreter import InterpretedFunction
    count = [0]
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        count[0] += 1

    InterpretedFunction.run = run
    # A stubbed kernel leaves its output as torch.empty found it, and the next convolution
    # then reads whatever bits were there: denormals make CPU arithmetic tens of times
    # slower, which would time the garbage, not the dispatch. Flush them, for both sides.
    flush = torch.set_flush_denormal(True)
    try:
        with fusedres.use_backend("triton"):
            yield count
    finally:
        InterpretedFunction.run = original
        if flush:
            torch.set_flush_denormal(False)


def _randomize(block: nn.Module) -> None:
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)


def _step(block: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    if mode == "eval_forward":
        block.eval()

        def call():
            with torch.no_grad():
                block(x)
        return call
    block.train()
    xg = x.clone().requires_grad_(True)

    def call():
        out = block(xg)
        out.backward(torch.ones_like(out))
    return call


def _interleaved_us(fn_a: Callable[[], None], fn_b: Callable[[], None], calls: int,
                    block: int = 10) -> tuple:
    """Median us of fn_a's calls and of fn_b's, timed in short blocks of ``block`` calls,
    the two in turn (which goes first alternating): this shared machine's speed drifts
    by tens of percent over seconds, and a drift then falls on both alike, while the
    calls within a block find the caches as back-to-back calls of one block leave them."""
    ta, tb = [], []
    for i in range(max(calls // block, 1)):
        for fn, times in (((fn_a, ta), (fn_b, tb)) if i % 2 == 0 else
                          ((fn_b, tb), (fn_a, ta))):
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
    return statistics.median(ta) * 1e6, statistics.median(tb) * 1e6


def _alternating_us(fn_a: Callable[[], None], fn_b: Callable[[], None], calls: int) -> tuple:
    """Median us of fn_a and of fn_b called in turn, call by call (which goes first
    alternating): drift within a run falls on both alike, and each call finds the caches
    as the other left them (colder than back-to-back calls of one block)."""
    ta, tb = [], []
    for i in range(calls):
        first, second, t_first, t_second = ((fn_a, fn_b, ta, tb) if i % 2 == 0 else
                                            (fn_b, fn_a, tb, ta))
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        t_first.append(t1 - t0)
        t_second.append(t2 - t1)
    return statistics.median(ta) * 1e6, statistics.median(tb) * 1e6


def measure(case: HostCase, mode: str, calls: int = 300, alternate: bool = False) -> dict:
    """fused us, eager us, their ratio and Triton launches per call, measured together:
    in short blocks of calls, interleaved, or (``alternate``) call by call."""
    torch.manual_seed(0)
    eager = case.make()
    _randomize(eager)
    fused = fusedres.convert(copy.deepcopy(eager))
    x = torch.randn(2, case.channels, 2, 2)
    run_eager, run_fused = _step(eager, x, mode), _step(fused, x, mode)
    with stubbed_launches() as launches:
        for _ in range(20):          # warm-up: plans, caches, first-call paths
            run_fused()
            run_eager()
        before = launches[0]
        run_fused()
        per_call = launches[0] - before
        if alternate:
            f, e = _alternating_us(run_fused, run_eager, calls)
        else:
            f, e = _interleaved_us(run_fused, run_eager, calls)
    return dict(block=case.name, mode=mode, fused_us=f, eager_us=e, ratio=f / e,
                launches=per_call)


def table(rows) -> str:
    lines = [f"{'block':<36}{'mode':<14}{'fused us':>10}{'eager us':>10}{'ratio':>8}"
             f"{'launches':>10}"]
    for r in rows:
        lines.append(f"{r['block']:<36}{r['mode']:<14}{r['fused_us']:>10.1f}"
                     f"{r['eager_us']:>10.1f}{r['ratio']:>8.2f}{r['launches']:>10}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------------------

pytestmark = [pytest.mark.host,
              pytest.mark.skipif(not INTERPRET, reason="stubs the interpreter's launches: "
                                                      "needs TRITON_INTERPRET=1")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_host_time(benchmark, case, mode):
    result = benchmark.pedantic(measure, args=(case, mode, 150), rounds=1, iterations=1)
    benchmark.extra_info.update(result, kind="host")
    print("\n" + table([result]))
    assert result["launches"] > 0, "no Triton launch: the fused path did not run"


def test_host_time_alternating():
    """--alternate's timing (call by call) runs and times both blocks."""
    result = measure(CASES[0], "train_step", 20, alternate=True)
    assert result["launches"] > 0 and result["fused_us"] > 0 and result["eager_us"] > 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--alternate", action="store_true",
                    help="time fused and eager call by call in turn (colder caches for "
                         "both) instead of in interleaved blocks of 10 calls")
    ap.add_argument("--native-convs", action="store_true",
                    help="torch.backends.mkldnn off: ATen's native convolutions, cheaper "
                         "at this size, so that less of a step (and of its noise) is theirs")
    args = ap.parse_args(argv)
    if not INTERPRET:
        print("set TRITON_INTERPRET=1: the launches stubbed are the interpreter's",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = not args.native_convs
    how = ", ".join(["1 thread", "call by call" if args.alternate else "blocks of 10 calls",
                     *(["native convolutions"] if args.native_convs else [])])
    runs = []
    for i in range(args.runs):
        rows = [measure(c, m, args.calls, args.alternate) for c in CASES for m in MODES]
        runs.append(rows)
        print(f"run {i + 1} of {args.runs} (torch {torch.__version__}, {how})")
        print(table(rows))
    print("median fused/eager ratio over the runs:")
    for j, r in enumerate(runs[0]):
        ratios = [run[j]["ratio"] for run in runs]
        print(f"  {r['block']:<36}{r['mode']:<14}{statistics.median(ratios):>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
