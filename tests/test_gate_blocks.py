"""timm's squeeze-excite and ECA ResNets (seresnet*, seresnext*, ecaresnet*, resnetrs*),
converted.

The gate (SEModule / EcaModule on the last BN's output) runs on [N, C] inside the fused
block (fusedres.gate), riding on the epilogue's per-(sample, channel) factor. Run with
TRITON_INTERPRET=1, as test_convert.py, whose comparisons and tolerances these tests
reuse, with one block per stage and an eighth of the widths (as test_aa_blocks.py): what
is compared does not depend on them. SE's hidden width then is its minimum, 8; ECA's
kernel is 3 or 5 by stage (timm derives it from the channel count), so both occur.
Synchronised BN with a gate: tests/test_distributed.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fusedres
from checks import (INTERPRET, TRITON_DEVICES, assert_compiles_like_eager,
                    assert_jvp_and_vmap_match, triton_ran)
from fusedres.convert import why_not_fused
from fusedres.gate import GateParams, gate_backward, gate_forward, read_gate
from fusedres.modules import split_downsample
from fusedres.plan import _PLANS
from test_convert import (assert_bf16_outputs, assert_close64, assert_drop_path_matches,
                          assert_one_step_close, assert_state_close, assert_trains_like,
                          convert_quietly, randomize)

timm = pytest.importorskip("timm")
from timm.layers import EcaModule, SEModule  # noqa: E402
from timm.models.resnet import BasicBlock  # noqa: E402

ONE = [1, 1, 1, 1]
NARROW = dict(layers=ONE, channels=(8, 16, 32, 64), stem_width=8)
# BasicBlock + SE, Bottleneck + SE with groups and the avg-pool shortcut, Bottleneck + ECA
# with the tiered stem, Bottleneck + SE at rd_ratio 0.25 (ResNet-RS)
# (ResNeXt: an eighth of 32 groups of 4 would be no channel at all; 4 groups of 4 instead)
KWARGS = {"seresnext26d_32x4d": dict(cardinality=4, base_width=32)}
MODELS = {name: (lambda name=name: timm.create_model(name, **NARROW, **KWARGS.get(name, {})))
          for name in ("seresnet18", "seresnext26d_32x4d", "ecaresnet26t", "resnetrs50")}
# seresnext26d_32x4d runs the recomputed backward, the others the saved one
RECOMPUTE = {"seresnext26d_32x4d": True}
# 48x48: the last stage's batch norms see 8 values per channel, as at 64x64 (the avg-pool
# shortcuts round 3 up to 2, as the strided convs do), at half the interpreter's work
SIZE = 48


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = randomize(MODELS[name]())
    with torch.no_grad():  # the gate's biases: nonzero, so that their gradients show
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.bias is not None:
                m.bias.normal_(0.0, 0.2)
    return model


def gated_blocks(model: nn.Module) -> list:
    return [m for m in model.modules()
            if isinstance(getattr(m, "se", None), (SEModule, EcaModule)) and hasattr(m, "conv1")]


# --------------------------------------------------------------------------------------
# The gate on [N, C] against the modules themselves
# --------------------------------------------------------------------------------------

GATES = {
    "se": lambda: SEModule(16, rd_ratio=0.25),
    "se_no_bias": lambda: SEModule(16, rd_ratio=0.25, bias=False),
    "eca3": lambda: EcaModule(16),           # timm picks k = 3 for 16 channels
    "eca5": lambda: EcaModule(kernel_size=5),
}


@pytest.mark.parametrize("gate", list(GATES))
def test_gate_step_matches_the_module(gate):
    """gate_forward / gate_backward on pooled [N, C] against autograd of the module on
    [N, C, H, W]: x*g(mean_hw x) has d/dx = g*dy + (dg . x)-terms through the pool."""
    torch.manual_seed(0)
    m = GATES[gate]().double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(3, 16, 5, 4, dtype=torch.float64, requires_grad=True)
    ref = m(x)
    dy = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x, *m.parameters()], dy)
    spec, t = read_gate(m)
    p = x.detach().mean((2, 3))
    g, hidden = gate_forward(p, spec, t)
    torch.testing.assert_close(x.detach() * g[:, :, None, None], ref, rtol=0, atol=1e-13)
    dg = (dy * x.detach()).sum((2, 3))
    dp, grads = gate_backward(dg, p, g, hidden, spec, t, GateParams(True, True, True, True))
    dx = dy * g[:, :, None, None] + (dp / 20)[:, :, None, None]
    torch.testing.assert_close(dx, ref_grads[0], rtol=0, atol=1e-13)
    got = [gr for gr in grads if gr is not None]
    assert len(got) == len(ref_grads) - 1
    for a, b in zip(got, ref_grads[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_unserved_gates_are_named():
    block = MODELS["seresnet18"]().layer2[0]
    assert why_not_fused(block) is None
    c = block.se.fc1.in_channels
    block.se = SEModule(c, add_maxpool=True)
    assert "add_maxpool=True" in why_not_fused(block)
    block.se = SEModule(c, act_layer=nn.SiLU)
    assert "act SiLU, not ReLU" in why_not_fused(block)
    block.se = SEModule(c, gate_layer="hard_sigmoid")
    assert "not a sigmoid" in why_not_fused(block)
    block.se = SEModule(c, norm_layer=nn.BatchNorm2d)
    assert "norm layer (BatchNorm2d)" in why_not_fused(block)
    block.se = EcaModule(c, use_mlp=True)
    assert "MLP form" in why_not_fused(block)
    block.se = timm.layers.EffectiveSEModule(c)
    assert "neither timm's SEModule nor its EcaModule" in why_not_fused(block)
    block.se = type("OwnSE", (SEModule,), {})(c)  # a subclass may have its own forward
    assert "attention layer se (OwnSE)" in why_not_fused(block)


# --------------------------------------------------------------------------------------
# Whole models: converted against unconverted
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_gated_model_trains_like_original(name):
    """fp32 outputs and running statistics against the fp32 rule, then three fp64 SGD
    steps at 1e-9 (every gradient, every parameter and buffer) and eval outputs."""
    original = build(name)
    fused32 = convert_quietly(copy.deepcopy(original))
    assert len(fusedres.fused_blocks(fused32)) == 4
    for block in fusedres.fused_blocks(fused32):
        fused32.get_submodule(block).recompute = RECOMPUTE.get(name, False)
    assert len(gated_blocks(fused32)) == 4
    assert_trains_like(fused32, original, SIZE)


@pytest.mark.parametrize("name", ["seresnet18"])
def test_gated_model_with_stochastic_depth(name):
    """drop_path on top of the gate: the same draws (same RNG state) drop the same samples."""
    torch.manual_seed(0)
    assert_drop_path_matches(timm.create_model(name, drop_path_rate=0.3, **NARROW), SIZE)


def test_gated_aa_model():
    """seresnetaa50d: the aa step and the gate in one block, one fp64 step and eval (at
    64x64: its AvgPool2d(2) aa rounds odd sizes down, as test_aa_blocks.py explains)."""
    torch.manual_seed(0)
    original = randomize(timm.create_model("seresnetaa50d", **NARROW)).double()
    fused = convert_quietly(copy.deepcopy(original))
    assert len(fusedres.fused_blocks(fused)) == 4
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert_one_step_close(fused, original, x)
    with torch.no_grad():
        assert_close64("eval output", fused.eval()(x), original.eval()(x))


def test_gated_model_bf16_outputs():
    """bf16 (tests/checks.py's rule): the fused error against fp64 at most twice
    PyTorch's own bf16 error plus one ulp, in training and in eval."""
    original = build("seresnet18")
    assert_bf16_outputs(original, SIZE)


def test_gated_model_channels_last_and_frozen_bn():
    """channels_last activations, one fp64 step; then the last BN in eval while the block
    trains (a frozen BN: the gate pools with bn_pool, the backward has no batch sums)."""
    original = build("seresnet18").double()
    fused = convert_quietly(copy.deepcopy(original))
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fused, original = (m.to(memory_format=torch.channels_last) for m in (fused, original))
    x = x.contiguous(memory_format=torch.channels_last)
    for frozen in (False, True):
        for m in (fused, original):
            m.train()
            m.zero_grad()
            if frozen:
                for b in gated_blocks(m):
                    b.bn2.eval()
        outs = [m(x) for m in (fused, original)]
        assert_close64(f"train output, frozen={frozen}", *outs)
        for out in outs:
            out.square().mean().backward()
        assert_state_close(f"grad, frozen={frozen}", fused, original, grads=True)
        assert_state_close(f"after, frozen={frozen}", fused, original)


def test_replaced_gate_is_picked_up():
    """The plan cache (its fast check too: each step runs twice) keys on the gate module,
    its children and its parameters: a change is used on the next call."""
    original = build("seresnet18").double().eval()
    fused = convert_quietly(copy.deepcopy(original))
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    c = original.layer3[0].conv2.out_channels

    def new_fc1(m):
        m.layer3[0].se.fc1 = nn.Conv2d(c, 8, 1).double()

    def new_weight(m):
        m.layer3[0].se.fc2.weight = nn.Parameter(torch.randn(c, 8, 1, 1, dtype=torch.float64))

    def eca(m):
        m.layer3[0].se = EcaModule(c).double()

    with torch.no_grad():
        for what, change in (("as built", None), ("a new fc1", new_fc1),
                             ("a new fc2.weight", new_weight), ("ECA for SE", eca)):
            for m in (fused, original):
                if change is not None:
                    torch.manual_seed(5)
                    change(m)
            for _ in range(2):
                assert_close64(f"eval output, {what}", fused(x), original(x))
            assert _PLANS[fused.layer3[0]].hit is not None  # the second call took the fast check


def test_compiled_gated_model_matches_eager():
    eager = convert_quietly(build("seresnet18"))
    assert_compiles_like_eager(eager, torch.randn(2, 3, 32, 32,
                                                  generator=torch.Generator().manual_seed(4)))


def test_fold_for_inference_leaves_gated_blocks_unfolded():
    model = build("seresnet18").eval()
    with pytest.warns(UserWarning, match="attention layer se"):
        folded = fusedres.fold_for_inference(model)
    assert len(folded.unfolded) == 4
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_forward_ad_and_vmap_take_the_gate():
    """Forward AD and vmap run the plain modules (fusedres.parity): the gate included."""
    ref = build("seresnet18").double()
    fused = fusedres.convert(copy.deepcopy(ref))
    block, ref_block = gated_blocks(fused)[1], gated_blocks(ref)[1]
    x = torch.randn(2, block.conv1.in_channels, 8, 8, dtype=torch.float64)
    y_r = assert_jvp_and_vmap_match(block, ref_block, x)
    # a batched grad_output (vmap over the backward): parity's batched backward, gate too
    vs = torch.randn(3, *y_r.shape, dtype=torch.float64)
    grads = []
    for m in (block, ref_block):
        m.train()
        xl = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(m(xl), [xl, *m.se.parameters()], vs,
                                         is_grads_batched=True))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------
