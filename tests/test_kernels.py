"""Each Triton kernel against the plain-PyTorch primitives of fusedres.reference."""
from __future__ import annotations

import contextlib

import pytest
import torch

from checks import INTERPRET, TRITON_DEVICES, assert_close_fp32, triton_ran, ulp
from fusedres import kernels as K
from fusedres import reference as R
from fusedres.kernels import config
from fusedres.kernels.config import tile_config

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
    with triton_ran("_bn_stats_partial_kernel"):
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


def _fwd(impl, z, scale, shift, skip, skip_scale, skip_shift, factor, relu, write_mask):
    """bn_act_fwd with batch statistics (training): (y, mask)."""
    return impl.bn_act_fwd(z, scale, shift, None, None, None, None, 0.0, skip, skip_scale,
                           skip_shift, None, None, None, None, 0.0, skip_scale is not None,
                           factor, relu, write_mask)[:2]


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
        yk, mk = _fwd(K, z, scale, shift, skip, ss, sh, f, True, True)
    yr, mr = _fwd(R, z, scale, shift, skip, ss, sh, f, True, True)
    assert yk.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    _check(yk, yr, dtype, "y")
    assert mk.shape == mr.shape and mk.dtype == torch.uint8
    assert torch.equal(mk, mr), "packed ReLU mask differs"
    y2, m2 = _fwd(K, z, scale, shift, skip, ss, sh, f, False, False)
    assert m2.numel() == 0
    _check(y2, _fwd(R, z, scale, shift, skip, ss, sh, f, False, False)[0], dtype, "y no relu")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("skip_mode", [0, 1, 2])
@pytest.mark.parametrize("affine", [True, False])
def test_bn_act_fwd_eval_derives_its_statistics(device, cl, dtype, skip_mode, affine):
    """Eval mode: one launch derives scale/shift from the running statistics (both BNs of a
    projection) and returns the [4, C] statistics it used, as the reference does."""
    shape = (3, 20, 5, 3)
    N, C = shape[:2]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    z = _rand(shape, dtype, device, cl)
    skip = _rand(shape, dtype, device, cl) if skip_mode else None

    def params():
        w = (torch.rand(C, device=device, dtype=pdt) + 0.5) if affine else None
        b = torch.randn(C, device=device, dtype=pdt) if affine else None
        return (w, b, torch.randn(C, device=device, dtype=pdt),
                torch.rand(C, device=device, dtype=pdt) + 0.2, 1e-3)
    main, side = params(), params() if skip_mode == 2 else (None, None, None, None, 0.0)
    args = (z, None, None, *main, skip, None, None, *side, skip_mode == 2, None, True, True)
    with triton_ran("_bn_act_fwd_kernel"):
        yk, mk, sk, ssk = K.bn_act_fwd(*args)
    yr, mr, sr, ssr = R.bn_act_fwd(*args)
    _check(yk, yr, dtype, "y")
    assert torch.equal(mk, mr)
    assert sk.shape == (4, C) and sk.dtype == pdt
    assert_close_fp32(sk, sr, "stats")
    assert ssk.shape == ssr.shape
    if skip_mode == 2:
        assert_close_fp32(ssk, ssr, "skip stats")


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
        _, mask = _fwd(R, z, scale, shift, skip, scale_d, shift_d, factor, True, True)
    if mode == "eval":
        batch_stats = False
    if mode == "preact_first":
        dz_add = _rand(shape, dtype, device, cl)
    if mode == "no_relu":
        mask_mode = 0
    args = (dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd, mean_d,
            rstd_d, scale_d, batch_stats, batch_stats_d, True, dz_add)
    with triton_ran("_bn_act_bwd_reduce_kernel", "_bn_act_bwd_apply_kernel"):
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
    with triton_ran("_bn_stats_partial_kernel"):
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
            with triton_ran("_bn_stats_finalize_kernel") if impl is K else contextlib.nullcontext():
                out = impl.bn_stats_from_moments(torch.stack(mk), w, b, rm, rv, nbt, momentum,
                                                 1e-5)
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
        mask = _fwd(R, z, scale, shift, skip, scale_d, None if zd is None else -mean_d * scale_d,
                    factor, True, True)[1]
    head = (dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode, zd, mean_d, rstd_d)
    dz, dskip, sums = K.bn_act_bwd(*head, scale_d, True, True, True, None)
    with triton_ran("_bn_act_bwd_reduce_kernel"):
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
    for impl_out in [(_fwd(K, z, scale, shift, None, None, None, None, True, True),
                      _fwd(R, z, scale, shift, None, None, None, None, True, True))]:
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
    y, _ = _fwd(K, x, rm, rv, x, None, None, None, True, True)
    assert y.shape == x.shape
    # eval mode on an empty batch still returns the statistics it would normalise with
    w, b = torch.rand(8, device=device), torch.randn(8, device=device)
    out = K.bn_act_fwd(x, None, None, w, b, rm, rv, 1e-5, None, None, None, None, None, None,
                       None, 0.0, False, None, True, False)
    assert_close_fp32(out[2], R.running_stats(w, b, rm, rv, 1e-5, torch.float32), "stats")


RESNET_STAGES = [  # (C, H*W) of every BN input in torchvision ResNet-18/50 stages at 224x224
    (64, 112 * 112), (64, 56 * 56), (128, 28 * 28), (256, 14 * 14), (512, 7 * 7),
    (256, 56 * 56), (128, 56 * 56), (512, 28 * 28), (1024, 14 * 14), (2048, 7 * 7),
]


