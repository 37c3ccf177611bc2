"""Whole blocks through FusedResidualBlock against the plain-PyTorch blocks of reference.py."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fusedres
from checks import (TRITON_DEVICES, assert_close_fp32, assert_low_precision, compare_blocks,
                    make_pair, relu_flip_slack, triton_ran)

# (kind, c_in, planes, stride, groups, base_width, dilation, avg_down, H, W)
BLOCKS = {
    "basic-identity": ("basic", 24, 24, 1, 1, 64, 1, False, 7, 7),
    "basic-stride2-proj": ("basic", 24, 40, 2, 1, 64, 1, False, 13, 9),
    "bottleneck-proj": ("bottleneck", 24, 10, 1, 1, 64, 1, False, 7, 7),
    "bottleneck-identity": ("bottleneck", 40, 10, 1, 1, 64, 1, False, 5, 6),
    "resnext-groups32-stride2": ("bottleneck", 32, 16, 2, 32, 4, 1, False, 7, 7),
    "bottleneck-dilation2": ("bottleneck", 16, 4, 1, 1, 64, 2, False, 7, 7),
    "bottleneck-avgdown": ("bottleneck", 24, 6, 2, 1, 64, 1, True, 13, 9),
    "preact-identity": ("preact", 24, 24, 1, 1, 64, 1, False, 7, 7),
    "preact-stride2-proj": ("preact", 24, 40, 2, 1, 64, 1, False, 13, 9),
    "preact-bottleneck-proj": ("preact_bottleneck", 24, 10, 2, 1, 64, 1, False, 7, 7),
}


def _pair(name, device, seed=0):
    kind, c_in, planes, stride, groups, bw, dil, avg, H, W = BLOCKS[name]
    ref, fus = make_pair(kind, c_in, planes, stride, groups, bw, dil, avg, device, seed)
    return ref, fus, (c_in, H, W)


def _x(N, c_in, H, W, device, dtype=torch.float32, cl=False):
    x = torch.randn(N, c_in, H, W, device=device, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if cl else x


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_block_train_steps(device, name, cl):
    """Output, x.grad, every parameter grad, running stats and num_batches_tracked over 2
    SGD steps (the second from updated weights and statistics), in the input's memory
    format."""
    ref, fus, (c, H, W) = _pair(name, device)
    x = _x(3, c, H, W, device, cl=cl)
    with triton_ran("_bn_stats_partial_kernel", "_bn_act_fwd_kernel", "_bn_act_bwd_apply_kernel"):
        y = compare_blocks(ref, fus, x, steps=2)
    fmt = torch.channels_last if cl else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("name", ["basic-stride2-proj", "bottleneck-avgdown", "preact-bottleneck-proj"])
def test_block_eval(device, name):
    ref, fus, (c, H, W) = _pair(name, device)
    ref.eval(), fus.eval()
    with triton_ran("_bn_act_fwd_kernel", "_bn_act_bwd_apply_kernel"):
        compare_blocks(ref, fus, _x(3, c, H, W, device), steps=2)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_frozen_bn_inside_training_block_and_bn_options(device):
    """Each BN follows its own flags: a frozen bn.eval() with requires_grad False, momentum
    None (cumulative average), affine=False, track_running_stats=False, its own eps."""
    ref, fus, (c, H, W) = _pair("bottleneck-proj", device)
    for blk in (ref, fus):
        blk.bn1.eval()
        blk.bn1.weight.requires_grad_(False)
        blk.bn1.bias.requires_grad_(False)
        blk.bn2.momentum = None
        blk.bn3.eps = 1e-3
        blk.downsample[1].momentum = 0.5
    ref.bn2 = nn.BatchNorm2d(ref.bn2.num_features, momentum=None).to(device)
    fus.bn2 = copy.deepcopy(ref.bn2)
    ref.downsample[1] = nn.BatchNorm2d(40, affine=False).to(device)
    fus.downsample[1] = copy.deepcopy(ref.downsample[1])
    ref.bn3 = nn.BatchNorm2d(40, track_running_stats=False).to(device)
    fus.bn3 = copy.deepcopy(ref.bn3)
    compare_blocks(ref, fus, _x(3, c, H, W, device), steps=3)
    assert fus.bn2.num_batches_tracked.item() == 3
    assert fus.bn1.num_batches_tracked.item() == 0


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
def test_train_mode_without_grad_updates_stats(device, ctx):
    ref, fus, (c, H, W) = _pair("basic-stride2-proj", device)
    x = _x(3, c, H, W, device)
    mgr = torch.no_grad if ctx == "no_grad" else torch.inference_mode
    with mgr():
        yr, yf = ref(x), fus(x)
    assert_close_fp32(yf, yr, "output")
    for (n, br), (_, bf) in zip(ref.named_buffers(), fus.named_buffers()):
        assert_close_fp32(bf.float(), br.float(), n)
    assert fus.bn1.num_batches_tracked.item() == 1


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_zero_size_batch(device):
    ref, fus, (c, H, W) = _pair("basic-stride2-proj", device)
    x = torch.randn(0, c, H, W, device=device, requires_grad=True)
    before = copy.deepcopy(fus.state_dict())
    yr, yf = ref(x), fus(x)
    assert yf.shape == yr.shape and yf.numel() == 0
    yf.sum().backward()
    for k, v in fus.state_dict().items():
        if k.endswith("num_batches_tracked"):
            assert v.item() == before[k].item() + 1
        else:
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("name", ["basic-identity", "bottleneck-avgdown", "preact-stride2-proj"])
def test_recompute_same_gradients(device, name):
    ref, fus, (c, H, W) = _pair(name, device)
    fus.recompute = True
    compare_blocks(ref, fus, _x(3, c, H, W, device), steps=2)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("name", ["bottleneck-proj", "preact-identity"])
def test_stochastic_depth(device, name):
    ref, fus, (c, H, W) = _pair(name, device)
    ref.drop_path_rate = fus.drop_path_rate = 0.5
    compare_blocks(ref, fus, _x(4, c, H, W, device), steps=2)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["basic-stride2-proj", "bottleneck-avgdown", "preact-identity"])
def test_low_precision_module(device, dtype, name):
    """A block made all-bf16/fp16 by .to(dtype): error against fp64 at most twice PyTorch's."""
    ref, fus, (c, H, W) = _pair(name, device)
    exact = copy.deepcopy(ref).double()
    ref, fus = ref.to(dtype), fus.to(dtype)
    x = _x(3, c, H, W, device)
    xs = [x.double().requires_grad_(), x.to(dtype).requires_grad_(), x.to(dtype).requires_grad_()]
    outs = [m(xi) for m, xi in zip((exact, ref, fus), xs)]
    g = torch.randn_like(outs[0])
    for o in outs:
        (o * g.to(o.dtype)).sum().backward()
    assert outs[2].dtype == dtype
    assert_low_precision(outs[2], outs[1], outs[0], dtype, "output")
    assert_low_precision(xs[2].grad, xs[1].grad, xs[0].grad, dtype, "x.grad")
    for (n, pe), (_, pr), (_, pf) in zip(exact.named_parameters(), ref.named_parameters(),
                                         fus.named_parameters()):
        assert_low_precision(pf.grad, pr.grad, pe.grad, dtype, f"{n}.grad", relu_flip_slack(n, g))
    for (n, be), (_, br), (_, bf) in zip(exact.named_buffers(), ref.named_buffers(),
                                         fus.named_buffers()):
        assert bf.dtype == br.dtype
        if be.dtype != torch.long:
            assert_low_precision(bf, br, be, dtype, n)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("name", ["basic-stride2-proj", "preact-bottleneck-proj"])