# gradcheck through the kernels: one gated block, tiny shapes
# --------------------------------------------------------------------------------------


class _GatedCall(nn.Module):
    """A timm BasicBlock's fused call with a fixed per-sample factor (stochastic depth
    without randomness, so that gradcheck sees one function)."""

    def __init__(self, block: nn.Module, factor):
        super().__init__()
        self.block, self.factor = block, factor

    def forward(self, x):
        b = self.block
        return fusedres.fused_residual_block(
            x, [b.conv1, b.conv2], [b.bn1, b.bn2], split_downsample(b.downsample),
            drop_factor=self.factor, gate=b.se)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("case", ["se-train-proj-drop", "eca-train", "eca-eval-proj-drop"])
def test_gradcheck_gated_block_fp64(device, case):
    """fp64 storage computes in fp64 inside the kernels, so gradcheck checks the SE and
    ECA backward (dg from per-sample sums, dp into BN's sums and du_add) through them:
    N=2, C=8, 3x3; training (batch statistics) and eval (running ones)."""
    torch.manual_seed(0)
    kind, mode, *rest = case.split("-")
    proj, drop = "proj" in rest, "drop" in rest
    attn = SEModule if kind == "se" else EcaModule
    c_in = 4 if proj else 8
    downsample = nn.Sequential(nn.Conv2d(c_in, 8, 1, bias=False), nn.BatchNorm2d(8)) if proj else None
    block = randomize(BasicBlock(c_in, 8, downsample=downsample, attn_layer=attn))
    with torch.no_grad():
        for p in block.se.parameters():
            p.normal_(0.0, 0.5)
    block = block.to(device=device, dtype=torch.float64)
    getattr(block, mode)()
    factor = torch.tensor([2.0, 0.0], dtype=torch.float64, device=device) if drop else None
    call = _GatedCall(block, factor)
    names = [n for n, _ in call.named_parameters()]
    params = [p for _, p in call.named_parameters()]
    assert any(n.startswith("block.se.") for n in names)
    x = torch.randn(2, c_in, 3, 3, device=device, dtype=torch.float64, requires_grad=True)

    def run(x, *ps):
        return torch.func.functional_call(call, dict(zip(names, ps)), (x,))

    # (eval: bn_pool is the statistics kernel with its moments thrown away)
    with triton_ran("_bn_stats_partial_kernel", "_bn_act_fwd_kernel", "_bn_act_bwd_reduce_kernel",
                    "_bn_act_bwd_apply_kernel"):
        assert torch.autograd.gradcheck(run, (x, *params), fast_mode=True, eps=1e-6,
                                        atol=1e-5)



