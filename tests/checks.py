"""Shared test helpers: devices, tolerances, launch counting, block pairs."""
from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch

import fusedres
from fusedres import reference as R

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()

# Devices on which the Triton kernels themselves run: CPU tensors under the interpreter,
# CUDA tensors when a GPU is present. Anything else would be reference against reference.
TRITON_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]),
]

if HAS_CUDA:  # compare like with like: no TF32 in the fp32 convolutions of either side
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@contextlib.contextmanager
def triton_ran(*names: str):
    """Fail unless each named kernel launched inside the block (proves the Triton path ran)."""
    from fusedres.kernels import LAUNCHES
    before = dict(LAUNCHES)
    yield
    for n in names or ("_bn_stats_partial_kernel", "_bn_act_fwd_kernel"):
        assert LAUNCHES[n] > before.get(n, 0), f"kernel {n} did not run"


def assert_close_fp32(actual, expected, name=""):
    """fp32: rtol 1e-4, atol 1e-5 * max|ref| (the issue's tolerance)."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * max(scale, 1e-30),
                               equal_nan=True, msg=lambda m: f"{name}: {m}")


def ulp(x: float, dtype: torch.dtype) -> float:
    """One unit in the last place of |x| in ``dtype``."""
    return float(torch.finfo(dtype).eps) * max(abs(x), float(torch.finfo(dtype).tiny))


def assert_low_precision(actual, torch_own, exact, dtype, name="", slack=0.0):
    """bf16/fp16 (flash-attention's rule): the fused error against an fp64 reference is at
    most twice PyTorch's own error in that dtype, plus one ulp of max|ref| (the interpreter
    rounds fp32 to bf16 by truncation), plus ``slack`` where a single rounding decision
    legitimately moves the result (see relu_flip_slack)."""
    exact = exact.double()
    err = (actual.double() - exact).abs().max().item()
    own = (torch_own.double() - exact).abs().max().item()
    bound = 2 * own + ulp(exact.abs().max().item(), dtype) + slack
    assert err <= bound, f"{name}: fused error {err:.3g} > 2*torch's {own:.3g} + 1 ulp = {bound:.3g}"


def relu_flip_slack(name: str, upstream: torch.Tensor) -> float:
    """A BN parameter gradient sums g over the elements a ReLU lets through. A pre-activation
    within rounding of zero goes either way in fp16/bf16, whoever computes it (over 30 seeds
    PyTorch and fusedres flip equally often against fp64), and one flip moves dbeta by one
    gradient element and dgamma by that times |xhat| (< 5 here). Allow one such flip."""
    if "bn" in name or "downsample.1" in name:
        return 5.0 * upstream.abs().max().item()
    return 0.0


def make_pair(kind: str, c_in: int, planes: int, stride: int = 1, groups: int = 1,
              base_width: int = 64, dilation: int = 1, avg_down: bool = False,
              device="cpu", seed: int = 0):
    """(reference block, fused block) with the same weights; BN affine params randomised so
    that gradients of every parameter are non-trivial."""
    torch.manual_seed(seed)
    if kind == "basic":
        out = planes
        ds = R.projection(c_in, out, stride, avg_down) if stride != 1 or c_in != out else None
        ref = R.BasicBlock(c_in, planes, stride, ds)
        fus = fusedres.FusedBasicBlock(c_in, planes, stride, copy.deepcopy(ds))
    elif kind == "bottleneck":
        out = planes * 4
        ds = R.projection(c_in, out, stride, avg_down) if stride != 1 or c_in != out else None
        ref = R.Bottleneck(c_in, planes, stride, ds, groups, base_width, dilation)
        fus = fusedres.FusedBottleneck(c_in, planes, stride, copy.deepcopy(ds), groups,
                                       base_width, dilation)
    elif kind == "preact":
        ref = R.PreActBasicBlock(c_in, planes, stride)
        fus = fusedres.FusedPreActBlock(c_in, planes, stride)
    elif kind == "preact_bottleneck":
        ref = R.PreActBottleneck(c_in, planes, stride)
        fus = fusedres.FusedPreActBottleneck(c_in, planes, stride)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    fus.load_state_dict(ref.state_dict())
    return ref.to(device), fus.to(device)


def compare_blocks(ref, fus, x, check=assert_close_fp32, steps: int = 1, lr: float = 0.1):
    """Run both blocks ``steps`` times (forward, backward, SGD step) on x and a fixed
    upstream gradient; compare outputs, x.grad, every parameter grad, every buffer."""
    g = torch.randn_like(_shape_probe(ref, x))
    opt_r = torch.optim.SGD(ref.parameters(), lr=lr)
    opt_f = torch.optim.SGD(fus.parameters(), lr=lr)
    for step in range(steps):
        xr = x.clone().requires_grad_()
        xf = x.clone().requires_grad_()
        torch.manual_seed(1000 + step)  # stochastic depth draws alike on both sides
        yr = ref(xr)
        torch.manual_seed(1000 + step)
        yf = fus(xf)
        assert yf.shape == yr.shape and yf.dtype == yr.dtype
        check(yf, yr, f"output step {step}")
        (yr * g).sum().backward()
        (yf * g).sum().backward()
        check(xf.grad, xr.grad, f"x.grad step {step}")
        for (n, pr), (_, pf) in zip(ref.named_parameters(), fus.named_parameters()):
            if pr.grad is None:
                assert pf.grad is None, n
                continue
            check(pf.grad, pr.grad, f"{n}.grad step {step}")
        opt_r.step(); opt_f.step()
        opt_r.zero_grad(); opt_f.zero_grad()
        for (n, br), (_, bf) in zip(ref.named_buffers(), fus.named_buffers()):
            if br.dtype == torch.long:
                assert torch.equal(br, bf), n
            else:
                check(bf, br, f"{n} step {step}")
    return yf


def _shape_probe(block, x):
    """Output shape of ``block`` on x, without touching its running statistics."""
    with torch.no_grad():
        state = copy.deepcopy(block.state_dict())
        y = block(x)
        block.load_state_dict(state)
    return y


def assert_compiles_like_eager(eager, x):
    """torch.compile(fullgraph=True, backend="aot_eager") of a copy of ``eager`` against
    ``eager`` itself: train-mode output, every parameter gradient, eval output (fp32
    tolerances: the same kernels, traced), and no graph break on the way."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    outs = []
    for m in (compiled, eager):
        outs.append(m(x))
        outs[-1].square().mean().backward()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    for (name, pc), pe in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5 * pe.grad.abs().max().item(),
                                   msg=lambda m, n=name: f"{n}.grad: {m}")
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), eager.eval()(x), rtol=1e-4, atol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])


