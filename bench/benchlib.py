"""Shared machinery of the fusedres benchmarks: profiles, environment, timing, byte counts.

Every result is timed on the device (CUDA events around each round, the L2 cache flushed
before it, compilation and autotuning warmed out first) and stored in pytest-benchmark's
``extra_info`` together with the card, the versions and the date, so a JSON file always
says where its numbers came from. pytest-benchmark's own statistics are host times of the
same rounds, each ending in a synchronisation; bench/report.py reads the device times.

Without a GPU the same harness runs tiny shapes on the CPU through the reference and
csrc_ref backends (never the Triton interpreter), to test the harness itself.
"""
from __future__ import annotations

import collections
import contextlib
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

PROFILE_ENV = "FUSEDRES_BENCH_PROFILE"   # full | gpu-quick; forced to cpu without CUDA
JSONL_ENV = "FUSEDRES_BENCH_JSONL"       # append every result here as it is measured
SKIP_CSRC_ENV = "FUSEDRES_BENCH_SKIP_CSRC"
GPU_PROFILES = ("full", "gpu-quick")

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
L2_FLUSH_BYTES = 256 << 20               # larger than any L2 in use (H100: 50 MB)

# Fraction of the measured copy bandwidth each fused kernel should reach (issue 5).
KERNEL_TARGETS = {"bn_stats": 0.75, "bn_act_fwd": 0.85, "bn_act_bwd": 0.75}


def profile() -> str:
    """The benchmark profile: 'cpu' whenever there is no CUDA device, whatever is asked."""
    if not HAS_CUDA:
        return "cpu"
    name = os.environ.get(PROFILE_ENV, "").strip() or "full"
    if name not in GPU_PROFILES:
        raise ValueError(f"{PROFILE_ENV} must be one of {GPU_PROFILES}, got {name!r}")
    return name


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------


def _git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:  # no git, or not a checkout: the commit is optional
        return None


@functools.lru_cache(maxsize=None)
def env_info() -> dict:
    """Card, versions and date: stored with every result."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if HAS_CUDA:
        props = torch.cuda.get_device_properties(DEVICE)
        card = props.name
        extra = {"sm_count": props.multi_processor_count,
                 "l2_mb": round(getattr(props, "L2_cache_size", 0) / 1e6, 1),
                 "gpu_mem_gb": round(props.total_memory / 2**30, 1)}
    else:
        card = platform.processor() or platform.machine()
        extra = {"cpu_threads": torch.get_num_threads()}
    return {
        "device": DEVICE.type,
        "card": card,
        "torch": torch.__version__,
        "triton": triton_version,
        "cudnn": str(cudnn) if cudnn else None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "profile": profile(),
        "fusedres_commit": _git_commit(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        **extra,
    }


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


def _summary(times_ms: list) -> dict:
    return {"median_ms": statistics.median(times_ms), "min_ms": min(times_ms),
            "mean_ms": statistics.fmean(times_ms), "rounds": len(times_ms)}


def time_device(fn: Callable[[], object], warmup: int, rounds: int, benchmark=None,
                flush_l2: bool = True) -> dict:
    """Run ``fn`` ``warmup`` times, then time ``rounds`` rounds of it on the device.

    On CUDA each round is bracketed by events after an L2 flush (a 256 MB write, as
    triton.testing.do_bench does) and ends in a synchronisation; on the CPU it is timed
    with perf_counter. With a pytest-benchmark fixture the timed rounds run through
    ``benchmark.pedantic`` (its statistics are the host-side times of the same rounds).
    Returns median/min/mean in ms and the number of rounds."""
    for _ in range(warmup):
        fn()
    sync()
    times: list = []
    if HAS_CUDA:
        cache = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=DEVICE) if flush_l2 else None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def setup():
            if cache is not None:
                cache.zero_()

        def target():
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        def setup():
            pass

        def target():
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)

    if benchmark is not None:
        benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    else:
        for _ in range(rounds):
            setup()
            target()
    if HAS_CUDA:
        del cache
    return _summary(times)


def peak_memory(fn: Callable[[], object]) -> dict:
    """Peak allocated device memory over one call of ``fn`` (torch.cuda.max_memory_allocated
    after a reset), and what was allocated before it (model, inputs, optimizer state)."""
    if not HAS_CUDA:
        return {"peak_mem_mb": None, "base_mem_mb": None}
    gc.collect()
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return {"peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "base_mem_mb": round(base / 2**20, 1)}


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth in GB/s (1e9), counting bytes read plus written:
    the ceiling every memory-bound kernel is measured against. 1 GiB on a GPU (far past
    the L2), 64 MiB on the CPU."""
    nbytes = (1 << 30) if HAS_CUDA else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE).random_(0, 255)
    dst = torch.empty_like(src)
    t = time_device(lambda: dst.copy_(src), warmup=3, rounds=20 if HAS_CUDA else 5,
                    flush_l2=False)
    del src, dst
    if HAS_CUDA:
        torch.cuda.empty_cache()
    return 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------