@pytest.mark.parametrize("name", ["ecaresnet26t"])
def test_gated_model_on_csrc_ref(name):
    """The same block code over the hand-written C++ primitives (the second oracle): one
    fp64 step and eval against timm's model."""
    from test_csrc_ref import _toolchain_missing
    why = _toolchain_missing()
    if why:
        pytest.skip(f"cannot build csrc_ref: {why}")
    original = build(name).double()
    fused = convert_quietly(copy.deepcopy(original))
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with fusedres.use_backend("csrc_ref"):
        assert_one_step_close(fused, original, x)
        with torch.no_grad():
            assert_close64("eval output", fused.eval()(x), original.eval()(x))


# --------------------------------------------------------------------------------------
# Launches: the gate costs no pass over the activation in training, one in eval
# --------------------------------------------------------------------------------------


def _launches(fn) -> int:
    from fusedres.kernels import LAUNCHES
    before = sum(LAUNCHES.values())
    fn()
    return sum(LAUNCHES.values()) - before


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")
@pytest.mark.parametrize("attn", [SEModule, EcaModule], ids=["se", "eca"])
def test_gate_adds_no_launch_in_training_and_one_in_eval(attn):
    """Against the same block without its gate: a train step (forward and backward) makes
    as many Triton launches (the pooling rides in the statistics launch, the per-sample
    sums in the backward's reduction); eval makes one more, the pooling read of z."""
    torch.manual_seed(0)
    gated = convert_quietly(randomize(BasicBlock(8, 8, attn_layer=attn)))
    plain = convert_quietly(randomize(BasicBlock(8, 8)))
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    counts = {}
    for name, block in (("gated", gated), ("plain", plain)):
        block.train()
        block(x).sum().backward()  # whatever a block caches is built outside the count
        train = _launches(lambda: block(x).sum().backward())
        block.eval()
        with torch.no_grad():
            block(x)
            counts[name] = (train, _launches(lambda: block(x)))
    assert counts["gated"] == (counts["plain"][0], counts["plain"][1] + 1), counts
