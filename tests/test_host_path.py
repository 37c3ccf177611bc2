"""The host path of a fused block call: no host-device synchronisation, and a cached plan
that is rebuilt whenever the module changes (issue: host path).

Run with TRITON_INTERPRET=1 so that the Triton launchers run; the plan tests also hold
on the reference backend.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fusedres
from fusedres import plan as plan_mod
from fusedres import reference as R

from checks import HAS_CUDA, INTERPRET, TRITON_DEVICES
from test_convert import randomize

# What a host-device synchronisation, or a tensor made for a Python scalar, looks like to
# a user of the profiler or of a dispatch mode.
FORBIDDEN = {"aten._local_scalar_dense.default", "aten.item.default",
             "aten.lift_fresh.default", "aten.scalar_tensor.default"}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


BLOCKS = {
    "basic": lambda: R.BasicBlock(8, 8),
    "bottleneck_proj": lambda: R.Bottleneck(8, 4, stride=2, downsample=R.projection(8, 16, 2)),
    "preact": lambda: R.PreActBasicBlock(8, 16, stride=2),
}


def _pair(name: str, device: str):
    torch.manual_seed(0)
    ref = randomize(BLOCKS[name]()).to(device).double()
    return ref, fusedres.convert(copy.deepcopy(ref))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_no_host_device_sync(device, name, momentum):
    _, fused = _pair(name, device)
    for m in fused.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    x = torch.randn(2, 8, 4, 4, device=device, dtype=torch.float64, requires_grad=True)
    with fusedres.use_backend("triton"):
        fused(x)  # first call: the plan is built (host-side checks only, no sync either)
        with _Ops() as ops:
            fused.train()
            fused(x).sum().backward()
            fused.eval()
            with torch.no_grad():
                fused(x)
            fused(x).sum().backward()  # eval with gradients: frozen statistics
    bad = sorted(set(ops.seen) & FORBIDDEN)
    assert not bad, f"host-device synchronisation or scalar tensors: {bad}"
    assert any("convolution" in s for s in ops.seen), "the dispatch mode saw nothing"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_no_sync_with_cuda_sync_debug_mode():
    _, fused = _pair("bottleneck_proj", "cuda")
    fused = fused.float()
    x = torch.randn(4, 8, 8, 8, device="cuda", requires_grad=True)
    fused(x).sum().backward()  # compile the kernels first (that may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused(x).sum().backward()
        fused.eval()
        with torch.no_grad():
            fused(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------------------
# The plan cache
# --------------------------------------------------------------------------------------


def _plan(block):
    cached = plan_mod._PLANS.get(block)
    return None if cached is None else cached.plan


def _check_same(ref, fused, x, train=None, tol=None):
    """Outputs, input gradients and buffers agree; ``train`` None leaves the modes alone."""
    if train is not None:
        ref.train(train)
        fused.train(train)
    xr = x.clone().requires_grad_(True)
    xf = x.clone().requires_grad_(True)
    out_r, out_f = ref(xr), fused(xf)
    if tol is None:
        tol = 1e-9 if x.dtype == torch.float64 else 3e-2
    tol = dict(rtol=tol, atol=tol)
    torch.testing.assert_close(out_f, out_r, **tol)
    out_r.sum().backward()
    out_f.sum().backward()
    torch.testing.assert_close(xf.grad, xr.grad, **tol)
    for (n, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers()):
        torch.testing.assert_close(b, a, **tol, msg=n)


CHANGES = {
    "new weights (load_state_dict)": lambda b: b.load_state_dict(
        {k: (v + 0.1 if v.is_floating_point() else v) for k, v in b.state_dict().items()}),
    "a new Parameter": lambda b: setattr(b.conv1, "weight",
                                         nn.Parameter(b.conv1.weight.detach() * 1.5)),
    "eval()": lambda b: b.eval(),
    "a frozen BN (bn1.eval())": lambda b: b.bn1.eval(),
    "new momentum": lambda b: setattr(b.bn2, "momentum", 0.5),
    "momentum None": lambda b: setattr(b.bn1, "momentum", None),
    "new eps": lambda b: setattr(b.bn1, "eps", 0.3),
    "track_running_stats off": lambda b: setattr(b.bn1, "track_running_stats", False),
    "requires_grad off": lambda b: b.conv2.weight.requires_grad_(False),
    "a new norm module": lambda b: setattr(b, "bn1", _renewed_norm(b.bn1)),
    "a new running_mean buffer": lambda b: setattr(b.bn2, "running_mean",
                                                   b.bn2.running_mean + 0.25),
}


def _renewed_norm(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """A new BatchNorm2d like ``bn``, with other (deterministic) parameters."""
    new = copy.deepcopy(bn)
    with torch.no_grad():
        new.weight.mul_(0.5)
        new.running_var.add_(0.5)
    return new


@pytest.mark.parametrize("change", list(CHANGES))
def test_plan_rebuilt_after_module_change(change):
    torch.manual_seed(0)
    ref, fused = _pair("basic", "cpu")
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    _check_same(ref, fused, x, train=True)
    before = _plan(fused)
    assert before is not None, "the module path cached no plan"
    _check_same(ref, fused, x, train=True)
    assert _plan(fused) is before, "an unchanged block rebuilt its plan"
    CHANGES[change](ref)
    CHANGES[change](fused)
    _check_same(ref, fused, x)
    if change.startswith("new weights"):  # same tensors, same plan, new values
        assert _plan(fused) is before
    else:
        assert _plan(fused) is not before, f"the plan was not rebuilt after {change}"


def test_plan_rebuilt_after_dtype_and_layout_changes():
    torch.manual_seed(0)
    ref, fused = _pair("bottleneck_proj", "cpu")
    ref, fused = ref.float(), fused.float()
    x = torch.randn(2, 8, 4, 4)
    _check_same(ref, fused, x, train=True)
    p0 = _plan(fused)
    ref.to(memory_format=torch.channels_last)
    fused.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    _check_same(ref, fused, xc, train=True)
    with torch.no_grad():
        fused.eval()
        assert fused(xc).is_contiguous(memory_format=torch.channels_last)
    p1 = _plan(fused)
    assert p1 is not p0, "a channels_last input did not rebuild the plan"
    fused.double()  # .double() keeps each Parameter's identity and changes its dtype
    ref.double()
    # (statistics from float32 training steps: agree to float32 rounding)
    _check_same(ref, fused, x.double(), train=False, tol=1e-5)
    assert _plan(fused) is not p1, "a dtype change did not rebuild the plan"
    # a wrong-dtype input after the change is refused before any kernel runs
    stats = {n: b.clone() for n, b in fused.named_buffers()}
    fused.train()
    with pytest.raises(TypeError):
        fused(x)  # float32 input, float64 block
    for n, b in fused.named_buffers():
        assert torch.equal(b, stats[n]), f"{n} changed by a failed call"


def test_plan_rebuilt_after_downsample_norm_replaced():
    # the downsample module stays, one of its children is new: the fast check sees it
    torch.manual_seed(0)
    ref, fused = _pair("bottleneck_proj", "cpu")
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    _check_same(ref, fused, x, train=True)
    p0 = _plan(fused)
    ref.downsample[1] = _renewed_norm(ref.downsample[1])
    fused.downsample[1] = _renewed_norm(fused.downsample[1])
    _check_same(ref, fused, x, train=True)
    assert _plan(fused) is not p0


def test_plan_follows_grad_mode_and_input_shape():
    torch.manual_seed(0)
    ref, fused = _pair("basic", "cpu")
    fused.train()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        fused(x)
    p0 = _plan(fused)
    assert not p0.grad
    fused(x.requires_grad_(True)).sum().backward()
    assert _plan(fused).grad
    one = torch.randn(1, 8, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(one)


def test_plan_follows_the_input_device():
    """A plan made for a CPU input does not serve a meta one (same shape, strides and
    dtype): the call is checked afresh and raises as a first call would."""
    ref, fused = _pair("basic", "cpu")
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    _check_same(ref, fused, x, train=True)
    p0 = _plan(fused)
    before = [b.clone() for b in fused.buffers()]
    # the facts of the plan's input (_check_same's requires grad) but for the device
    with pytest.raises(ValueError, match="must be on meta like x"):
        fused(x.to("meta").requires_grad_(True))
    assert _plan(fused) is p0
    for b, b0 in zip(fused.buffers(), before):
        assert torch.equal(b, b0)
    _check_same(ref, fused, x, train=True)


def test_plan_follows_torch_distributed_only_for_sync_norms(monkeypatch):
    """A block of sync norms is planned afresh once torch.distributed is initialised (its
    group depends on it); a plain block's plan does not depend on it and is kept."""
    from fusedres import distributed
    ref, plain = _pair("basic", "cpu")
    sync = fusedres.convert(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref)))
    assert type(sync.bn1) is fusedres.FusedSyncBatchNorm
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    for block in (plain, sync):  # (a fresh reference each: both update its statistics)
        _check_same(copy.deepcopy(ref), block, x, train=True)
    # (no process group here: only what the fast check reads is changed)
    monkeypatch.setattr(distributed, "is_initialised", lambda: True)
    for block in (plain, sync):
        c = plan_mod._PLANS.get(block)
        holds = c.hit.holds(block._modules, x.clone().requires_grad_(True), None,
                            block.recompute)
        assert holds is (block is plain), type(block.bn1).__name__


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 for the triton backend")
def test_cached_plan_runs_the_triton_kernels():
    from checks import triton_ran
    ref, fused = _pair("basic", "cpu")
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    with fusedres.use_backend("triton"):
        _check_same(ref, fused, x, train=True)   # builds the plan
        with triton_ran("_bn_act_fwd_kernel"):
            _check_same(ref, fused, x, train=True)  # runs the cached one


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 for the triton backend")
@pytest.mark.parametrize("name", ["basic", "bottleneck_proj"])
def test_bound_epilogues_are_reused_and_follow_the_modules(name, monkeypatch):
    # A cached plan binds each epilogue launch once (kernels.epilogue.BoundFwd); the
    # bindings hold the modules' own tensors, so in-place updates reach them, and a
    # changed eps (bound into the launch) makes a new plan with new bindings.
    from fusedres.kernels import epilogue
    made = []
    init = epilogue.BoundFwd.__init__
    monkeypatch.setattr(epilogue.BoundFwd, "__init__",
                        lambda self, *a, **k: (made.append(1), init(self, *a, **k))[1])
    ref, fused = _pair(name, "cpu")
    ref.eval()
    fused.eval()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    n_sites = 3 if name.startswith("bottleneck") else 2
    with fusedres.use_backend("triton"), torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-9, atol=1e-9)
        assert len(made) == n_sites
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-9, atol=1e-9)
        assert len(made) == n_sites, "a repeat call bound its launches again"
        for b in (ref, fused):
            b.load_state_dict({k: (v * 1.25 if v.is_floating_point() else v)
                               for k, v in b.state_dict().items()})
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-9, atol=1e-9)
        assert len(made) == n_sites, "in-place new values need no new binding"
        ref.bn1.eps = fused.bn1.eps = 0.25
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-9, atol=1e-9)
        assert len(made) == 2 * n_sites, "a new eps did not make new bindings"


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 for the triton backend")
def test_bindings_keep_no_activation_alive():
    # A plan keeps its bindings for good: they must hold the modules' tensors and small
    # stand-ins only, never a call's activations (z, y, the skip, dy, the statistics).
    import gc
    import weakref
    from fusedres.kernels import backward, epilogue, stats
    ref, fused = _pair("bottleneck_proj", "cpu")
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    seen = []
    fitted = []  # each call_if_fits: did the binding take the call

    def spy(cls, name, n_tensors):
        real = getattr(cls, name)

        def call(self, *args):
            seen.extend(weakref.ref(t) for t in args[:n_tensors])
            out = real(self, *args)
            if name == "call_if_fits":
                fitted.append(out is not None)
            return out
        return real, call
    # (the straight path calls each binding's call_if_fits, the general path __call__)
    patched = [(cls, name, *spy(cls, name, n)) for cls, name, n in
               ((epilogue.BoundFwd, "__call__", 1), (stats.BoundStats, "__call__", 1),
                (backward.BoundBwd, "__call__", 2), (epilogue.BoundFwd, "call_if_fits", 2),
                (stats.BoundStats, "call_if_fits", 1), (backward.BoundBwd, "call_if_fits", 2))]
    with fusedres.use_backend("triton"):
        for cls, name, _, call in patched:
            setattr(cls, name, call)
        try:
            fused(x).sum().backward()
            fused(x).sum().backward()
        finally:
            for cls, name, real, _ in patched:
                setattr(cls, name, real)
    gc.collect()
    assert len(seen) >= 2 * (4 + 3 + 2 * 3), "the bindings did not run"
    # the straight path's second call takes every BN through its bindings' fast call
    assert len(fitted) >= 4 + 3 + 3 and all(fitted), "a binding's call_if_fits missed"
    assert all(r() is None for r in seen), "a binding keeps a call's tensor alive"