def assert_jvp_and_vmap_match(block, ref_block, x):
    """Forward AD (torch.func.jvp) and vmap of a fused block in eval mode against its plain
    twin, fp64 at 1e-9; returns the plain block's output."""
    t = torch.randn_like(x)
    ref_block.eval(), block.eval()
    y_r, dy_r = torch.func.jvp(ref_block, (x,), (t,))
    y_f, dy_f = torch.func.jvp(block, (x,), (t,))
    torch.testing.assert_close(y_f, y_r, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dy_f, dy_r, rtol=1e-9, atol=1e-9)
    xs = torch.randn(3, *x.shape, dtype=x.dtype)
    torch.testing.assert_close(torch.func.vmap(block)(xs), torch.func.vmap(ref_block)(xs),
                               rtol=1e-9, atol=1e-9)
    return y_r


def pairwise_layouts(rows, dtypes):
    """``(*row, dtype, cl)`` parameters: every row with every dtype, channels_last
    alternating over both, so that each pair of (row, dtype, layout) values occurs: pairwise
    coverage of the three axes at half of their full product (a layout bug shows with any
    dtype and row). Rows are tuples of parameter values, or single values."""
    out = []
    for i, row in enumerate(rows):
        row = row if isinstance(row, tuple) else (row,)
        for j, dtype in enumerate(dtypes):
            cl = (i + j) % 2 == 1
            name = "-".join(map(str, ("cl" if cl else "nchw", dtype, *row)))
            out.append(pytest.param(*row, dtype, cl, id=name))
    return out
