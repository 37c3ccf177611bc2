"""torch.compile and CUDA graphs over converted models, and opcheck of the custom ops.

Compiled with the "aot_eager" backend on the CPU: dynamo traces the model (fullgraph: no
graph break), AOTAutograd functionalises it (the running-statistics mutations declared by
fusedres::bn_stats) and the same custom ops run, so compiled and eager agree to rounding.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fusedres
from fusedres import ops, reference

torchvision = pytest.importorskip("torchvision")
tvR = torchvision.models.resnet

KERNELS = fusedres.backend_for(torch.device("cpu")) == "triton"
HAS_CUDA = torch.cuda.is_available()


def launches() -> int:
    if not KERNELS:
        return 0
    from fusedres.kernels import LAUNCHES
    return sum(LAUNCHES.values())


def close(actual, expected, what):
    """fp32, compiled against eager running the same ops: block tolerance."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------

FORMATS = [torch.contiguous_format, torch.channels_last]


def _t(*shape, fmt=torch.contiguous_format, dtype=torch.float32):
    t = torch.randn(*shape, dtype=dtype)
    return t.contiguous(memory_format=fmt) if t.dim() == 4 else t


def _stats(z):
    C = z.shape[1]
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    return reference.bn_stats(z, w, b, None, None, None, 0.1, 1e-5)


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
def test_opcheck_bn_stats(fmt):
    torch.manual_seed(0)
    x = _t(2, 12, 5, 7, fmt=fmt)
    C = x.shape[1]
    for args in (
        (x, torch.rand(C) + 0.5, torch.randn(C), torch.randn(C), torch.rand(C) + 0.5,
         torch.tensor(3), 0.1, 1e-5),
        (x, None, None, torch.randn(C), torch.rand(C) + 0.5, torch.tensor(0), None, 1e-3),
        (x, torch.rand(C) + 0.5, torch.randn(C), None, None, None, 0.1, 1e-5),
    ):
        torch.library.opcheck(ops.bn_stats, args)


def _fwd_args(z, scale, shift, skip, skip_scale, skip_shift, factor, relu, write_mask):
    """ops.bn_act_fwd's flat arguments with batch statistics (training)."""
    return (z, scale, shift, None, None, None, None, 1e-5, skip, skip_scale, skip_shift, None,
            None, None, None, 1e-5, skip_scale is not None, factor, relu, write_mask)


def _fwd(*args):
    return ops.bn_act_fwd(*_fwd_args(*args))[:2]


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
def test_opcheck_bn_act_fwd(fmt):
    torch.manual_seed(0)
    z, r, zd = _t(2, 12, 5, 7, fmt=fmt), _t(2, 12, 5, 7, fmt=fmt), _t(2, 12, 5, 7, fmt=fmt)
    _, _, scale, shift = _stats(z)
    _, _, scale_d, shift_d = _stats(zd)
    factor = torch.tensor([0.0, 1.25])
    C = z.shape[1]
    params = (torch.rand(C) + 0.5, torch.randn(C), torch.randn(C), torch.rand(C) + 0.5, 1e-5)
    for args in (
        _fwd_args(z, scale, shift, None, None, None, None, True, False),    # inner BN + ReLU
        _fwd_args(z, scale, shift, r, None, None, factor, True, True),      # identity skip, mask
        _fwd_args(z, scale, shift, zd, scale_d, shift_d, None, True, True),  # projection skip
        _fwd_args(z, scale, shift, r, None, None, None, False, False),      # no ReLU
        # eval: both BNs' scale/shift derived from the running statistics in the kernel
        (z, None, None, *params, zd, None, None, *params, True, None, True, True),
        (z, None, None, None, None, *params[2:], None, None, None, None, None, None, None,
         1e-5, False, None, True, False),
    ):
        torch.library.opcheck(ops.bn_act_fwd, args)


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
def test_opcheck_bn_act_bwd(fmt):
    torch.manual_seed(0)
    z, zd, r = _t(2, 12, 5, 7, fmt=fmt), _t(2, 12, 5, 7, fmt=fmt), _t(2, 12, 5, 7, fmt=fmt)
    dy, dz_add = _t(2, 12, 5, 7, fmt=fmt), _t(2, 12, 5, 7, fmt=fmt)
    st, std = _stats(z), _stats(zd)
    factor = torch.tensor([0.0, 1.25])
    _, mask_id = _fwd(z, st[2], st[3], r, None, None, factor, True, True)
    _, mask_pr = _fwd(z, st[2], st[3], zd, std[2], std[3], None, True, True)
    none4 = (None, None, None, None)
    for args in (
        # last BN of a block, identity shortcut, stochastic depth
        (dy, z, *st, mask_id, 2, factor, 1, *none4, True, False, True, None),
        # last BN with the projection BN
        (dy, z, *st, mask_pr, 2, None, 2, zd, std[0], std[1], std[2], True, True, True, None),
        # inner BN + ReLU, mask recomputed from z
        (dy, z, *st, None, 1, None, 0, *none4, True, False, True, None),
        # pre-activation first BN: gradient of the identity shortcut added
        (dy, z, *st, None, 1, None, 0, *none4, True, False, True, dz_add),
        # eval-mode BN, no parameter gradients wanted: no reduction
        (dy, z, *st, None, 1, None, 0, *none4, False, False, False, None),
    ):
        torch.library.opcheck(ops.bn_act_bwd, args)


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
def test_opcheck_synchronised_halves(fmt):
    """The ops synchronised batch norm runs with a collective between them."""
    torch.manual_seed(0)
    z, zd, dy = _t(2, 12, 5, 7, fmt=fmt), _t(2, 12, 5, 7, fmt=fmt), _t(2, 12, 5, 7, fmt=fmt)
    torch.library.opcheck(ops.bn_moments, (z,))
    moments = torch.stack([reference.bn_moments(z), reference.bn_moments(zd)])
    C = z.shape[1]
    for args in (
        (moments, torch.rand(C) + 0.5, torch.randn(C), torch.randn(C), torch.rand(C) + 0.5,
         torch.tensor(3), 0.1, 1e-5),
        (moments, None, None, torch.randn(C), torch.rand(C) + 0.5, torch.tensor(0), None, 1e-3),
    ):
        torch.library.opcheck(ops.bn_stats_from_moments, args)
    st, std = _stats(z), _stats(zd)
    _, mask = _fwd(z, st[2], st[3], zd, std[2], std[3], None, True, True)
    head = (dy, z, *st, mask, 2, None, 2, zd, std[0], std[1])
    torch.library.opcheck(ops.bn_act_bwd_reduce, head)
    mean_sums = reference.bn_act_bwd_reduce(*head) / (2 * 5 * 7)
    torch.library.opcheck(ops.bn_act_bwd_apply, (*head, std[2], True, True, None, mean_sums))
    inner = (dy, z, *st, None, 1, None, 0, None, None, None)
    torch.library.opcheck(ops.bn_act_bwd_reduce, inner)
    torch.library.opcheck(ops.bn_act_bwd_apply, (*inner, None, True, False, dy,
                                                 reference.bn_act_bwd_reduce(*inner) / 70))


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------


