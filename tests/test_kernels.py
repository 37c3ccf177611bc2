"""Each Triton kernel against the plain-PyTorch primitives of fusedres.reference."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from checks import TRITON_DEVICES, assert_close_fp32, triton_ran, ulp
from fusedres import kernels as K
from fusedres import reference as R
from fusedres.kernels.config import gpu_tiles, tile_config

SHAPES = [(3, 24, 7, 7), (2, 40, 13, 9), (4, 8, 1, 1), (1, 16, 4, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rand(shape, dtype, device, cl, scale=1.0, shift=0.0):
    x = (torch.randn(shape, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if cl else x


def _check(actual, expected, dtype, name):
    if dtype == torch.float32 or dtype == torch.float64:
        assert_close_fp32(actual, expected, name)
    else:  # both sides round one fp32 result to the storage dtype: one ulp apart at most
        tol = ulp(expected.float().abs().max().item(), dtype)
        torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=2 * tol,
                                   equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_stats(device, shape, cl, dtype, momentum):
    if shape[0] * shape[2] * shape[3] == 1:
        shape = (2,) + shape[1:]
    C = shape[1]
    x = _rand(shape, dtype, device, cl, 2.0, 0.5)
    w = torch.rand(C, device=device) + 0.5
    b = torch.randn(C, device=device)
    outs = []
    for impl in (K, R):
        rm = torch.linspace(-1, 1, C, device=device)
        rv = torch.linspace(0.5, 2, C, device=device)
        nbt = torch.tensor(3, device=device)
        outs.append((impl.bn_stats(x, w, b, rm, rv, nbt, momentum, 1e-5), rm, rv, nbt))
    with triton_ran("_bn_stats_partial_kernel", "_bn_stats_finalize_kernel"):
        K.bn_stats(x, None, None, None, None, None, momentum, 1e-5)
    (kt, rm_k, rv_k, nbt_k), (rt, rm_r, rv_r, nbt_r) = outs
    for name, a, e in zip(("mean", "rstd", "scale", "shift"), kt, rt):
        assert a.dtype == torch.float32
        assert_close_fp32(a, e, name)
    assert_close_fp32(rm_k, rm_r, "running_mean")
    assert_close_fp32(rv_k, rv_r, "running_var")
    assert nbt_k.item() == nbt_r.item() == 4


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_stats_large_mean_small_std(device):
    """Mean 1e3, std 1e-2: Chan/Welford keeps the variance; E[x^2]-E[x]^2 in fp32 cannot."""
    C = 8
    x = (torch.randn(6, C, 9, 11, dtype=torch.float64) * 1e-2 + 1e3).float().to(device)
    rm = torch.zeros(C, device=device)
    rv = torch.ones(C, device=device)
    mean, rstd, _, _ = K.bn_stats(x, None, None, rm, rv, torch.tensor(0, device=device), 1.0, 0.0)
    x64 = x.double().cpu()
    var64, mean64 = torch.var_mean(x64, dim=(0, 2, 3), correction=0)
    unbiased64 = torch.var(x64, dim=(0, 2, 3), correction=1)
    var = 1.0 / rstd.double().cpu() ** 2
    torch.testing.assert_close(mean.double().cpu(), mean64, rtol=1e-3, atol=0)
    torch.testing.assert_close(var, var64, rtol=1e-3, atol=0)
    torch.testing.assert_close(rv.double().cpu(), unbiased64, rtol=1e-3, atol=0)
    # the test has teeth: the textbook formula in fp32 is off by orders of magnitude
    xf = x.cpu()
    naive = (xf * xf).mean(dim=(0, 2, 3)) - xf.mean(dim=(0, 2, 3)) ** 2
    assert ((naive.double() - var64).abs() / var64).max() > 1e-1


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("skip_mode", [0, 1, 2])
@pytest.mark.parametrize("factor", [False, True])
def test_bn_act_fwd(device, shape, cl, dtype, skip_mode, factor):
    N, C = shape[:2]
    z = _rand(shape, dtype, device, cl)
    scale = torch.rand(C, device=device) + 0.5
    shift = torch.randn(C, device=device) * 0.3
    skip = _rand(shape, dtype, device, cl) if skip_mode else None
    ss = torch.rand(C, device=device) + 0.5 if skip_mode == 2 else None
    sh = torch.randn(C, device=device) if skip_mode == 2 else None
    f = (torch.rand(N, device=device) * 2).to(dtype) if factor else None
    with triton_ran("_bn_act_fwd_kernel"):
        yk, mk = K.bn_act_fwd(z, scale, shift, skip, ss, sh, f, True, True)
    yr, mr = R.bn_act_fwd(z, scale, shift, skip, ss, sh, f, True, True)
    assert yk.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    _check(yk, yr, dtype, "y")
    assert mk.shape == mr.shape and mk.dtype == torch.uint8
    assert torch.equal(mk, mr), "packed ReLU mask differs"
    y2, m2 = K.bn_act_fwd(z, scale, shift, skip, ss, sh, f, False, False)
    assert m2.numel() == 0
    _check(y2, R.bn_act_fwd(z, scale, shift, skip, ss, sh, f, False, False)[0], dtype, "y no relu")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["inner", "identity", "projection", "projection_eval_d",
                                  "eval", "preact_first", "no_relu"])
def test_bn_act_bwd(device, shape, cl, dtype, mode):
    N, C = shape[:2]
    z = _rand(shape, dtype, device, cl)
    dy = _rand(shape, dtype, device, cl)
    mean, rstd = torch.randn(C, device=device) * 0.1, torch.rand(C, device=device) + 0.5
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device) * 0.3
    scale, shift = w * rstd, b - mean * w * rstd
    zd = mean_d = rstd_d = scale_d = shift_d = skip = mask = factor = dz_add = None
    mask_mode, skip_mode, batch_stats, batch_stats_d = 1, 0, True, False
    if mode in ("identity", "projection", "projection_eval_d"):
        mask_mode = 2
        factor = (torch.rand(N, device=device) * 2).to(dtype)
        if mode == "identity":
            skip_mode, skip = 1, _rand(shape, dtype, device, cl)
        else:
            skip_mode, batch_stats_d = 2, mode == "projection"
            zd = _rand(shape, dtype, device, cl)
            mean_d, rstd_d = torch.randn(C, device=device) * 0.1, torch.rand(C, device=device) + 0.5
            scale_d = rstd_d * 1.3
            shift_d = -mean_d * scale_d
            skip = zd
        _, mask = R.bn_act_fwd(z, scale, shift, skip, scale_d, shift_d, factor, True, True)
    if mode == "eval":
        batch_stats = False
    if mode == "preact_first":
        dz_add = _rand(shape, dtype, device, cl)
    if mode == "no_relu":
        mask_mode = 0
    args = (dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd, mean_d,
            rstd_d, scale_d, batch_stats, batch_stats_d, True, dz_add)
    with triton_ran("_bn_act_bwd_reduce_kernel", "_sum_partials_kernel", "_bn_act_bwd_apply_kernel"):
        dzk, dsk, sk = K.bn_act_bwd(*args)
    dzr, dsr, sr = R.bn_act_bwd(*args)
    assert dzk.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    _check(dzk, dzr, dtype, "dz")
    assert dsk.shape == dsr.shape
    if dsr.numel():
        _check(dsk, dsr, dtype, "dskip")
    assert sk.shape == sr.shape
    assert_close_fp32(sk, sr, "sums") if dtype == torch.float32 else \
        torch.testing.assert_close(sk, sr, rtol=1e-3, atol=1e-3 * sr.abs().max().item())


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_stats_from_moments_is_stats_of_the_union(device, cl, dtype, momentum):
    """Synchronised BN's two halves: each rank's (count, mean, M2), then the merge of the
    gathered rows, one of them an empty rank's, equals bn_stats on the concatenated batch
    (results and running statistics)."""
    C = 12
    x = _rand((6, C, 5, 3), dtype, device, cl, 3.0, 40.0)
    chunks = [x[:2], x[2:2], x[2:]]  # an empty rank takes part with count 0
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    with triton_ran("_bn_stats_partial_kernel", "_bn_stats_finalize_kernel"):
        mk = [K.bn_moments(c) for c in chunks]
    for a, c in zip(mk, chunks):
        e = R.bn_moments(c)
        assert a.shape == (3, C) and a.dtype == sdt
        assert_close_fp32(a, e, "moments")
    w = torch.rand(C, device=device, dtype=sdt) + 0.5
    b = torch.randn(C, device=device, dtype=sdt)

    def run(impl, union):
        rm = torch.linspace(-1, 1, C, device=device, dtype=sdt)
        rv = torch.linspace(0.5, 2, C, device=device, dtype=sdt)
        nbt = torch.tensor(3, device=device)
        if union:
            out = R.bn_stats(x, w, b, rm, rv, nbt, momentum, 1e-5)
        else:
            out = impl.bn_stats_from_moments(torch.stack(mk), w, b, rm, rv, nbt, momentum, 1e-5)
        return (*out, rm, rv, nbt)

    expected = run(R, union=True)
    for impl in (K, R):
        got = run(impl, union=False)
        for name, a, e in zip(("mean", "rstd", "scale", "shift", "running_mean", "running_var"),
                              got, expected):
            assert_close_fp32(a, e, f"{impl.__name__} {name}")
        assert got[-1].item() == expected[-1].item() == 4


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_stats_from_moments_all_ranks_empty(device):
    """Every rank empty: what bn_stats does with an empty batch (statistics untouched,
    the batch counted), not 0/0."""
    C = 5
    for impl in (K, R):
        rm, rv = torch.linspace(-1, 1, C, device=device), torch.linspace(0.5, 2, C, device=device)
        nbt = torch.tensor(2, device=device)
        rm0, rv0 = rm.clone(), rv.clone()
        mean, rstd, scale, shift = impl.bn_stats_from_moments(
            torch.zeros(2, 3, C, device=device), torch.rand(C, device=device), None, rm, rv, nbt,
            None, 1e-5)
        assert torch.equal(mean, torch.zeros_like(mean)) and torch.equal(rstd, torch.ones_like(rstd))
        assert torch.equal(scale, torch.zeros_like(scale)) and torch.equal(shift, torch.zeros_like(shift))
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0) and nbt.item() == 3, impl.__name__


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("mode", ["inner", "identity", "projection"])
def test_bn_act_bwd_split_is_bn_act_bwd(device, cl, mode):
    """bn_act_bwd = bn_act_bwd_apply(..., bn_act_bwd_reduce(...) / M), for the split that
    synchronised batch norm puts an all-reduce into."""
    shape = (3, 10, 5, 4)
    N, C = shape[:2]
    z, dy = _rand(shape, torch.float32, device, cl), _rand(shape, torch.float32, device, cl)
    mean, rstd = torch.randn(C, device=device) * 0.1, torch.rand(C, device=device) + 0.5
    scale, shift = rstd * 1.2, -mean * rstd * 1.2 + 0.1
    factor = torch.rand(N, device=device) * 2
    zd = mean_d = rstd_d = scale_d = mask = None
    mask_mode, skip_mode = (1, 0) if mode == "inner" else (2, 1 if mode == "identity" else 2)
    if mode == "projection":
        zd = _rand(shape, torch.float32, device, cl)
        mean_d, rstd_d = torch.randn(C, device=device) * 0.1, torch.rand(C, device=device) + 0.5
        scale_d = rstd_d * 0.7
    if mask_mode == 2:
        skip = zd if mode == "projection" else _rand(shape, torch.float32, device, cl)
        mask = R.bn_act_fwd(z, scale, shift, skip, scale_d, None if zd is None else -mean_d * scale_d,
                            factor, True, True)[1]
    head = (dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd, mean_d, rstd_d)
    dz, dskip, sums = K.bn_act_bwd(*head, scale_d, True, True, True, None)
    with triton_ran("_bn_act_bwd_reduce_kernel", "_sum_partials_kernel"):
        sk = K.bn_act_bwd_reduce(*head)
    assert torch.equal(sk, sums)
    assert_close_fp32(sk, R.bn_act_bwd_reduce(*head), "sums vs reference")
    mean_sums = sk / (N * shape[2] * shape[3])
    for impl in (K, R):
        dz2, dskip2 = impl.bn_act_bwd_apply(*head, scale_d, True, True, None, mean_sums)
        assert_close_fp32(dz2, dz, f"{impl.__name__} dz")
        if skip_mode:
            assert_close_fp32(dskip2, dskip, f"{impl.__name__} dskip")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_nan_inf_propagate(device):
    """NaN and Inf go where PyTorch sends them: relu(nan) = nan, an inf gradient through a
    closed ReLU is 0 (where, not multiply), eval-mode dz = scale*g even for infinite z."""
    C = 8
    z = torch.randn(2, C, 4, 4, device=device)
    z[0, 0, 0, 0] = float("nan")
    z[1, 1, 1, 1] = float("inf")
    z[1, 2, 2, 2] = -float("inf")
    dy = torch.randn_like(z)
    dy[0, 3, 0, 0] = float("inf")
    scale = torch.rand(C, device=device) + 0.5
    shift = torch.randn(C, device=device)
    for impl_out in [(K.bn_act_fwd(z, scale, shift, None, None, None, None, True, True),
                      R.bn_act_fwd(z, scale, shift, None, None, None, None, True, True))]:
        (yk, mk), (yr, mr) = impl_out
        torch.testing.assert_close(yk, yr, equal_nan=True)
        assert torch.equal(mk, mr)
    mean, rstd = torch.zeros(C, device=device), torch.ones(C, device=device)
    for batch_stats in (False, True):
        args = (dy, z, mean, rstd, scale, shift, mk, 2, None, 0, None, None, None, None,
                batch_stats, False, True, None)
        dzk, _, sk = K.bn_act_bwd(*args)
        dzr, _, sr = R.bn_act_bwd(*args)
        torch.testing.assert_close(dzk, dzr, equal_nan=True)
        torch.testing.assert_close(sk, sr, equal_nan=True)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_zero_size_batch(device):
    x = torch.randn(0, 8, 5, 5, device=device)
    rm, rv, nbt = torch.zeros(8, device=device), torch.ones(8, device=device), torch.tensor(2, device=device)
    K.bn_stats(x, None, None, rm, rv, nbt, None, 1e-5)
    assert nbt.item() == 3 and torch.equal(rm, torch.zeros_like(rm)) and torch.equal(rv, torch.ones_like(rv))
    y, _ = K.bn_act_fwd(x, rm, rv, x, None, None, None, True, True)
    assert y.shape == x.shape


RESNET_STAGES = [  # (C, H*W) of every BN input in torchvision ResNet-18/50 stages at 224x224
    (64, 112 * 112), (64, 56 * 56), (128, 28 * 28), (256, 14 * 14), (512, 7 * 7),
    (256, 56 * 56), (128, 56 * 56), (512, 28 * 28), (1024, 14 * 14), (2048, 7 * 7),
]


@pytest.mark.parametrize("C,HW", RESNET_STAGES)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("kind", ["elementwise", "reduction", "stats"])
@pytest.mark.parametrize("fp64", [False, True])
def test_gpu_grid_fills_h100(C, HW, cl, kind, fp64):
    """At batch 256 every kernel launches at least two programs per SM of an H100 (132),
    picks a tile the compile test builds, and covers every element exactly once."""
    cfg = tile_config(256, C, HW, cl, kind != "elementwise", num_sms=132, interpret=False,
                      fp64=fp64, stats=kind == "stats")
    assert cfg.num_programs >= 2 * 132
    assert (cl, cfg.BLOCK_C, cfg.BLOCK_HW) in gpu_tiles(fp64, stats=kind == "stats")
    s_blocks = -(-HW // cfg.BLOCK_HW)
    assert cfg.grid[0] == s_blocks * -(-256 // cfg.N_PER_PROG)
    assert cfg.grid[1] * cfg.BLOCK_C >= C and (cfg.grid[1] - 1) * cfg.BLOCK_C < C


def test_interpreter_config_is_few_programs():
    cfg = tile_config(7, 40, 13 * 9, True, True, num_sms=1, interpret=True)
    assert cfg.num_programs == 1 and cfg.N_PER_PROG == 7


def test_compiles_for_sm80_and_sm90_without_spills():
    """Every variant the launchers can pick builds to a cubin for sm_80 and sm_90a with no
    spills (ptxas -v). Runs in a subprocess: compilation needs TRITON_INTERPRET unset."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "fusedres.kernels.compile_check", "--arch", "80",
                        "--arch", "90"], env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join(r.stdout.splitlines()[-15:])
    assert r.returncode == 0, f"compile check failed:\n{tail}\n{r.stderr[-2000:]}"
    assert " 0 failed" in r.stdout
