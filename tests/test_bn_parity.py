"""nn.BatchNorm2d parity: PyTorch's own batch-norm tests, re-expressed against the fused paths.

Sources: test/test_nn.py (test_BatchNorm_empty, test_batchnorm_raises_error_if_*,
test_batchnorm_update_stats, test_batchnorm_simple_average, test_batchnorm_eval,
test_batchnorm_nhwc, test_batchnorm_buffer_update_when_stats_are_not_tracked) and the
module database behind test_modules.py (torch/testing/_internal/common_modules.py:
module_inputs_torch_nn_BatchNorm2d's constructor variants and inputs,
module_error_inputs_torch_nn_BatchNorm1d_2d_3d's eps errors). Each runs through three entry
points against nn.BatchNorm2d on the same inputs and state:

- ``fused_batch_norm(x, bn)``;
- ``FusedSyncBatchNorm`` (on one process nn.SyncBatchNorm's fallback, which fusedres
  checks and guards; its fused path needs two ranks: one small gloo test at the end);
- a converted block (fusedres.convert of a plain BasicBlock) whose norms are the variant,
  against the plain block.

fp32 and fp64 compare elementwise; fp16/bf16 use the project's rule (checks.py
assert_low_precision: the fused error against fp64 at most twice PyTorch's own).
Deliberate differences from nn.BatchNorm2d are tested as such (test names say
``difference``); the README's batch-norm paragraph lists them.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import fusedres
from checks import (HAS_CUDA, INTERPRET, assert_close_fp32, assert_low_precision,
                    relu_flip_slack, triton_ran)
from fusedres import reference as R
from fusedres.errors import ShapeError

DEVICE = "cuda" if HAS_CUDA else "cpu"
LOW = (torch.float16, torch.bfloat16)
ONCE = "once-differentiable"

# module_inputs_torch_nn_BatchNorm2d's constructor variants (num_features 3)
VARIANTS = {
    "default": {},
    "2d_simple_average": dict(eps=1e-3, momentum=None),
    "momentum": dict(eps=1e-3, momentum=0.8),
    "not_affine": dict(eps=1e-3, momentum=0.8, affine=False),
    "not_tracking_stats": dict(eps=1e-3, momentum=0.8, track_running_stats=False),
    "affine_not_bias": dict(bias=False),
}
ENTRIES = ("fused_batch_norm", "FusedSyncBatchNorm", "block")


class _FBN(nn.Module):
    """fused_batch_norm over a held norm, so that every entry point is a module."""

    def __init__(self, bn: nn.Module):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        return fusedres.fused_batch_norm(x, self.bn)


def _bn(c: int, kw: dict) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c, **kw)
    with torch.no_grad():  # non-trivial state, as in checks.make_pair
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 1.5)
        if bn.bias is not None:
            bn.bias.uniform_(-0.5, 0.5)
        if bn.running_mean is not None:
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return bn


def make(entry: str, c: int = 3, seed: int = 0, **kw):
    """(reference module, fused module) with the same state: a norm (fused through
    ``entry``) or, for ``block``, a BasicBlock whose norms take ``kw``."""
    torch.manual_seed(seed)
    if entry == "block":
        ref = R.BasicBlock(c, c)
        ref.bn1, ref.bn2 = _bn(c, kw), _bn(c, kw)
        fus = fusedres.convert(copy.deepcopy(ref))
        assert isinstance(fus, fusedres.FusedBasicBlock)
        return ref.to(DEVICE), fus.to(DEVICE)
    ref = _bn(c, kw)
    if entry == "fused_batch_norm":
        fus = _FBN(copy.deepcopy(ref))
    else:
        fus = fusedres.FusedSyncBatchNorm(c, **kw)
        fus.load_state_dict(ref.state_dict())
    return ref.to(DEVICE), fus.to(DEVICE)


def norms_of(m: nn.Module):
    return [n for n in m.modules() if isinstance(n, nn.modules.batchnorm._BatchNorm)]


def _x(shape, dtype=torch.float32, channels_last=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def run(module: nn.Module, x: torch.Tensor, g: torch.Tensor, steps: int = 2) -> dict:
    """Forward and backward ``steps`` times: every output, gradient and buffer, by name."""
    out = {}
    for s in range(steps):
        xi = x.detach().clone().requires_grad_()
        y = module(xi)
        y.backward(g.to(y.dtype))
        out[f"y{s}"] = y.detach()
        out[f"x.grad{s}"] = xi.grad
        for n, p in module.named_parameters():
            out[f"{n}.grad{s}"] = None if p.grad is None else p.grad.clone()
            p.grad = None
        for n, b in module.named_buffers():
            out[f"{n}{s}"] = b.clone()
    return out


def _plain_names(d: dict) -> dict:
    """_FBN's names without its ``bn.`` prefix (the state of one norm)."""
    return {k[3:] if k.startswith("bn.") else k: v for k, v in d.items()}