def test_autocast(device, name):
    """Under autocast the block casts x and the conv weights itself; BN parameters and
    buffers stay fp32; the result matches eager under the same autocast."""
    dtype = torch.bfloat16
    ref, fus, (c, H, W) = _pair(name, device)
    exact = copy.deepcopy(ref).double()
    x = _x(3, c, H, W, device)
    xe = x.double().requires_grad_()
    ye = exact(xe)
    g = torch.randn_like(ye)
    (ye * g).sum().backward()
    res = []
    for m in (ref, fus):
        xi = x.clone().requires_grad_()
        with torch.autocast(device_type=device, dtype=dtype):
            y = m(xi)
        (y.float() * g.float()).sum().backward()
        res.append((y, xi.grad))
    (yr, gr), (yf, gf) = res
    assert yf.dtype == yr.dtype
    assert fus.bn1.running_mean.dtype == torch.float32 and fus.bn1.weight.grad.dtype == torch.float32
    assert_low_precision(yf, yr, ye, dtype, "output")
    assert_low_precision(gf, gr, xe.grad, dtype, "x.grad")
    for (n, pe), (_, pr), (_, pf) in zip(exact.named_parameters(), ref.named_parameters(),
                                         fus.named_parameters()):
        assert_low_precision(pf.grad, pr.grad, pe.grad, dtype, f"{n}.grad", relu_flip_slack(n, g))
    for (n, br), (_, bf) in zip(ref.named_buffers(), fus.named_buffers()):
        if br.dtype != torch.long:
            torch.testing.assert_close(bf, br, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("name", ["basic-stride2-proj", "bottleneck-avgdown", "preact-identity"])
def test_gradcheck_fp64(device, name):
    """fp64 storage computes in fp64 inside the kernels, so gradcheck runs through them."""
    kind, c_in, planes, stride, groups, bw, dil, avg, _, _ = BLOCKS[name]
    c_small = 4
    planes_small = {"basic": 8, "bottleneck": 2, "preact": 4, "preact_bottleneck": 2}[kind]
    _, fus = make_pair(kind, c_small, planes_small, stride, 1, 64, 1, avg, device)
    fus = fus.double()
    params = [p for p in fus.parameters()]
    names = [n for n, _ in fus.named_parameters()]
    x = torch.randn(2, c_small, 5, 4, device=device, dtype=torch.float64, requires_grad=True)

    def run(x, *ps):
        sd = {n: p for n, p in zip(names, ps)}
        return torch.func.functional_call(fus, sd, (x,))

    with triton_ran("_bn_act_bwd_apply_kernel"):
        assert torch.autograd.gradcheck(run, (x, *params), fast_mode=True, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("preact", [False, True])
def test_plain_form_without_skip(device, preact):
    """skip=False: the block without its shortcut (the plain networks of the degradation
    experiment), through the epilogue's no-skip path."""
    import torch.nn.functional as F
    from fusedres import fused_residual_block
    ref, fus, (c, H, W) = _pair("preact-identity" if preact else "basic-identity", device)

    def plain(m, x):
        if preact:
            return m.conv2(F.relu(m.bn2(m.conv1(F.relu(m.bn1(x))))))
        return F.relu(m.bn2(m.conv2(F.relu(m.bn1(m.conv1(x))))))

    class Plain(nn.Module):
        def __init__(self, m, fused):
            super().__init__()
            self.m, self.fused = m, fused

        def forward(self, x):
            if not self.fused:
                return plain(self.m, x)
            return fused_residual_block(x, [self.m.conv1, self.m.conv2], [self.m.bn1, self.m.bn2],
                                        preact=preact, skip=False)

    with triton_ran("_bn_act_fwd_kernel", "_bn_act_bwd_apply_kernel"):
        compare_blocks(Plain(ref, False), Plain(fus, True), _x(3, c, H, W, device), steps=2)
    with pytest.raises(ValueError, match=r"\(the plain form\) takes no downsample"):
        fused_residual_block(_x(2, c, H, W, device), [fus.conv1, fus.conv2], [fus.bn1, fus.bn2],
                             downsample=(0, fus.conv1, None), skip=False)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_double_backward_raises(device):
    _, fus, (c, H, W) = _pair("basic-identity", device)
    x = _x(2, c, H, W, device).requires_grad_()
    y = fus(x)
    v = torch.randn_like(y, requires_grad=True)
    (gx,) = torch.autograd.grad(y, x, grad_outputs=v, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked "
                                           "with @once_differentiable"):
        gx.sum().backward()


# ---------------------------------------------------------------------------------------
# Bad input: checked before any kernel runs, running statistics untouched
# ---------------------------------------------------------------------------------------


def _untouched(block, fn, exc, match):
    before = copy.deepcopy(block.state_dict())
    with pytest.raises(exc, match=match):
        fn()
    for k, v in block.state_dict().items():
        if v.device.type != "meta":
            assert torch.equal(v, before[k]), f"{k} changed by a failed call"


def test_bad_inputs():
    _, fus, (c, H, W) = _pair("bottleneck-proj", "cpu")
    _untouched(fus, lambda: fus(torch.randn(c, H, W)), ValueError, "4-D")
    _untouched(fus, lambda: fus(torch.randn(2, c + 1, H, W)), ValueError, "input channels")
    _untouched(fus, lambda: fus(torch.randint(0, 3, (2, c, H, W))), TypeError, "float16, bfloat16")
    _untouched(fus, lambda: fus(torch.ones(2, c, H, W, dtype=torch.bool)), TypeError, "dtype|float")
    _untouched(fus, lambda: fus(torch.randn(2, c, H, W, dtype=torch.float16)), TypeError,
               r"convs\[0\].weight must have dtype torch.float16")
    _untouched(fus, lambda: fus([1, 2]), (TypeError, AttributeError), "")
    # one value per channel in training: PyTorch's own message, before any statistics move
    blk = fusedres.FusedBasicBlock(4, 8, stride=2, downsample=fusedres.reference.projection(4, 8, 2))
    _untouched(blk, lambda: blk(torch.randn(1, 4, 2, 2)), ValueError,
               r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 8, 1, 1\]\)")
    with torch.no_grad():
        blk.eval()(torch.randn(1, 4, 2, 2))  # eval mode needs no batch statistics


def test_device_mismatch():
    _, fus, (c, H, W) = _pair("basic-identity", "cpu")
    fus.conv2.to("meta")
    _untouched(fus, lambda: fus(torch.randn(2, c, H, W)), ValueError, r"convs\[1\].weight must be on cpu")
    _, fus, _ = _pair("basic-identity", "cpu")
    fus.bn2.to("meta")
    _untouched(fus, lambda: fus(torch.randn(2, c, H, W)), ValueError, r"norms\[1\].weight must be on cpu")


def test_bn_param_dtype_mix_rejected():
    _, fus, (c, H, W) = _pair("basic-identity", "cpu")
    fus.bn1.double()
    _untouched(fus, lambda: fus(torch.randn(2, c, H, W)), TypeError, r"norms\[0\].weight must have dtype")


def test_backend_selection(monkeypatch):
    from fusedres.backend import backend_for
    monkeypatch.setenv("FUSEDRES_BACKEND", "reference")
    assert backend_for(torch.device("cpu")) == "reference"
    with fusedres.use_backend("reference"):
        assert backend_for(torch.device("cuda")) == "reference"
    monkeypatch.setenv("FUSEDRES_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FUSEDRES_BACKEND"):
        backend_for(torch.device("cpu"))
    with pytest.raises(ValueError, match="use_backend"):
        with fusedres.use_backend("cuda"):
            pass
    monkeypatch.delenv("FUSEDRES_BACKEND")
    assert backend_for(torch.device("cuda")) == "triton"


def test_reference_backend_runs_no_kernel():
    """Without the interpreter, CPU tensors take the reference path (and still match)."""
    from fusedres.kernels import LAUNCHES
    ref, fus, (c, H, W) = _pair("basic-stride2-proj", "cpu")
    before = sum(LAUNCHES.values())
    with fusedres.use_backend("reference"):
        compare_blocks(ref, fus, _x(3, c, H, W, "cpu"), steps=1)
    assert sum(LAUNCHES.values()) == before