def _straight_runs(monkeypatch, on: bool) -> list:
    """Count the straight-line program's calls, or (on=False) turn it off."""
    from fusedres import straight
    calls = []
    if not on:
        monkeypatch.setattr(straight, "covers", lambda spec, impl, save: False)
        return calls
    real = straight.StraightBlock.forward
    monkeypatch.setattr(straight.StraightBlock, "forward",
                        lambda self, *a: (calls.append(1), real(self, *a))[1])
    return calls


STRAIGHT_CASES = {
    "basic": lambda: R.BasicBlock(8, 8),
    "bottleneck_proj": BLOCKS["bottleneck_proj"],
    "bottleneck_avg_down": lambda: R.Bottleneck(8, 4, stride=2, downsample=nn.Sequential(
        nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))),
    "preact": lambda: R.PreActBasicBlock(8, 8),
    "preact_proj": BLOCKS["preact"],
}


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 for the triton backend")
# (drop path with channels_last, and neither: each of the two on every block, in half the
# interpreter time of all four pairings)
@pytest.mark.parametrize("drop, cl", [(0.0, False), (0.5, True)], ids=["nchw", "cl_drop"])
@pytest.mark.parametrize("name", list(STRAIGHT_CASES))
def test_straight_program_matches_the_general_path(name, drop, cl, monkeypatch):
    """A cached plan of the common block runs fusedres.straight, which must compute
    exactly what function.py's path computes (the same kernels in the same order): the
    outputs, every gradient and every buffer bit for bit, in training and in eval."""
    torch.manual_seed(0)
    base = randomize(STRAIGHT_CASES[name]())
    base.drop_path_rate = drop
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(3, 8, 5, 5).to(memory_format=fmt)
    results = []
    for on in (True, False):
        with monkeypatch.context() as mp:
            calls = _straight_runs(mp, on)
            block = fusedres.convert(copy.deepcopy(base)).to(memory_format=fmt)
            got = []
            with fusedres.use_backend("triton"):
                for step in range(2):
                    torch.manual_seed(step)  # (the same drop-path draws on both paths)
                    xg = x.clone().requires_grad_(True)
                    out = block.train()(xg)
                    out.backward(torch.randn_like(out))
                    got += [out, xg.grad]
                with torch.no_grad():
                    got.append(block.eval()(x))
            got += [p.grad for p in block.parameters()] + list(block.buffers())
            if on:
                assert len(calls) == 3, "the cached plan did not run the straight program"
            results.append(got)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 for the triton backend")
