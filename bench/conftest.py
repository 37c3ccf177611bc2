"""pytest configuration of the benchmark suite (``pytest bench``).

Profiles (FUSEDRES_BENCH_PROFILE): ``full`` (the default on a GPU), ``gpu-quick`` (the
subset bench/gpu_check.sh runs in a few minutes) and ``cpu`` (forced without CUDA: tiny
shapes through the reference and csrc_ref backends, a test of the harness, not a
performance figure). Markers: kernel, block, model and compile (``-m "not compile"``
leaves torch.compile out).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import benchlib  # noqa: E402

MARKERS = {
    "kernel": "kernel-level benchmark of one fused primitive",
    "block": "one residual block at a ResNet stage shape",
    "model": "a whole torchvision ResNet",
    "compile": "uses torch.compile (slow to warm up)",
    "host": "host time with every Triton launch stubbed out (bench_host.py)",
}


def pytest_configure(config):
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")
    if benchlib.HAS_CUDA:
        # What a training script sets; cuDNN's search happens in the warm-up rounds.
        torch.backends.cudnn.benchmark = True


def pytest_report_header(config):
    env = benchlib.env_info()
    return (f"fusedres bench: profile={env['profile']} device={env['device']} "
            f"card={env['card']} torch={env['torch']} triton={env['triton']} "
            f"cudnn={env['cudnn']}")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fusedres"] = dict(benchlib.env_info())
    machine_info["fusedres"]["copy_gbps"] = round(benchlib.copy_bandwidth_gbps(), 1)


def pytest_collection_modifyitems(config, items):
    # torch.compile cases last within each file: on a tight time budget the cheap
    # results come first, and a timeout costs only compile figures.
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("provider") == "compile":
            item.add_marker(pytest.mark.compile)
    order = {id(it): i for i, it in enumerate(items)}

    def key(it):
        params = getattr(getattr(it, "callspec", None), "params", {})
        return (str(it.fspath), params.get("provider") == "compile",
                params.get("mode") == "train_step" and params.get("provider") == "compile",
                order[id(it)])
    items.sort(key=key)


@pytest.fixture(autouse=True)
def _never_the_interpreter(request):
    """On a machine without CUDA no Triton kernel may run (it would be the interpreter).
    bench_host.py's launches are stubbed out: they count, but run nothing."""
    if benchlib.HAS_CUDA or request.node.get_closest_marker("host"):
        yield
        return
    from fusedres.kernels import LAUNCHES
    before = sum(LAUNCHES.values())
    yield
    launched = sum(LAUNCHES.values()) - before
    assert launched == 0, f"{launched} Triton kernel launches on a CPU-only machine (interpreter)"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each torch.compile case starts from a clean dynamo cache (no recompile limit hit
    across cases; inductor's own caches still make repeated graphs cheap)."""
    yield
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()
    if benchlib.HAS_CUDA:
        torch.cuda.empty_cache()
