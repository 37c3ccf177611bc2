"""Kernel-level benchmarks of the three fused primitives.

Each reports achieved GB/s = (bytes it must move) / (median time) and that as a fraction
of the copy bandwidth measured in the same run. Targets (Triton, on a GPU): the forward
epilogue >= 85%, statistics and backward >= 75%. Shapes: bf16 channels_last at batch 256
(ResNet-50 stage shapes); every tensor is past the 50 MB L2 of an H100 or close to it,
and the L2 is flushed before every round anyway.
"""
from __future__ import annotations

import pytest
import torch

import benchlib

pytestmark = pytest.mark.kernel

PROFILE = benchlib.profile()

# (N, C, H, W)
if PROFILE == "cpu":
    SHAPES = [(2, 16, 8, 8)]
    LAYOUTS = ["cl"]
    PROVIDERS = ["reference", "csrc_ref"]
    WARMUP, ROUNDS = 1, 5
elif PROFILE == "gpu-quick":
    SHAPES = [(256, 64, 56, 56), (256, 256, 56, 56), (256, 2048, 7, 7)]
    LAYOUTS = ["cl"]
    PROVIDERS = ["triton", "reference", "csrc_ref"]
    WARMUP, ROUNDS = 10, 40
else:
    SHAPES = [(256, 64, 56, 56), (256, 256, 56, 56), (256, 128, 28, 28), (256, 512, 28, 28),
              (256, 1024, 14, 14), (256, 2048, 7, 7)]
    LAYOUTS = ["cl", "nchw"]
    PROVIDERS = ["triton", "reference", "csrc_ref"]
    WARMUP, ROUNDS = 10, 100

# kernel case -> the primitive it exercises
KERNELS = {
    "bn_stats": "bn_stats",              # training statistics + running-stat update
    "bn_act_fwd": "bn_act_fwd",          # relu(z*scale + shift + skip), ReLU bits written
    "bn_act_bwd_last": "bn_act_bwd",     # last BN: packed mask, identity skip (dskip out)
    "bn_act_bwd_inner": "bn_act_bwd",    # inner BN: ReLU recomputed from z
}


def _fwd(impl):
    """The backend's flat bn_act_fwd with batch statistics, called with the training-mode
    arguments (z, scale, shift, skip, skip_scale, skip_shift, factor, relu, write_mask)
    that benchlib's byte count takes."""
    def call(z, scale, shift, skip, skip_scale, skip_shift, factor, relu, write_mask):
        return impl.bn_act_fwd(z, scale, shift, None, None, None, None, 0.0, skip, skip_scale,
                               skip_shift, None, None, None, None, 0.0, skip_scale is not None,
                               factor, relu, write_mask)[:2]
    return call


def _id(shape):
    return "x".join(map(str, shape))


def _make(shape, layout, dtype):
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    g = torch.Generator(device=benchlib.DEVICE).manual_seed(0)
    t = torch.randn(shape, device=benchlib.DEVICE, dtype=dtype, generator=g)
    return t.contiguous(memory_format=fmt)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel(benchmark, kernel, shape, layout, provider):
    if layout == "nchw" and shape not in SHAPES[:2]:
        pytest.skip("NCHW only at the two 56x56 shapes")
    impl = benchlib.kernel_impl(provider)
    dtype = torch.bfloat16
    dev = benchlib.DEVICE
    N, C, H, W = shape
    z, skip, dy = (_make(shape, layout, dtype) for _ in range(3))
    weight = torch.rand(C, device=dev) + 0.5
    bias = torch.randn(C, device=dev)
    rm, rv = torch.zeros(C, device=dev), torch.ones(C, device=dev)
    nbt = torch.zeros((), device=dev, dtype=torch.long)

    mean, rstd, scale, shift = impl.bn_stats(z, weight, bias, None, None, None, 0.1, 1e-5)
    _, mask = _fwd(impl)(z, scale, shift, skip, None, None, None, True, True)
    if kernel == "bn_stats":
        args = (z, weight, bias, rm, rv, nbt, 0.1, 1e-5)
    elif kernel == "bn_act_fwd":
        args = (z, scale, shift, skip, None, None, None, True, True)
    elif kernel == "bn_act_bwd_last":
        args = (dy, z, mean, rstd, scale, shift, mask, 2, None, 1, None, None, None, None,
                True, False, True, None)
    else:
        args = (dy, z, mean, rstd, scale, shift, None, 1, None, 0, None, None, None, None,
                True, False, True, None)
    op = KERNELS[kernel]
    fn = _fwd(impl) if op == "bn_act_fwd" else getattr(impl, op)
    nbytes = benchlib.BYTE_COUNTS[op](*args)

    benchmark.group = f"kernel {kernel} {_id(shape)} bf16 {layout}"
    t = benchlib.time_device(lambda: fn(*args), WARMUP, ROUNDS, benchmark)
    bw = benchlib.copy_bandwidth_gbps()
    gbps = nbytes / (t["median_ms"] * 1e-3) / 1e9
    target = benchlib.KERNEL_TARGETS[op]
    benchlib.record(benchmark, {
        "kind": "kernel", "case": kernel, "op": op, "shape": list(shape), "dtype": "bf16",
        "layout": layout, "batch": N, "provider": provider, **t,
        "bytes": nbytes, "gbps": gbps, "copy_frac": gbps / bw,
        "floor_ms": nbytes / (bw * 1e9) * 1e3,
        "target_frac": target if provider == "triton" else None,
        "meets_target": (gbps / bw >= target) if provider == "triton" else None,
    })
    assert torch.isfinite(rm).all() and torch.isfinite(rv).all()