def compare(ref, fus, x, block=False):
    """Run both (and, in fp16/bf16, the reference in fp64); check every result."""
    g = _x(x.shape, seed=2)
    steps = 1 if block else 2  # a block: one step (the norms' second step is tested alone)
    got, want = _plain_names(run(fus, x, g, steps)), _plain_names(run(ref, x, g, steps))
    assert got.keys() == want.keys()
    exact = None
    if x.dtype in LOW:
        exact = _plain_names(run(copy.deepcopy(ref).double(), x.double(), g, steps))
    for k, w in want.items():
        a = got[k]
        if w is None:
            assert a is None, k
            continue
        assert a.shape == w.shape and a.dtype == w.dtype, (k, a.dtype, w.dtype)
        if k.startswith("y"):  # the output keeps the input's memory format, as PyTorch's
            cl = torch.channels_last
            assert a.is_contiguous(memory_format=cl) == w.is_contiguous(memory_format=cl), k
        if w.dtype == torch.long:
            assert torch.equal(a, w), k
        elif exact is not None:
            assert_low_precision(a, w, exact[k], x.dtype, k,
                                 relu_flip_slack(k, g) if block else 0.0)
        elif w.dtype == torch.float64:
            torch.testing.assert_close(a, w, msg=lambda m: f"{k}: {m}")
        else:
            assert_close_fp32(a, w, k)


# --------------------------------------------------------------------------------------
# module_db's inputs: every variant, train and eval, every dtype, both layouts
# --------------------------------------------------------------------------------------