@pytest.mark.parametrize("C,HW", RESNET_STAGES)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("kind", ["elementwise", "reduce", "stats"])
@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_gpu_grid_fills_h100(C, HW, cl, kind, itemsize):
    """At batch 256 every kernel launches at least two programs per SM of an H100 (132),
    each walks several samples (the pipelined loop has work), and the grid covers every
    element exactly once."""
    cfg = tile_config(256, C, HW, cl, kind, num_sms=132, interpret=False, itemsize=itemsize)
    assert cfg.num_programs >= 2 * 132
    assert cfg.N_PER_PROG >= 4 and cfg.num_stages > 1
    s_blocks = -(-HW // cfg.BLOCK_HW)
    assert cfg.grid[0] == s_blocks * -(-256 // cfg.N_PER_PROG)
    assert (s_blocks - 1) * cfg.BLOCK_HW < HW <= s_blocks * cfg.BLOCK_HW
    assert cfg.grid[1] * cfg.BLOCK_C >= C and (cfg.grid[1] - 1) * cfg.BLOCK_C < C
    # the contiguous side of a channels_last tile is 8 channels or more (whole mask bytes)
    assert (cfg.BLOCK_C if cl else cfg.BLOCK_HW) >= 8


def test_interpreter_config_is_few_programs():
    cfg = tile_config(7, 40, 13 * 9, True, "reduce", num_sms=1, interpret=True)
    assert cfg.num_programs == 1 and cfg.N_PER_PROG == 7


def test_tile_choice_is_host_cheap():
    """The launchers' tile choice is a cached pure-integer function, and the momentum's
    fp32 split makes no tensor (the host-path issue's budget)."""
    from fusedres.kernels.launch import hi_lo
    assert tile_config(256, 64, 3136, True, "stats", 132) is tile_config(256, 64, 3136, True,
                                                                          "stats", 132)
    hi, lo = hi_lo(0.1)
    assert hi == torch.tensor(0.1, dtype=torch.float32).item() and hi + lo == 0.1
    with pytest.raises(ValueError, match="kind"):
        tile_config(2, 8, 4, True, "bogus", 1)


@pytest.fixture
def gpu_tiles(monkeypatch):
    """Run the GPU tiling under the interpreter: several partials and channel blocks, so
    the last-program merge and the per-channel-block counters are exercised."""
    if not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setattr(config, "INTERPRET_TILES", False)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_launch_merge_with_gpu_tiles(gpu_tiles, cl, momentum):
    """With the GPU tiles (P > 1 partials, 2+ channel blocks) bn_stats, bn_moments and the
    backward sums match the reference, num_batches_tracked counts the batch once, and every
    counter is back to zero afterwards."""
    from fusedres.kernels import launch
    shape = (5, 300, 6, 6) if cl else (5, 300, 5, 7)
    C = shape[1]
    x = _rand(shape, torch.float32, "cpu", cl, 2.0, 0.5)
    N, _, H, W = shape
    cfg = tile_config(N, C, H * W, cl, "stats", 1, False, 4)
    assert cfg.grid[0] > 1 and cfg.grid[1] > 1, cfg
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    outs = []
    for impl in (K, R):
        rm, rv, nbt = torch.zeros(C), torch.ones(C), torch.tensor(3)
        outs.append((impl.bn_stats(x, w, b, rm, rv, nbt, momentum, 1e-5), rm, rv, nbt))
    for a, e, name in zip(outs[0], outs[1], ("stats", "running_mean", "running_var", "nbt")):
        assert_close_fp32(a, e, name)
    assert outs[0][3].item() == 4
    assert_close_fp32(K.bn_moments(x), R.bn_moments(x), "moments")
    dy = _rand(shape, torch.float32, "cpu", cl)
    mean, rstd, scale, shift = outs[1][0]
    head = (dy, x, mean, rstd, scale, shift, None, 1, None, 0, None, None, None)
    assert_close_fp32(K.bn_act_bwd_reduce(*head), R.bn_act_bwd_reduce(*head), "sums")
    for buf in launch.all_counters():
        assert not buf.any(), "a counter was left non-zero"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the interpreter "
                    "runs programs in order, so it cannot show arrival-order effects")
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_reductions_are_bit_identical_over_20_runs(cl):
    """The last program merges partials by index, never by arrival: 20 runs of each
    reduction on one input give the same bits."""
    shape = (64, 256, 28, 28)
    x = _rand(shape, torch.bfloat16, "cuda", cl, 2.0, 0.5)
    dy = _rand(shape, torch.bfloat16, "cuda", cl)
    mean, rstd, scale, shift = K.bn_stats(x, None, None, None, None, None, 0.1, 1e-5)
    head = (dy, x, mean, rstd, scale, shift, None, 1, None, 0, None, None, None)
    runs = {"stats": lambda: K.bn_stats(x, None, None, None, None, None, 0.1, 1e-5),
            "moments": lambda: K.bn_moments(x),
            "sums": lambda: K.bn_act_bwd_reduce(*head)}
    for name, fn in runs.items():
        first = fn()
        for _ in range(19):
            assert torch.equal(fn(), first), f"{name} differs between runs"