def _train_step(model, x, call=None):
    out = (model if call is None else call)(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_compiled_converted_resnet18_matches_eager():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = fusedres.convert(torchvision.models.resnet18())
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    # two train steps at batch 2, then a batch of another size (a recompile, still one
    # graph), then eval
    for step, n in enumerate((2, 2, 3)):
        x = torch.randn(n, 3, 64, 64, generator=gen)
        before = launches()
        out_c, grads_c = _train_step(model.train(), x, compiled)
        if KERNELS:
            assert launches() > before, "the compiled model did not run the Triton kernels"
        out_e, grads_e = _train_step(eager.train(), x)
        close(out_c, out_e, f"step {step} output")
        for name in grads_e:
            close(grads_c[name], grads_e[name], f"step {step} {name}.grad")
        for (name, bc), be in zip(model.named_buffers(), eager.buffers()):
            close(bc, be, f"step {step} {name}")
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        close(compiled.eval()(x), eager.eval()(x), "eval output")
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_drop_path_draws_like_eager():
    timm = pytest.importorskip("timm")
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = fusedres.convert(timm.create_model("resnet18", layers=[1, 1, 1, 1],
                                               drop_path_rate=0.3))
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 3, 64, 64)
    for step in range(2):
        torch.manual_seed(10 + step)
        out_c, grads_c = _train_step(model.train(), x, compiled)
        torch.manual_seed(10 + step)
        out_e, grads_e = _train_step(eager.train(), x)
        close(out_c, out_e, f"step {step} output")
        for name in grads_e:
            close(grads_c[name], grads_e[name], f"step {step} {name}.grad")


# --------------------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_train_step_replays_like_eager(monkeypatch):
    # the same deterministic convolutions on both sides, so replay and eager agree bitwise
    # up to kernel scheduling, and no ReLU flips apart over the steps
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = fusedres.convert(torchvision.models.resnet18()).cuda()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.01)
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randn(8, 3, 64, 64, device="cuda", generator=gen) for _ in range(6)]

    def step(m, o, x):
        o.zero_grad(set_to_none=True)
        loss = m(x).square().mean()
        loss.backward()
        o.step()
        return loss

    # No host-device synchronisation anywhere in a train step.
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(twin, opt_twin, batches[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Warm up on a side stream, then capture, as torch.cuda.graphs' whole-network recipe:
    # grads set to None before the capture, so that its backward allocates them in the
    # graph's pool and every replay writes them afresh.
    static_x = batches[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(model, opt, static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = model(static_x).square().mean()
        static_loss.backward()
        opt.step()
    for i, x in enumerate(batches[1:]):
        static_x.copy_(x)
        graph.replay()
        loss = step(twin, opt_twin, x)
        close(static_loss, loss, f"replay {i} loss")
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            close(p.grad, q.grad, f"replay {i} {name}.grad")
            close(p, q, f"replay {i} {name}")
        for (name, b), c in zip(model.named_buffers(), twin.buffers()):
            close(b, c, f"replay {i} {name}")