# Bytes the fused primitives must move (the design's floor, docs: design.md section 2)
# ---------------------------------------------------------------------------------------


def _nb(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _mask_bytes(z: torch.Tensor) -> int:
    from fusedres.layout import mask_shape
    n = 1
    for s in mask_shape(z):
        n *= s
    return n


def bytes_bn_stats(x, *args, **kwargs) -> int:
    """One read of x (the per-channel statistics are negligible)."""
    return _nb(x)


def bytes_bn_act_fwd(z, scale, shift, skip, skip_scale, skip_shift, factor, relu,
                     write_mask) -> int:
    """Read z and the skip (a tensor or the projection's zd), write y and the ReLU bits."""
    return 2 * _nb(z) + _nb(skip) + (_mask_bytes(z) if write_mask else 0)


def bytes_bn_act_bwd(dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode,
                     zd, mean_d, rstd_d, scale_d, batch_stats, batch_stats_d, need_sums,
                     dz_add) -> int:
    """The design's two passes: a reduction reading dy, z (and the mask bits, zd), then
    an elementwise pass reading them again and writing dz (and dskip or dzd)."""
    reads = _nb(dy) + _nb(z) + (_nb(mask) if mask_mode == 2 else 0) + (_nb(zd) if skip_mode == 2 else 0)
    reduce = batch_stats or need_sums or (skip_mode == 2 and batch_stats_d)
    total = reads * (2 if reduce else 1) + _nb(dz_add) + _nb(z)
    if skip_mode == 1:
        total += _nb(dy)
    elif skip_mode == 2:
        total += _nb(zd)
    return total


#: Bytes of a call of each flat primitive (the backends' own signatures).
BYTE_COUNTS = {"bn_stats": bytes_bn_stats, "bn_act_fwd": bytes_bn_act_fwd,
               "bn_act_bwd": bytes_bn_act_bwd}


def _record_bytes_fwd(z, norm, skip, skip_norm, factor, relu, write_mask) -> int:
    return bytes_bn_act_fwd(z, None, None, skip, None, None, factor, relu, write_mask)


def _record_bytes_bwd(a, need_sums) -> int:
    return bytes_bn_act_bwd(a.dy, a.z, None, None, None, None, a.mask, a.mask_mode, a.factor,
                            a.skip_mode, a.zd, None, None, None, a.batch_stats,
                            a.batch_stats_d, need_sums, a.dz_add)


#: The same for the ops.run_* calls, which take fusedres.records' named records.
RECORD_BYTE_COUNTS = {"bn_stats": bytes_bn_stats, "bn_act_fwd": _record_bytes_fwd,
                      "bn_act_bwd": _record_bytes_bwd}


@contextlib.contextmanager
def count_fused_bytes():
    """Count, per op, the calls and the bytes the fused primitives must move while active.

    Wraps the attributes of fusedres.ops that fusedres.function calls with the named
    records of fusedres.records (``ops.run_bn_stats``
    and so on, looked up at each call), so it sees every backend, and names each call
    "fusedres::<op>" for the profiler (eager calls skip the dispatcher, which would name
    them). Yields a Counter with 'bytes', 'calls' and '<op>_bytes'."""
    from fusedres import ops
    counter: collections.Counter = collections.Counter()
    saved = {name: getattr(ops, f"run_{name}") for name in RECORD_BYTE_COUNTS}

    def wrap(name, op):
        def counted(*args, **kwargs):
            b = RECORD_BYTE_COUNTS[name](*args, **kwargs)
            counter["bytes"] += b
            counter[f"{name}_bytes"] += b
            counter["calls"] += 1
            with torch.profiler.record_function(f"fusedres::{name}"):
                return op(*args, **kwargs)
        return counted

    try:
        for name, op in saved.items():
            setattr(ops, f"run_{name}", wrap(name, op))
        yield counter
    finally:
        for name, op in saved.items():
            setattr(ops, f"run_{name}", op)


def _event_time_ms(evt, cuda: bool) -> float:
    if cuda:
        for attr in ("device_time_total", "cuda_time_total"):
            v = getattr(evt, attr, None)
            if v:
                return v / 1e3
        return 0.0
    return getattr(evt, "cpu_time_total", 0.0) / 1e3


def fused_op_profile(fn: Callable[[], object], iters: int = 3) -> dict:
    """Bytes the fused primitives must move in one call of ``fn``, and the time they took.

    On CUDA the time is the sum of the Triton kernels' device time (torch.profiler,
    kernels named as fusedres.kernels.LAUNCHES names them); on the CPU it is the
    host time of the fusedres:: ops. Returns fused_bytes, fused_ms, fused_gbps,
    floor_ms (bytes / copy bandwidth) and floor_frac (floor_ms / fused_ms)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    from fusedres.kernels import LAUNCHES
    before = collections.Counter(LAUNCHES)
    activities = [ProfilerActivity.CUDA] if HAS_CUDA else [ProfilerActivity.CPU]
    sync()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
        with count_fused_bytes() as counter, torch_profile(activities=activities) as prof:
            for _ in range(iters):
                fn()
            sync()
    out = {"fused_bytes": counter["bytes"] // iters, "fused_calls": counter["calls"] // iters}
    if not out["fused_bytes"]:
        out["fused_note"] = "no fused op seen: fusedres.function no longer calls ops.run_<name>?"
        return out
    bw = copy_bandwidth_gbps()
    out["floor_ms"] = out["fused_bytes"] / (bw * 1e9) * 1e3
    if HAS_CUDA:
        names = [k for k in LAUNCHES if LAUNCHES[k] > before.get(k, 0)]
        match = lambda key: any(key == n or key.startswith(n) for n in names)  # noqa: E731
    else:
        match = lambda key: key.startswith("fusedres::")  # noqa: E731
    ms = sum(_event_time_ms(e, HAS_CUDA) for e in prof.key_averages() if match(e.key)) / iters
    if ms > 0:
        out["fused_ms"] = ms
        out["fused_gbps"] = out["fused_bytes"] / (ms * 1e-3) / 1e9
        out["floor_frac"] = out["floor_ms"] / ms
    return out


# ---------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def forced_backend(name: Optional[str]):
    """Run the fused primitives on backend ``name`` (None: leave the choice alone).

    ``fusedres.use_backend`` is thread-local, and the CUDA autograd engine runs the
    backward on its own thread, so FUSEDRES_BACKEND is set for the duration as well."""
    if name is None:
        yield
        return
    import fusedres
    old = os.environ.get("FUSEDRES_BACKEND")
    os.environ["FUSEDRES_BACKEND"] = name
    try:
        with fusedres.use_backend(name):
            yield
    finally:
        if old is None:
            os.environ.pop("FUSEDRES_BACKEND", None)
        else:
            os.environ["FUSEDRES_BACKEND"] = old


def fused_backend() -> str:
    """The backend of the 'fused' provider: Triton on a GPU, the reference on the CPU
    (never the Triton interpreter, even with TRITON_INTERPRET=1)."""
    return "triton" if HAS_CUDA else "reference"


@functools.lru_cache(maxsize=None)
def csrc_status() -> tuple:
    """(module or None, reason): the csrc_ref backend for DEVICE, built on first use."""
    if os.environ.get(SKIP_CSRC_ENV, "") not in ("", "0"):
        return None, f"{SKIP_CSRC_ENV} is set (its build failed or was skipped)"
    try:
        from fusedres import csrc
    except Exception as e:  # not written yet, or broken
        return None, f"fusedres.csrc not importable: {type(e).__name__}: {e}"
    try:
        return csrc.load(DEVICE), ""
    except Exception as e:
        return None, f"csrc_ref failed to load on {DEVICE}: {type(e).__name__}: {e}"


def kernel_impl(provider: str):
    """The module with bn_stats / bn_act_fwd / bn_act_bwd for a kernel-level provider."""
    import pytest
    if provider == "triton":
        if not HAS_CUDA:
            pytest.skip("triton kernels are benchmarked on a GPU only (never the interpreter)")
        from fusedres import kernels
        return kernels
    if provider == "reference":
        from fusedres import reference
        return reference
    if provider == "csrc_ref":
        mod, why = csrc_status()
        if mod is None:
            pytest.skip(why)
        return mod
    raise ValueError(f"unknown kernel provider {provider!r}")


# ---------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def record(benchmark, info: dict) -> None:
    """Store ``info`` plus the environment in benchmark.extra_info, and append the result
    to $FUSEDRES_BENCH_JSONL if set (so a run cut off by a timeout keeps what it measured)."""
    benchmark.extra_info.update(env_info())
    benchmark.extra_info["copy_gbps"] = round(copy_bandwidth_gbps(), 1)
    benchmark.extra_info.update(info)
    path = os.environ.get(JSONL_ENV, "").strip()
    if path:
        entry = {"name": benchmark.name, "fullname": benchmark.fullname,
                 "group": benchmark.group, "extra_info": dict(benchmark.extra_info)}
        with open(path, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