def _fbn_case(variant, training, dtype, layout):
    ref, fus = make("fused_batch_norm", **VARIANTS[variant])
    x_dtype = dtype
    if dtype == "bf16_x_fp32_params":  # test_batchnorm_2D_*'s mixed types
        x_dtype = torch.bfloat16
    else:
        ref.to(dtype), fus.to(dtype)
    ref.train(training), fus.train(training)
    x = _x((2, 3, 6, 6), x_dtype, layout == "channels_last")
    with triton_ran("_bn_act_fwd_kernel") if INTERPRET else _nothing():
        compare(ref, fus, x)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_batch_norm_module_db(variant, training, layout):
    _fbn_case(variant, training, torch.float32, layout)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16,
                                   "bf16_x_fp32_params"],
                         ids=["fp64", "fp16", "bf16", "bf16_x_fp32_params"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", ["default", "not_affine"])
def test_fused_batch_norm_dtypes(variant, training, dtype, layout):
    _fbn_case(variant, training, dtype, layout)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sync_batch_norm_module_db(variant, training):
    ref, fus = make("FusedSyncBatchNorm", **VARIANTS[variant])
    ref.train(training), fus.train(training)
    compare(ref, fus, _x((2, 3, 6, 6)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_block_module_db(variant, training):
    ref, fus = make("block", c=4, **VARIANTS[variant])
    ref.train(training), fus.train(training)
    compare(ref, fus, _x((2, 4, 4, 4)), block=True)


@pytest.mark.parametrize("training,dtype,layout", [
    (True, torch.bfloat16, "channels_last"), (False, torch.bfloat16, "nchw"),
    (True, torch.float64, "nchw"), (False, torch.float64, "channels_last")])
def test_block_dtypes_and_layouts(training, dtype, layout):
    ref, fus = make("block", c=4)
    ref.to(dtype).train(training), fus.to(dtype).train(training)
    compare(ref, fus, _x((2, 4, 4, 4), dtype, layout == "channels_last"), block=True)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# --------------------------------------------------------------------------------------
# zero batch (module_db's zero_batch, test_BatchNorm_empty)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["fused_batch_norm", "FusedSyncBatchNorm"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zero_batch(entry, training):
    ref, fus = make(entry, 5, eps=1e-3, momentum=0.3, affine=False)
    ref.train(training), fus.train(training)
    compare(ref, fus, _x((0, 5, 2, 2)))


@pytest.mark.parametrize("entry", ["fused_batch_norm", "FusedSyncBatchNorm"])
def test_batchnorm_empty_float64_input_float32_params(entry):
    """test_BatchNorm_empty: a float64 empty batch through a float32 norm (issue 16, item 6:
    fused_batch_norm raised TypeError)."""
    bn = nn.BatchNorm2d(3) if entry == "fused_batch_norm" else fusedres.FusedSyncBatchNorm(3)
    mod = (_FBN(bn) if entry == "fused_batch_norm" else bn).to(DEVICE)
    x = torch.randn(0, 3, 2, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = mod(x)
    y.backward(torch.rand_like(y))
    assert y.shape == x.shape and y.dtype == torch.float64
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(bn.running_mean, torch.zeros(3, device=DEVICE))
    assert torch.equal(bn.running_var, torch.ones(3, device=DEVICE))
    assert torch.equal(bn.weight.grad, torch.zeros(3, device=DEVICE))
    assert torch.equal(bn.bias.grad, torch.zeros(3, device=DEVICE))
    assert bn.weight.grad.dtype == torch.float32
    assert bn.num_batches_tracked.item() == 1  # counted, as nn.BatchNorm2d does


# --------------------------------------------------------------------------------------
# running statistics (test_batchnorm_update_stats, _simple_average, _buffer_update...)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
def test_eval_uses_buffers_after_tracking_is_switched_off(entry):
    """Issue 16, item 1: track_running_stats=False set after construction keeps the
    buffers, and eval normalises with them (nn.BatchNorm2d's bn_training rule)."""
    c = 4 if entry == "block" else 3
    ref, fus = make(entry, c)
    for m in (ref, fus):
        for n in norms_of(m):
            n.track_running_stats = False
        m.eval()
    compare(ref, fus, _x((2, c, 4, 4)), block=entry == "block")
    # and training then normalises with batch statistics and leaves the buffers alone
    ref.train(), fus.train()
    compare(ref, fus, _x((2, c, 4, 4), seed=3), block=entry == "block")


@pytest.mark.parametrize("entry", ["fused_batch_norm", "FusedSyncBatchNorm"])
def test_batchnorm_update_stats_and_eval(entry):
    """test_batchnorm_update_stats: training counts and updates, eval changes nothing."""
    ref, fus = make(entry, 3)
    x = _x((2, 3, 4, 4))
    for m in (ref, fus):
        m(x)
        m(x)
    bn = fus.bn if entry == "fused_batch_norm" else fus
    assert bn.num_batches_tracked.item() == 2
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    before = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    fus.eval()
    fus(x)
    for a, b in zip(before, (bn.running_mean, bn.running_var, bn.num_batches_tracked)):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# error inputs
# --------------------------------------------------------------------------------------


def _state(m: nn.Module):
    return [b.clone() for b in m.buffers()]


def _unchanged(m: nn.Module, before) -> None:
    for a, b in zip(before, m.buffers()):
        assert torch.equal(a, b), "a failed call changed a buffer"


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("field", ["weight", "bias", "running_mean", "running_var"])
def test_wrong_size_raises_shape_error(entry, field):
    """test_batchnorm_raises_error_if_{field}_is_not_same_size_as_input (issue 16, item 2):
    PyTorch raises RuntimeError, fusedres ShapeError, which is a RuntimeError and a
    ValueError, naming the argument, the expected and the actual shape."""
    c = 4 if entry == "block" else 3
    ref, fus = make(entry, c)
    for m in (ref, fus):
        bn = norms_of(m)[0]
        (bn._parameters if field in ("weight", "bias") else bn._buffers)[field] = \
            torch.ones(c + 1, device=DEVICE)
    x = _x((2, c, 4, 4))
    with pytest.raises(RuntimeError):
        ref(x)
    before = _state(fus)
    with pytest.raises(ShapeError, match=rf"{field} must have shape \({c},\).*got \({c + 1},\)") as e:
        fus(x)
    assert isinstance(e.value, RuntimeError) and isinstance(e.value, ValueError)
    _unchanged(fus, before)


@pytest.mark.parametrize("entry", ENTRIES)
def test_one_value_per_channel_in_training(entry):
    """test_batchnorm_raises_error_if_less_than_one_value_per_channel: PyTorch's ValueError
    and message. Difference (issue 16, item 7): nn.BatchNorm2d counts the batch in
    num_batches_tracked before it raises; every fused path leaves it alone."""
    c = 4 if entry == "block" else 3
    ref, fus = make(entry, c)
    x = _x((1, c, 1, 1))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ref(x)
    assert norms_of(ref)[0].num_batches_tracked.item() == 1  # PyTorch counted it
    before = _state(fus)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        fus(x)
    _unchanged(fus, before)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("eps,training,message", [
    (-1.0, True, "eps must be positive during training, but got -1.0"),
    (0.0, True, "eps must be positive during training, but got 0.0"),
    (-1.0, False, "eps must be non-negative, but got -1.0"),
])
def test_eps_errors(entry, eps, training, message):
    """module_error_inputs_torch_nn_BatchNorm1d_2d_3d, and F.batch_norm's eval check (issue
    16, item 3): PyTorch's ValueError and message; the fused paths leave every buffer
    alone (the difference above)."""
    c = 4 if entry == "block" else 3
    ref, fus = make(entry, c, eps=eps)
    ref.train(training), fus.train(training)
    x = _x((2, c, 4, 4))
    with pytest.raises(ValueError, match=message):
        ref(x)
    before = _state(fus)
    with pytest.raises(ValueError, match=message):
        fus(x)
    _unchanged(fus, before)


@pytest.mark.parametrize("entry", ENTRIES)
def test_eps_zero_in_eval_is_accepted(entry):
    c = 4 if entry == "block" else 3
    ref, fus = make(entry, c, eps=0.0)
    ref.eval(), fus.eval()
    compare(ref, fus, _x((2, c, 4, 4)), block=entry == "block")


@pytest.mark.parametrize("entry", ["fused_batch_norm", "block"])
def test_difference_mixed_dtypes_raise_type_error(entry):
    """Difference: float64 activations through float32 parameters (a non-empty batch)
    raise TypeError naming the tensor; PyTorch raises RuntimeError ("mixed dtype")."""
    c = 4 if entry == "block" else 3
    ref, fus = make(entry, c)
    for n in norms_of(ref) + norms_of(fus):
        n.double()
    if entry == "block":
        ref.conv1.double(), ref.conv2.double(), fus.conv1.double(), fus.conv2.double()
        for n in norms_of(ref)[:1] + norms_of(fus)[:1]:
            n.float()
    else:
        ref.float(), fus.float()
    x = _x((2, c, 4, 4), torch.float64)
    with pytest.raises(RuntimeError):
        ref(x)
    with pytest.raises(TypeError, match="must have dtype torch.float64"):
        fus(x)


# --------------------------------------------------------------------------------------
# forward-mode AD and vmap (issue 16, item 4)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jvp_matches_pytorch(entry, training):
    c = 4 if entry == "block" else 3
    ref, fus = make(entry, c)
    ref.double().train(training), fus.double().train(training)
    x, t = _x((2, c, 3, 3), torch.float64), _x((2, c, 3, 3), torch.float64, seed=5)
    if training:  # torch.func.jvp refuses the in-place update of a captured buffer
        with pytest.raises(RuntimeError) as want:
            torch.func.jvp(ref, (x,), (t,))
        before = _state(fus)
        with pytest.raises(RuntimeError) as got:
            torch.func.jvp(fus, (x,), (t,))
        assert str(got.value) == str(want.value)
        _unchanged(fus, before)
    else:
        yr, jr = torch.func.jvp(ref, (x,), (t,))
        yf, jf = torch.func.jvp(fus, (x,), (t,))
        torch.testing.assert_close(yf, yr)
        torch.testing.assert_close(jf, jr)
        # a reverse-mode transform: torch.func.jacrev (vmap over vjp)
        torch.testing.assert_close(torch.func.jacrev(fus)(x), torch.func.jacrev(ref)(x))
    with fwAD.dual_level():  # torch.autograd.forward_ad: training too
        yr = fwAD.unpack_dual(ref(fwAD.make_dual(x, t)))
        yf = fwAD.unpack_dual(fus(fwAD.make_dual(x, t)))
    torch.testing.assert_close(yf.primal, yr.primal)
    torch.testing.assert_close(yf.tangent, yr.tangent)
    for a, b in zip(ref.buffers(), fus.buffers()):  # the running statistics moved alike
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("entry", ENTRIES)
def test_gradcheck_forward_ad_and_batched_grad(entry):
    c = 2 if entry == "block" else 3
    ref, fus = make(entry, c)
    fus.double()
    x = _x((2, c, 2, 2), torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(fus, (x,), check_forward_ad=True, check_batched_grad=True,
                                    fast_mode=True)


@pytest.mark.parametrize("entry", ENTRIES)
def test_vmap_matches_pytorch(entry):
    """vmap over a batch of inputs: eval, and training without running statistics, give
    PyTorch's results; training with running buffers raises PyTorch's error, and (the
    difference above) leaves num_batches_tracked alone."""
    c = 4 if entry == "block" else 3
    xs = _x((3, 2, c, 3, 3))
    ref, fus = make(entry, c)
    ref.eval(), fus.eval()
    assert_close_fp32(torch.func.vmap(fus)(xs), torch.func.vmap(ref)(xs), "eval")
    ref, fus = make(entry, c, track_running_stats=False)
    assert_close_fp32(torch.func.vmap(fus)(xs), torch.func.vmap(ref)(xs), "no running stats")
    ref, fus = make(entry, c)
    with pytest.raises(RuntimeError) as want:
        torch.func.vmap(ref)(xs)
    before = _state(fus)
    with pytest.raises(RuntimeError) as got:
        torch.func.vmap(fus)(xs)
    assert str(got.value) == str(want.value)
    _unchanged(fus, before)


@pytest.mark.parametrize("entry", ["fused_batch_norm", "FusedSyncBatchNorm"])
def test_dual_running_stats_raise_pytorchs_error(entry):
    ref, fus = make(entry, 3)
    x = _x((2, 3, 3, 3))
    errors = []
    for m in (ref, fus):
        m.eval()
        bn = norms_of(m)[0]
        with fwAD.dual_level():
            bn.running_mean = fwAD.make_dual(bn.running_mean.clone(), torch.ones(3))
            with pytest.raises(RuntimeError) as e:
                m(fwAD.make_dual(x, torch.ones_like(x)))
            errors.append(str(e.value))
    assert "not differentiable wrt running_mean" in errors[0] and errors[1] == errors[0]


# --------------------------------------------------------------------------------------
# double backward (issue 16, item 5)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("g_requires_grad", [True, False])
def test_difference_double_backward_raises(entry, g_requires_grad):
    """create_graph=True: the first-order gradient is right; differentiating it again
    raises an error naming the fused block and fusedres.revert, whether or not the
    grad_output requires grad (torch's once_differentiable is silent when it does not)."""
    c = 4 if entry == "block" else 3
    ref, fus = make(entry, c)
    x = _x((2, c, 3, 3))
    g = _x((2, c, 3, 3), seed=4).requires_grad_(g_requires_grad)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    (gr,) = torch.autograd.grad(ref(xr), xr, g, create_graph=True)
    (gf,) = torch.autograd.grad(fus(xf), xf, g, create_graph=True)
    assert_close_fp32(gf.detach(), gr.detach(), "first-order dx")
    if entry == "FusedSyncBatchNorm":  # one process: nn.SyncBatchNorm's own fallback
        ((gf ** 2).sum() + (xf ** 2).sum()).backward()
        ((gr ** 2).sum() + (xr ** 2).sum()).backward()
        assert_close_fp32(xf.grad, xr.grad, "double backward")
        return
    what = "block" if entry == "block" else "batch norm"
    with pytest.raises(RuntimeError, match=rf"fused {'basic ' if entry == 'block' else ''}"
                                           rf"{what}.*{ONCE}.*fusedres\.revert\(model\)"):
        ((gf ** 2).sum() + (xf ** 2).sum()).backward()


def test_difference_gradgradcheck_raises():
    ref, fus = make("fused_batch_norm", 3)
    fus.double()
    x = _x((2, 3, 2, 2), torch.float64).requires_grad_()
    with pytest.raises(RuntimeError, match=ONCE):
        torch.autograd.gradgradcheck(fus, (x,), fast_mode=True)


# --------------------------------------------------------------------------------------
# FusedSyncBatchNorm's fused path: two gloo ranks
# --------------------------------------------------------------------------------------


def _sync_worker(rank, world):
    import torch.distributed as dist
    torch.manual_seed(0)
    full = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    mine = full[:2] if rank == 0 else full[2:]
    ref = nn.BatchNorm2d(3).double()
    fus = fusedres.FusedSyncBatchNorm(3).double()
    fus.load_state_dict(ref.state_dict())
    y = fus(mine)  # synchronised: the whole batch's statistics
    want = ref(full)
    torch.testing.assert_close(y, want[:2] if rank == 0 else want[2:])
    torch.testing.assert_close(fus.running_mean, ref.running_mean)
    # the shape and eps checks and the unchanged state hold on the fused path too
    fus.running_var = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ShapeError, match=r"running_var must have shape \(3,\)"):
        fus(mine)
    fus.running_var = ref.running_var.clone()
    fus.eps = 0.0
    n = fus.num_batches_tracked.clone()
    with pytest.raises(ValueError, match="eps must be positive during training"):
        fus(mine)
    assert torch.equal(fus.num_batches_tracked, n)
    dist.barrier()


def test_sync_batch_norm_fused_path_two_ranks():
    from test_distributed import run_ranks
    run_ranks(_sync_worker, 2)


@pytest.mark.parametrize("entry", ["fused_batch_norm", "block"])
def test_difference_second_derivative_wrt_a_parameter_raises(entry):
    """autograd.grad of the gradient with respect to x or a norm's weight alone (the paths
    a .backward() of everything would not single out) raises too, never None or zeros."""
    c = 4 if entry == "block" else 3
    _, fus = make(entry, c)
    x = _x((2, c, 3, 3)).requires_grad_()
    (gx,) = torch.autograd.grad(fus(x), x, _x((2, c, 3, 3), seed=4), create_graph=True)
    for wrt in (x, norms_of(fus)[0].weight):
        with pytest.raises(RuntimeError, match=ONCE):
            torch.autograd.grad((gx ** 2).sum(), wrt, allow_unused=True)