@pytest.mark.parametrize("name", ["basic", "bottleneck_proj", "bottleneck_avg_down",
                                  "preact_proj"])
def test_straight_saved_state_read_by_the_general_backward(name, monkeypatch):
    """A straight-path forward saves each BN's statistics as [4, C] rows; a backward that
    takes function.py's path instead (here: another backend by then) reads them too, and
    gets the gradients a reference-backend step gets."""
    torch.manual_seed(0)
    base = randomize(STRAIGHT_CASES[name]()).double()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    grads = []
    for fwd_backend in ("triton", "reference"):
        with monkeypatch.context() as mp:
            calls = _straight_runs(mp, True)
            block = fusedres.convert(copy.deepcopy(base)).train()
            xg = x.clone().requires_grad_(True)
            with fusedres.use_backend(fwd_backend):
                out = block(xg)
            with fusedres.use_backend("reference"):
                out.backward(torch.ones_like(out))
            assert len(calls) == (1 if fwd_backend == "triton" else 0)
            grads.append([out, xg.grad, *(p.grad for p in block.parameters())])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 for the triton backend")
@pytest.mark.parametrize("name", ["bottleneck_avg_down", "preact_proj"])
def test_straight_program_under_autograd_grad_with_inputs(name, monkeypatch):
    """The straight path's backward calls its recorded convolutions' autograd nodes,
    which compute only what the engine's graph task will run: torch.autograd.grad of a
    few inputs, and backward(inputs=...), must get the general path's gradients all the
    same, bit for bit."""
    torch.manual_seed(0)
    base = randomize(STRAIGHT_CASES[name]())
    x = torch.randn(3, 8, 5, 5)
    results = []
    for on in (True, False):
        with monkeypatch.context() as mp:
            calls = _straight_runs(mp, on)
            block = fusedres.convert(copy.deepcopy(base)).train()
            params = list(block.parameters())
            xg = x.clone().requires_grad_(True)
            torch.manual_seed(1)
            out = block(xg)
            gout = torch.randn_like(out)
            got = [*torch.autograd.grad(out, [xg], gout)]
            got += torch.autograd.grad(block(xg), [params[0], params[-1]], gout)
            block(xg).backward(gout, inputs=[xg, params[1]])
            got += [xg.grad, params[1].grad, *block.buffers()]
            if on:
                assert len(calls) == 3, "the cached plan did not run the straight program"
            results.append(got)
    for a, b in zip(*results):
        assert torch.equal(a, b)
