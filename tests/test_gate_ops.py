"""The gate primitives (squeeze-excite / ECA; notes: gate API): an [N] or [N, C] branch
factor, pooled statistics, per-sample backward sums and du_add, on every backend.

The reference is checked against torch autograd of the plain formulas; the Triton kernels
(interpreter on CPU) against the reference and, composed into a gated BN's forward and
backward, by gradcheck in fp64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from checks import INTERPRET, TRITON_DEVICES, assert_close_fp32, pairwise_layouts, triton_ran
from fusedres import reference as R

EPS = 1e-5


def _rand(shape, dtype, cl=False, scale=1.0, shift=0.0, device="cpu"):
    x = (torch.randn(shape, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if cl else x


# --------------------------------------------------------------------------------------
# A gated BN written with the backend primitives, as a gated block uses them
# --------------------------------------------------------------------------------------


def se_gate(p, w1, b1, w2, b2):
    """timm's SEModule on pooled [N, C]: sigmoid(fc2(relu(fc1(p))))."""
    return torch.sigmoid(F.linear(torch.relu(F.linear(p, w1, b1)), w2, b2))


def eca_gate(p, w):
    """timm's EcaModule on pooled [N, C]: sigmoid(conv1d over channels)."""
    k = w.shape[-1]
    return torch.sigmoid(F.conv1d(p[:, None, :], w, padding=(k - 1) // 2))[:, 0, :]


class GatedBN(torch.autograd.Function):
    """out = relu(f*g*bn(z) + skip), g = gate(mean_hw bn(z)), bn in training mode, through
    ``impl``'s primitives only: stats_pool -> gate -> fwd(factor = f*g); backward
    reduce(per_sample) -> gate backward -> apply(du_add). The gate API's backward, verbatim."""

    @staticmethod
    def forward(ctx, impl, gate, f, z, skip, weight, bias, *gate_params):
        N, C, H, W = z.shape
        st, m = impl.bn_stats_pool(z, weight, bias, None, None, None, 0.1, EPS)
        mean, rstd, scale, shift = st
        p = scale * m + shift
        g = gate(p, *gate_params)
        factor = g * f[:, None] if f is not None else g
        y, mask, _, _ = impl.bn_act_fwd(z, scale, shift, None, None, None, None, EPS, skip,
                                        None, None, None, None, None, None, 0.0, False,
                                        factor, True, True)
        ctx.impl, ctx.gate = impl, gate
        ctx.save_for_backward(z, mask, st, m, p, f, weight, bias, *gate_params)
        return y

    @staticmethod
    def backward(ctx, dy):
        impl, gate = ctx.impl, ctx.gate
        z, mask, st, m, p, f, weight, bias, *gate_params = ctx.saved_tensors
        N, C, H, W = z.shape
        HW = H * W
        mean, rstd, scale, shift = st
        S = impl.bn_act_bwd_reduce(dy, z, mean, rstd, scale, shift, mask, 2, None, 1, None,
                                   None, None, True)
        A, B = S[0], S[1]
        fn = f[:, None] if f is not None else 1.0
        gamma = weight if weight is not None else 1.0
        beta = bias if bias is not None else 0.0
        dg = fn * (gamma * B + beta * A)
        with torch.enable_grad():
            pp = p.detach().requires_grad_(True)
            params = [t.detach().requires_grad_(True) for t in gate_params]
            g = gate(pp, *params)
            dp, *dparams = torch.autograd.grad(g, [pp, *params], dg)
        g = g.detach()
        Sd = (fn * g * A).sum(0) + dp.sum(0)
        Sdx = (fn * g * B).sum(0) + (dp * (m - mean) * rstd).sum(0)
        mean_sums = torch.stack([Sd, Sdx]) / (N * HW)
        factor = g * fn
        dz, dskip = impl.bn_act_bwd_apply(dy, z, mean, rstd, scale, shift, mask, 2, factor, 1,
                                          None, None, None, None, True, False, None, mean_sums,
                                          dp / HW)
        return (None, None, None, dz, dskip, Sdx if weight is not None else None,
                Sd if bias is not None else None, *dparams)


def gated_bn_plain(gate, f, z, skip, weight, bias, *gate_params):
    """The same in plain torch ops: what autograd differentiates."""
    u = F.batch_norm(z, None, None, weight, bias, True, 0.0, EPS)
    g = gate(u.mean((2, 3)), *gate_params)
    factor = g * f[:, None] if f is not None else g
    return torch.relu(factor[:, :, None, None] * u + skip)


def _gate_case(kind, C, dtype, device="cpu"):
    if kind == "se":
        rd = 3
        return se_gate, [_rand((rd, C), dtype, device=device) * 0.5,
                         _rand((rd,), dtype, device=device) * 0.1,
                         _rand((C, rd), dtype, device=device) * 0.5,
                         _rand((C,), dtype, device=device) * 0.1]
    return eca_gate, [_rand((1, 1, 3), dtype, device=device)]


# --------------------------------------------------------------------------------------
# The reference primitives against autograd of the plain formulas
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("factor_dim", [1, 2])
def test_reference_fwd_factor(cl, factor_dim):
    N, C = 3, 5
    z, r = _rand((N, C, 4, 3), torch.float64, cl), _rand((N, C, 4, 3), torch.float64, cl)
    scale, shift = _rand((C,), torch.float64), _rand((C,), torch.float64)
    factor = _rand((N, C) if factor_dim == 2 else (N,), torch.float64)
    y, mask, _, _ = R.bn_act_fwd(z, scale, shift, None, None, None, None, EPS, r, None, None,
                                 None, None, None, None, 0.0, False, factor, True, True)
    fac = factor.view(N, -1, 1, 1)
    v = fac * (z * scale.view(1, C, 1, 1) + shift.view(1, C, 1, 1)) + r
    torch.testing.assert_close(y, torch.relu(v), rtol=0, atol=0)
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert torch.equal(R.unpack_relu_mask(mask, z), v > 0)


def test_reference_pool():
    x = _rand((3, 4, 5, 2), torch.float32, True)
    torch.testing.assert_close(R.bn_pool(x), x.mean((2, 3)), rtol=1e-6, atol=1e-7)
    rm, rv, nbt = torch.zeros(4), torch.ones(4), torch.tensor(2)
    rm2, rv2, nbt2 = rm.clone(), rv.clone(), nbt.clone()
    st, m = R.bn_stats_pool(x, None, None, rm, rv, nbt, None, EPS)
    st2 = R.bn_stats(x, None, None, rm2, rv2, nbt2, None, EPS)
    assert torch.equal(st, st2) and torch.equal(m, R.bn_pool(x))
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2) and nbt.item() == nbt2.item() == 3
    assert R.bn_pool(x.new_empty((2, 4, 0, 3))).shape == (2, 4)


@pytest.mark.parametrize("skip_mode", [0, 1, 2])
def test_reference_per_sample_reduce(skip_mode):
    """Per-sample rows sum, over the samples, to the per-channel rows."""
    N, C, H, W = 3, 4, 3, 5
    dy, z, zd = (_rand((N, C, H, W), torch.float64) for _ in range(3))
    mean, rstd = _rand((C,), torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    scale, shift = _rand((C,), torch.float64), _rand((C,), torch.float64)
    factor = _rand((N, C), torch.float64)
    args = (dy, z, mean, rstd, scale, shift, None, 1, factor, skip_mode,
            zd if skip_mode == 2 else None, mean if skip_mode == 2 else None,
            rstd if skip_mode == 2 else None)
    per = R.bn_act_bwd_reduce(*args, True)
    tot = R.bn_act_bwd_reduce(*args)
    assert per.shape == (4 if skip_mode == 2 else 2, N, C)
    torch.testing.assert_close(per.sum(1), tot, rtol=1e-12, atol=1e-12)
    keep = (z * scale.view(1, C, 1, 1) + shift.view(1, C, 1, 1)) > 0
    g_b = torch.where(keep, dy, 0.0) * factor[:, :, None, None]
    xhat = (z - mean.view(1, C, 1, 1)) * rstd.view(1, C, 1, 1)
    torch.testing.assert_close(per[1], (g_b * xhat).sum((2, 3)), rtol=1e-12, atol=1e-12)


def _host_impl(name):
    """fusedres.reference, or csrc_ref's CPU build (skipped where it cannot be built)."""
    if name == "reference":
        return R
    from fusedres import csrc
    try:
        return csrc.load(torch.device("cpu"))
    except RuntimeError as e:
        pytest.skip(f"cannot build csrc_ref: {e}")


@pytest.mark.parametrize("impl", ["reference", "csrc_ref"])
@pytest.mark.parametrize("kind", ["se", "eca"])
@pytest.mark.parametrize("stochastic_depth", [False, True])
def test_reference_gated_bn_backward(impl, kind, stochastic_depth):
    """The gate API's backward over the reference's (and csrc_ref's) primitives = autograd
    of the formula."""
    impl = _host_impl(impl)
    torch.manual_seed(0)
    N, C, H, W = 3, 6, 3, 2
    gate, gparams = _gate_case(kind, C, torch.float64)
    z = _rand((N, C, H, W), torch.float64, scale=2.0, shift=0.3)
    skip = _rand((N, C, H, W), torch.float64)
    weight = torch.rand(C, dtype=torch.float64) + 0.5
    bias = _rand((C,), torch.float64)
    f = torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64) if stochastic_depth else None
    leaves = [t.requires_grad_(True) for t in (z, skip, weight, bias, *gparams)]
    y = GatedBN.apply(impl, gate, f, *leaves[:4], *leaves[4:])
    y_ref = gated_bn_plain(gate, f, *leaves[:4], *leaves[4:])
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = _rand(y.shape, torch.float64)
    got = torch.autograd.grad(y, leaves, dy)
    want = torch.autograd.grad(y_ref, leaves, dy)
    for name, a, e in zip(["z", "skip", "weight", "bias", *map(str, range(len(gparams)))],
                          got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_reference_du_add():
    """apply's du_add enters the BN backward exactly as a gradient on u = bn(z) would."""
    N, C, H, W = 2, 3, 2, 3
    z = _rand((N, C, H, W), torch.float64).requires_grad_(True)
    weight = torch.rand(C, dtype=torch.float64) + 0.5
    st = R.bn_stats(z.detach(), weight, None, None, None, None, 0.1, EPS)
    mean, rstd, scale, shift = st
    dy, du_add = _rand((N, C, H, W), torch.float64), _rand((N, C), torch.float64)
    du = dy + du_add[:, :, None, None]
    u = F.batch_norm(z, None, None, weight, None, True, 0.0, EPS)
    dz_ref, = torch.autograd.grad(u, z, du)
    xhat = (z.detach() - mean.view(1, C, 1, 1)) * rstd.view(1, C, 1, 1)
    ms = torch.stack([du.sum((0, 2, 3)), (du * xhat).sum((0, 2, 3))]) / (N * H * W)
    dz, _ = R.bn_act_bwd_apply(dy, z.detach(), mean, rstd, scale, shift, None, 0, None, 0,
                               None, None, None, None, True, False, None, ms, du_add)
    torch.testing.assert_close(dz, dz_ref, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------
# The Triton kernels (interpreter on CPU) against the reference
# --------------------------------------------------------------------------------------

FLOATS = [torch.float32, torch.float64]
# (N, C, H, W): odd sizes; the first two also split into several position blocks,
# sample chunks and channel blocks with the GPU tiling
GATE_SHAPES = [(3, 20, 5, 3), (2, 12, 1, 1)]
GPU_TILE_SHAPES = {False: (5, 300, 5, 7), True: (5, 300, 6, 6)}


@pytest.fixture(params=["interpret", "gpu"], ids=["interp_tiles", "gpu_tiles"])
def tiling(request, monkeypatch):
    """The interpreter's one large program, or the GPU tiling run in the interpreter
    (several position blocks and sample chunks: the group tickets and merges run)."""
    if not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1")
    from fusedres.kernels import config
    if request.param == "gpu":
        monkeypatch.setattr(config, "INTERPRET_TILES", False)
    yield request.param
    from fusedres.kernels import launch
    for buf in launch.all_counters():
        assert not buf.any(), "a counter was left non-zero"


def _shape(tiling, cl, i=0):
    return GPU_TILE_SHAPES[cl] if tiling == "gpu" else GATE_SHAPES[i]


def _close(actual, expected, dtype, name):
    if dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")
    else:
        assert_close_fp32(actual, expected, name)


# pairwise (skip mode, dtype, layout), each with both tilings: see checks.pairwise_layouts
@pytest.mark.parametrize("skip_mode,dtype,cl", pairwise_layouts([0, 1, 2], FLOATS))
def test_fwd_factor_per_channel(tiling, dtype, cl, skip_mode):
    from fusedres import kernels as K
    N, C, H, W = shape = _shape(tiling, cl)
    z, r = _rand(shape, dtype, cl), _rand(shape, dtype, cl)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    scale, shift = _rand((C,), sdt), _rand((C,), sdt)
    factor = torch.rand(N, C, dtype=sdt) * torch.tensor([2.0, 0.0] * N)[:N, None].to(sdt)
    skip_norm = skip_mode == 2
    args = (z, scale, shift, None, None, None, None, EPS, r if skip_mode else None,
            scale.flip(0) if skip_norm else None, shift.flip(0) if skip_norm else None,
            None, None, None, None, EPS, skip_norm, factor, True, True)
    with triton_ran("_bn_act_fwd_kernel"):
        yk, mk, _, _ = K.bn_act_fwd(*args)
    yr, mr, _, _ = R.bn_act_fwd(*args)
    _close(yk, yr, dtype, "y")
    assert yk.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert torch.equal(mk, mr)


# pairwise (momentum, dtype, layout): the four rows of an orthogonal array
@pytest.mark.parametrize("momentum,dtype,cl", pairwise_layouts([0.1, None], FLOATS))
def test_stats_pool(tiling, dtype, cl, momentum):
    """bn_stats_pool: bn_stats's statistics and running-statistics update bit for bit
    (the same launch with POOL), and the pooled means; bn_pool gives the same means."""
    from fusedres import kernels as K
    N, C, H, W = shape = _shape(tiling, cl)
    x = _rand(shape, dtype, cl, 2.0, 0.5)
    w, b = torch.rand(C, dtype=dtype) + 0.5, _rand((C,), dtype)
    outs = []
    for fn in (K.bn_stats_pool, K.bn_stats):
        rm, rv, nbt = torch.linspace(-1, 1, C, dtype=dtype), torch.ones(C, dtype=dtype), \
            torch.tensor(3)
        outs.append((fn(x, w, b, rm, rv, nbt, momentum, EPS), rm, rv, nbt))
    (sp, rm_p, rv_p, nbt_p), (st, rm_s, rv_s, nbt_s) = outs
    stats, pooled = sp
    assert torch.equal(stats, st) and torch.equal(rm_p, rm_s) and torch.equal(rv_p, rv_s)
    assert nbt_p.item() == nbt_s.item() == 4
    assert pooled.shape == (N, C) and pooled.dtype == (torch.float64 if dtype == torch.float64
                                                       else torch.float32)
    _close(pooled, R.bn_pool(x), dtype, "pooled")
    with triton_ran("_bn_stats_partial_kernel"):
        again = K.bn_pool(x)
    assert torch.equal(again, pooled)  # the same tiles and merge order: the same bits


def test_pool_empty():
    from fusedres import kernels as K
    if not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1")
    x = torch.randn(3, 4, 0, 2)
    nbt = torch.tensor(0)
    st, m = K.bn_stats_pool(x, None, None, torch.zeros(4), torch.ones(4), nbt, 0.1, EPS)
    assert torch.equal(m, torch.zeros(3, 4)) and nbt.item() == 1
    assert torch.equal(K.bn_pool(x), torch.zeros(3, 4))


def _bwd_head(shape, dtype, cl, mask_mode, skip_mode, factor_kind):
    N, C, H, W = shape
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    dy, z, zd = (_rand(shape, dtype, cl) for _ in range(3))
    mean, rstd = _rand((C,), sdt) * 0.1, torch.rand(C, dtype=sdt) + 0.5
    scale, shift = _rand((C,), sdt), _rand((C,), sdt)
    mask = None
    if mask_mode == 2:
        mask = R.pack_relu_mask((_rand(shape, dtype, cl) > 0).contiguous(
            memory_format=torch.channels_last if cl else torch.contiguous_format))
    factor = {None: None, "n": torch.rand(N, dtype=dtype) + 0.5,
              "nc": torch.rand(N, C, dtype=sdt) + 0.5}[factor_kind]
    proj = skip_mode == 2
    return (dy, z, mean, rstd, scale, shift, mask, mask_mode, factor, skip_mode,
            zd if proj else None, mean.flip(0) if proj else None, rstd.flip(0) if proj else None)


# pairwise (mode row, dtype, layout), each with both tilings: see checks.pairwise_layouts
@pytest.mark.parametrize("mask_mode,skip_mode,factor_kind,dtype,cl", pairwise_layouts(
    [(2, 1, None), (1, 0, "nc"), (2, 2, "nc"), (0, 1, "n")], FLOATS))
def test_reduce_per_sample(tiling, dtype, cl, mask_mode, skip_mode, factor_kind):
    from fusedres import kernels as K
    shape = _shape(tiling, cl)
    head = _bwd_head(shape, dtype, cl, mask_mode, skip_mode, factor_kind)
    with triton_ran("_bn_act_bwd_reduce_kernel"):
        per = K.bn_act_bwd_reduce(*head, True)
    assert per.shape == ((4 if skip_mode == 2 else 2),) + shape[:2]
    _close(per, R.bn_act_bwd_reduce(*head, True), dtype, "per-sample sums")
    _close(K.bn_act_bwd_reduce(*head), R.bn_act_bwd_reduce(*head), dtype, "sums")


# pairwise (mode row, dtype, layout), each with both tilings: see checks.pairwise_layouts
@pytest.mark.parametrize("mask_mode,skip_mode,factor_kind,batch_stats,dtype,cl",
                         pairwise_layouts([(2, 1, "nc", True), (1, 0, None, True),
                                           (2, 2, "nc", True), (0, 1, "nc", False)], FLOATS))
def test_apply_du_add(tiling, dtype, cl, mask_mode, skip_mode, factor_kind, batch_stats):
    from fusedres import kernels as K
    shape = _shape(tiling, cl)
    N, C = shape[:2]
    head = _bwd_head(shape, dtype, cl, mask_mode, skip_mode, factor_kind)
    sdt = head[2].dtype
    ms = _rand((4 if skip_mode == 2 else 2, C), sdt)
    du_add = _rand((N, C), sdt)
    tail = (head[3].flip(0) if skip_mode == 2 else None, batch_stats, skip_mode == 2, None, ms,
            du_add)
    with triton_ran("_bn_act_bwd_apply_kernel"):
        dz, dskip = K.bn_act_bwd_apply(*head, *tail)
    dz_r, dskip_r = R.bn_act_bwd_apply(*head, *tail)
    _close(dz, dz_r, dtype, "dz")
    _close(dskip, dskip_r, dtype, "dskip")
    # du_add has teeth: without it dz differs
    assert not torch.allclose(dz, R.bn_act_bwd_apply(*head, *tail[:-1], None)[0])


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_fused_bwd_factor_per_channel(tiling, cl):
    from fusedres import kernels as K
    shape = _shape(tiling, cl)
    head = _bwd_head(shape, torch.float32, cl, 2, 2, "nc")
    tail = (head[3], True, True, True, None)
    for a, e, name in zip(K.bn_act_bwd(*head, *tail), R.bn_act_bwd(*head, *tail),
                          ("dz", "dzd", "sums")):
        assert_close_fp32(a, e, name)


# --------------------------------------------------------------------------------------
# gradcheck in fp64 through the Triton kernels: the gated BN's backward (gate API)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("kind", ["se", "eca"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_gradcheck_gated_bn_triton(device, kind, cl):
    """stats_pool -> SE/ECA gate -> fwd(factor = f*g) and reduce(per_sample) -> gate
    backward -> apply(du_add), all through the Triton kernels, against finite differences
    of the same kernels and against autograd of the plain formula."""
    from fusedres import kernels as K
    torch.manual_seed(1)
    N, C, H, W = 2, 8, 3, 3
    dt = torch.float64
    gate, gparams = _gate_case(kind, C, dt, device)
    z = _rand((N, C, H, W), dt, cl, 1.5, 0.2, device)
    skip = _rand((N, C, H, W), dt, cl, device=device)
    weight = torch.rand(C, dtype=dt, device=device) + 0.5
    bias = _rand((C,), dt, device=device)
    f = torch.tensor([2.0, 0.0], dtype=dt, device=device)
    leaves = [t.requires_grad_(True) for t in (z, skip, weight, bias, *gparams)]

    def fn(*ts):
        return GatedBN.apply(K, gate, f, *ts)

    with triton_ran("_bn_stats_partial_kernel", "_bn_act_fwd_kernel",
                    "_bn_act_bwd_reduce_kernel", "_bn_act_bwd_apply_kernel"):
        y = fn(*leaves)
        dy = _rand(y.shape, dt, device=device)
        got = torch.autograd.grad(y, leaves, dy)
    y_ref = gated_bn_plain(gate, f, *leaves)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad(y_ref, leaves, dy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)
    # fast mode (random directions: few evaluations of the interpreted kernels); a ReLU
    # kink within eps of an input would fail it, which these inputs do not have
    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-5, rtol=1e-4,
                                    fast_mode=True)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_pool_and_per_sample_over_sample_chunks(cl, monkeypatch):
    """GPU tiling with several sample chunks (and, channels_last, position blocks too):
    each (chunk, channel block) group's last program merges its own samples."""
    if not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1")
    from fusedres import kernels as K
    from fusedres.kernels import config, launch
    monkeypatch.setattr(config, "INTERPRET_TILES", False)
    shape = (5, 8, 10, 20) if cl else (7, 8, 10, 20)
    N, C, H, W = shape
    for kind in ("stats", "reduce"):
        cfg = config.tile_config(N, C, H * W, cl, kind, 1, False, 4)
        S = -(-H * W // cfg.BLOCK_HW)
        assert cfg.grid[0] // S > 1 and (S > 1 or not cl), cfg
    x = _rand(shape, torch.float32, cl, 2.0, 0.5)
    st, m = K.bn_stats_pool(x, None, None, None, None, None, 0.1, EPS)
    assert torch.equal(st, K.bn_stats(x, None, None, None, None, None, 0.1, EPS))
    assert_close_fp32(m, R.bn_pool(x), "pooled")
    head = _bwd_head(shape, torch.float32, cl, 2, 1, "nc")
    assert_close_fp32(K.bn_act_bwd_reduce(*head, True), R.bn_act_bwd_reduce(*head, True),
                      "per-sample sums")
    for buf in launch.all_counters():
        assert not buf.any(), "a counter was left non-zero"


# --------------------------------------------------------------------------------------
# opcheck of the new and changed custom ops (the backend of CPU tensors: the reference,
# or the Triton kernels under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_opcheck_gate_ops(cl):
    from fusedres import ops
    torch.manual_seed(0)
    N, C, H, W = 2, 12, 5, 3
    z, r, dy = (_rand((N, C, H, W), torch.float32, cl) for _ in range(3))
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    for args in ((z, w, b, torch.randn(C), torch.rand(C) + 0.5, torch.tensor(3), 0.1, EPS),
                 (z, None, None, torch.randn(C), torch.rand(C) + 0.5, torch.tensor(0), None,
                  EPS),
                 (z, w, b, None, None, None, 0.1, EPS)):
        torch.library.opcheck(ops.bn_stats_pool, args)
    torch.library.opcheck(ops.bn_pool, (z,))
    st = R.bn_stats(z, w, b, None, None, None, 0.1, EPS)
    gate = torch.rand(N, C)
    fwd = (z, st[2], st[3], None, None, None, None, EPS, r, None, None, None, None, None, None,
           EPS, False, gate, True, True)
    torch.library.opcheck(ops.bn_act_fwd, fwd)
    mask = ops.bn_act_fwd(*fwd)[1]
    head = (dy, z, *st, mask, 2, None, 1, None, None, None)
    torch.library.opcheck(ops.bn_act_bwd_reduce, head + (True,))
    torch.library.opcheck(ops.bn_act_bwd_reduce, head[:8] + (gate,) + head[9:] + (False,))
    ms = R.bn_act_bwd_reduce(*head) / (N * H * W)
    apply = head[:8] + (gate,) + head[9:] + (None, True, False, None, ms)
    torch.library.opcheck(ops.bn_act_bwd_apply, apply + (torch.randn(N, C),))
    torch.library.opcheck(ops.bn_act_bwd_apply, apply + (None,))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("kind", ["se", "eca"])
def test_gradcheck_gated_bn_triton_every_input(device, kind):
    """The full (not fast-mode) gradcheck, every input element, on a smaller shape."""
    from fusedres import kernels as K
    torch.manual_seed(2)
    # two finite differences per input element, each through interpreted launches: 3
    # channels (ECA's kernel still spans neighbours) and 2 positions pooled keep it short
    N, C, H, W = 2, 3, 1, 2
    dt = torch.float64
    gate, gparams = _gate_case(kind, C, dt, device)
    leaves = [t.requires_grad_(True) for t in (
        _rand((N, C, H, W), dt, False, 1.5, 0.2, device), _rand((N, C, H, W), dt, device=device),
        torch.rand(C, dtype=dt, device=device) + 0.5, _rand((C,), dt, device=device), *gparams)]
    f = torch.tensor([0.5, 2.0], dtype=dt, device=device)
    assert torch.autograd.gradcheck(lambda *ts: GatedBN.apply(K, gate, f, *ts), tuple(leaves),
                                    eps=1e-6, atol=1e-5, rtol=1e-4)
