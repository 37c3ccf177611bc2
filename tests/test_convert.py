"""fusedres.convert / revert on whole torchvision and timm ResNets.

Run with TRITON_INTERPRET=1 so that the Triton kernels run (in the interpreter) on the CPU;
without it the same tests check the plain-PyTorch reference backend. Deep models are built
with one block per stage and run on 2x3x48x48 inputs: the interpreter's cost is mostly
per kernel program, not per element, and at 32x32 the last stage's batch norms would see
2 values per channel, so ill-conditioned that PyTorch's own fp32 outputs are off by ~1e-2
against fp64 (at 48x48 and 64x64 the last stage is 2x2: 8 values, ~2e-6).
"""
from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import fusedres
from fusedres.convert import LAYOUTS, fused_class, why_not_fused

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
tvR = torchvision.models.resnet

KERNELS = fusedres.backend_for(torch.device("cpu")) == "triton"


def launches() -> int:
    if not KERNELS:
        return 0
    from fusedres.kernels import LAUNCHES
    return sum(LAUNCHES.values())


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------

ONE = [1, 1, 1, 1]
# The named models' hyper-parameters with one block per stage.
MODELS = {
    "tv_resnet18": lambda: tvR.ResNet(tvR.BasicBlock, ONE),
    "tv_resnet50": lambda: tvR.ResNet(tvR.Bottleneck, ONE),
    "tv_resnext50_32x4d": lambda: tvR.ResNet(tvR.Bottleneck, ONE, groups=32, width_per_group=4),
    "tv_wide_resnet50_2": lambda: tvR.ResNet(tvR.Bottleneck, ONE, width_per_group=128),
    "timm_resnet18": lambda: timm.create_model("resnet18", layers=ONE),
    "timm_resnet50d": lambda: timm.create_model("resnet50d", layers=ONE),
    "timm_resnet26t": lambda: timm.create_model("resnet26t", layers=ONE),
    "timm_resnetv2_50": lambda: timm.create_model("resnetv2_50", layers=ONE),
}


def randomize(model: nn.Module) -> nn.Module:
    """Random BN parameters and statistics, and no all-zero conv (timm's zero_init_last),
    so that every term of the fused math shows in the results."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.any():
                nn.init.kaiming_normal_(m.weight)
            if hasattr(m, "running_var") and m.running_var is not None:
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(MODELS[name]())


def known_blocks(model: nn.Module) -> int:
    return sum((type(m).__module__, type(m).__qualname__) in LAYOUTS for m in model.modules())


def convert_quietly(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fusedres.convert(model)


# --------------------------------------------------------------------------------------
# Comparing whole models
# --------------------------------------------------------------------------------------
# Training is compared in float64. In fp32, gradients of a whole model at this size are
# not continuous enough to compare: a pre-activation within rounding of zero flips a
# ReLU, and through batch norms over 8 values per channel that moves gradients by up to
# tens of percent; measured against an fp64 run, PyTorch's own fp32 gradients of these
# models are off by 1e-5 on most seeds and by 0.1-0.5 on others, and so are the fused
# ones, not always on the same seeds. In fp64 rounding never reaches a ReLU boundary, and
# fused and PyTorch agree to ~1e-13 relative to max|ref|; 1e-9 leaves room for
# amplification through ~15 batch norms and still catches anything computed at fp32
# precision (1e-7). The fp32 path runs too, for outputs and running statistics, which are
# continuous: the fused error against the fp64 model must be at most max(1e-3, 2 x
# PyTorch's own) (1e-3 for ~15 batch norms of rounding; the 2x rule is flash-attention's).
TOL64 = 1e-9
FLOOR32 = 1e-3


def rel_err(t: torch.Tensor, ref: torch.Tensor) -> float:
    """max|t - ref| / max|ref|, in float64."""
    ref = ref.detach().double()
    return (t.detach().double() - ref).abs().max().item() / (ref.abs().max().item() or 1.0)


def assert_close64(what: str, fused, ref):
    err = rel_err(fused, ref)
    assert err <= TOL64, f"{what}: fused error {err:.2e} against PyTorch, both float64"


def assert_close32(what: str, fused, torch32, ref64):
    f, t = rel_err(fused, ref64), rel_err(torch32, ref64)
    assert f <= max(FLOOR32, 2 * t), f"{what}: fp32 error {f:.2e}, PyTorch's {t:.2e} (vs fp64)"


def assert_state_close(what: str, fused: nn.Module, ref: nn.Module, grads: bool = False):
    """Parameters (or their gradients) and buffers of two float64 models."""
    for (name, pf), pr in zip(fused.named_parameters(), ref.parameters()):
        assert_close64(f"{what} {name}", pf.grad if grads else pf, pr.grad if grads else pr)
    if not grads:
        assert_buffers_close(what, fused, ref, assert_close64)


def assert_buffers_close(what, fused, ref, close, torch32=None):
    bufs = zip(fused.named_buffers(), ref.buffers(), (torch32 or ref).buffers())
    for (name, bf), br, bt in bufs:
        if not bf.is_floating_point():
            assert torch.equal(bf, br), f"{what} {name}: {bf} != {br}"
        elif torch32 is None:
            close(f"{what} {name}", bf, br)
        else:
            close(f"{what} {name}", bf, bt, br)


# --------------------------------------------------------------------------------------
# Every model: converted, and training the same
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_model_trains_like_original(name):
    original = build(name)
    assert known_blocks(original) == 4
    fused32 = convert_quietly(copy.deepcopy(original))
    assert len(fusedres.fused_blocks(fused32)) == 4
    assert all(isinstance(m, type(o)) for m, o in zip(fused32.modules(), original.modules()))
    assert_trains_like(fused32, original, 48)  # 48: layer4 still 2x2, as at 64


def assert_trains_like(fused32: nn.Module, original: nn.Module, size: int):
    """A converted fp32 model against its original on 2x3xsize x size inputs: fp32
    outputs and running statistics, then two fp64 SGD steps (test_aa_blocks uses it)."""
    fused, ref = copy.deepcopy(fused32).double(), copy.deepcopy(original).double()
    ref32 = copy.deepcopy(ref)  # the fp64 yardstick of the fp32 run
    gen = torch.Generator().manual_seed(1)
    before = launches()

    # fp32: train-mode outputs and running statistics, then eval outputs
    x = torch.randn(2, 3, size, size, generator=gen)
    outs = [m.train()(x.to(next(m.parameters()).dtype)) for m in (fused32, original, ref32)]
    assert_close32("fp32 train output", *outs)
    assert_buffers_close("fp32", fused32, ref32, assert_close32, torch32=original)
    with torch.no_grad():
        outs = [m.eval()(x.to(next(m.parameters()).dtype)) for m in (fused32, original, ref32)]
    assert_close32("fp32 eval output", *outs)
    if KERNELS:
        assert launches() > before

    # fp64: two SGD steps (outputs, gradients, running statistics, every loss and
    # parameter; the second step applies momentum and updated statistics), then eval outputs
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (fused, ref)]
    for step in range(2):
        x = torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64)
        outs, losses = [], []
        for m, opt in zip((fused, ref), opts):
            outs.append(m.train()(x))
            losses.append(outs[-1].square().mean())
            opt.zero_grad()
            losses[-1].backward()
        assert_close64(f"step {step} loss", *losses)
        if step == 0:
            assert_close64("train output", *outs)
            assert_state_close("grad", fused, ref, grads=True)
        for opt in opts:
            opt.step()
        assert_state_close(f"after step {step}:", fused, ref)
    with torch.no_grad():
        x = torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64)
        assert_close64("eval output", fused.eval()(x), ref.eval()(x))


def assert_one_step_close(fused: nn.Module, original: nn.Module, x: torch.Tensor):
    """Two float64 models in training mode: the output, every gradient of one backward of
    the mean square, then parameters and buffers (running statistics included)."""
    outs = [m.train()(x) for m in (fused, original)]
    assert_close64("train output", *outs)
    for out in outs:
        out.square().mean().backward()
    assert_state_close("grad", fused, original, grads=True)
    assert_state_close("after the step", fused, original)


def assert_bf16_outputs(original: nn.Module, size: int):
    """bf16 (tests/checks.py's rule): a converted bf16 copy of ``original`` against fp64, at
    most twice PyTorch's own bf16 error plus one ulp, in training and in eval, on
    2x3 x size x size (test_aa_blocks and test_gate_blocks use it)."""
    from checks import assert_low_precision
    fused = convert_quietly(copy.deepcopy(original)).bfloat16()
    own, exact = copy.deepcopy(original).bfloat16(), copy.deepcopy(original).double()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    for mode in ("train", "eval"):
        with torch.no_grad():
            outs = [getattr(m, mode)()(x.to(next(m.parameters()).dtype))
                    for m in (fused, own, exact)]
        assert_low_precision(*outs, torch.bfloat16, name=f"bf16 {mode} output")


# --------------------------------------------------------------------------------------
# What convert does to a model
# --------------------------------------------------------------------------------------


def test_convert_shares_tensors_and_keeps_keys():
    model = build("tv_resnet18")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    children = {n: m for n, m in model.named_modules()}
    keys = list(model.state_dict())
    assert fusedres.convert(model) is model
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert all(m is children[n] for n, m in model.named_modules())
    block = model.layer2[0]
    assert isinstance(block, tvR.BasicBlock) and type(block) is fused_class(tvR.BasicBlock)
    assert type(block)._fused_original is tvR.BasicBlock


def test_convert_twice_and_revert():
    model = build("timm_resnet50d")
    original = copy.deepcopy(model)
    convert_quietly(model)
    classes = [type(m) for m in model.modules()]
    convert_quietly(model)  # nothing left to do, nothing to warn about
    assert [type(m) for m in model.modules()] == classes
    assert fusedres.revert(model) is model
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    assert fusedres.fused_blocks(model) == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), original.eval()(x), rtol=0, atol=0)


def test_revert_built_fused_model_gives_reference_blocks():
    model = tvR.ResNet(fusedres.FusedBasicBlock, ONE)
    assert len(fusedres.fused_blocks(model)) == 4
    fusedres.revert(model)
    assert type(model.layer1[0]) is fusedres.reference.BasicBlock
    convert_quietly(model)
    assert type(model.layer1[0]) is fusedres.FusedBasicBlock


def test_state_dict_round_trips():
    original = build("tv_resnet18")
    fused = convert_quietly(build("tv_resnet18", seed=1))
    assert list(fused.state_dict()) == list(original.state_dict())
    buf = io.BytesIO()
    torch.save(original.state_dict(), buf)  # a torchvision checkpoint into the fused model
    buf.seek(0)
    fused.load_state_dict(torch.load(buf))
    for a, b in zip(fused.state_dict().values(), original.state_dict().values()):
        assert torch.equal(a, b)
    other = build("tv_resnet18", seed=2)
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)  # and back
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    for a, b in zip(other.state_dict().values(), original.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = original.eval()(x)  # eval: continuous, 1e-4 of max|ref| for a whole model
        torch.testing.assert_close(fused.eval()(x), expected, rtol=1e-4,
                                   atol=1e-4 * expected.abs().max().item())


def test_mismatched_checkpoint_fails_as_in_pytorch():
    fused = convert_quietly(tvR.ResNet(tvR.BasicBlock, ONE))
    wrong = tvR.ResNet(tvR.Bottleneck, ONE).state_dict()
    with pytest.raises(RuntimeError, match="Error\\(s\\) in loading state_dict"):
        fused.load_state_dict(wrong)


def test_pickle_deepcopy_and_dtype_casts():
    model = convert_quietly(build("timm_resnet18"))
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for copy_ in (loaded, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert [type(m) for m in copy_.modules()] == [type(m) for m in model.modules()]
        assert len(fusedres.fused_blocks(copy_)) == 4
    with torch.no_grad():
        before = launches()
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        if KERNELS:
            assert launches() > before
    for cast, dtype in ((nn.Module.half, torch.float16), (nn.Module.bfloat16, torch.bfloat16),
                        (lambda m: m.to(torch.float64), torch.float64)):
        casted = cast(copy.deepcopy(model))
        assert len(fusedres.fused_blocks(casted)) == 4
        assert all(p.dtype == dtype for p in casted.parameters())
    bf16 = copy.deepcopy(model).bfloat16()
    with torch.no_grad():
        out = bf16(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # bf16 storage end to end: about 2^-8 per rounding, compounded over the model
    assert rel_err(out, expected) < 0.1


def test_frozen_batch_norm_blocks_convert():
    from torchvision.ops.misc import FrozenBatchNorm2d
    torch.manual_seed(0)
    original = randomize(tvR.ResNet(tvR.BasicBlock, ONE, norm_layer=FrozenBatchNorm2d)).double()
    fused = convert_quietly(copy.deepcopy(original))
    assert len(fusedres.fused_blocks(fused)) == 4
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    outs = []
    for m in (fused, original):  # frozen: the eval epilogue in train mode too
        m.train()
        outs.append(m(x))
        outs[-1].square().mean().backward()
    assert_close64("train output", *outs)
    assert_state_close("frozen", fused, original, grads=True)
    assert_state_close("frozen", fused, original)


# --------------------------------------------------------------------------------------
# Stochastic depth
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "resnetv2_18"])
def test_drop_path_matches_timm(name):
    torch.manual_seed(0)
    assert_drop_path_matches(timm.create_model(name, layers=ONE, drop_path_rate=0.3), 64)


def assert_drop_path_matches(model: nn.Module, size: int):
    """A timm model built with drop_path_rate=0.3 and its conversion, one fp64 step on
    4x3 x size x size with the same RNG state (test_gate_blocks uses it)."""
    original = randomize(model).double()
    fused = convert_quietly(copy.deepcopy(original))
    assert len(fusedres.fused_blocks(fused)) == 4
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    outs = []
    for m in (fused, original):
        m.train()
        torch.manual_seed(123)
        outs.append(m(x))
        outs[-1].square().mean().backward()
    # timm's rates over the 4 blocks are 0, 0.1, 0.2, 0.3: the same draws drop some sample
    torch.manual_seed(123)
    draws = [torch.empty(4, 1, 1, 1, dtype=torch.float64).bernoulli_(1 - r)
             for r in (0.1, 0.2, 0.3)]
    assert any((d == 0).any() for d in draws)
    assert_close64("train output", *outs)
    assert_state_close("drop path", fused, original, grads=True)
    assert_state_close("drop path", fused, original)


# --------------------------------------------------------------------------------------
# What convert leaves alone
# --------------------------------------------------------------------------------------


def _convert_warns(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fusedres.convert(model)
    assert len(caught) == 1, [str(w.message) for w in caught]
    return str(caught[0].message)


@pytest.mark.parametrize("name, kwargs, reason", [
    # SEModule and EcaModule are served (test_gate_blocks.py), other attention layers not
    ("resnet18", {"block_args": {"attn_layer": "ese"}},
     "attention layer se (EffectiveSEModule) is neither timm's SEModule nor its EcaModule"),
    ("resnet18", {"block_args": {"attn_layer": "ceca"}}, "attention layer se (CecaModule)"),
    ("resnet18", {"act_layer": nn.SiLU}, "act1 is SiLU, not ReLU"),
    # nn.AvgPool2d and BlurPool2d itself are served (test_aa_blocks.py), a subclass is not
    ("resnet18", {"aa_layer": type("OwnBlurPool2d", (timm.layers.BlurPool2d,), {})},
     "anti-aliasing layer aa"),
    ("resnet18", {"drop_block_rate": 0.1}, "DropBlock drop_block (DropBlock2d)"),
    ("resnetv2_50d_gn", {}, "norm1 is GroupNormAct, not a batch norm"),
])
def test_unsupported_timm_blocks_are_reported(name, kwargs, reason):
    model = timm.create_model(name, layers=ONE, **kwargs)
    message = _convert_warns(model)
    bad = [n for n, m in model.named_modules()
           if (type(m).__module__, type(m).__qualname__) in LAYOUTS and why_not_fused(m)]
    assert bad and all(f"{n} (" in message for n in bad), message
    assert reason in message
    assert len(fusedres.fused_blocks(model)) == 4 - len(bad)


def test_partly_unsupported_model_warns_once_naming_each_block():
    model = tvR.ResNet(tvR.BasicBlock, [2, 1, 1, 1])
    model.layer1[0].bn1 = nn.GroupNorm(8, 64)
    model.layer1[1].conv2 = nn.Conv2d(64, 64, 3, padding=1, bias=True)
    model.layer2[0].bn2 = nn.SyncBatchNorm(128)
    model.layer3[0].conv1.padding_mode = "reflect"
    message = _convert_warns(model)
    assert "left 4 block(s) unfused" in message
    assert "layer1.0 (BasicBlock): bn1 is GroupNorm, not a batch norm" in message
    assert "layer1.1 (BasicBlock): conv2 has a bias" in message
    assert ("layer2.0 (BasicBlock): its norms must all be nn.SyncBatchNorm or none of them, "
            "got BatchNorm2d, SyncBatchNorm, BatchNorm2d") in message
    assert "layer3.0 (BasicBlock): conv1 has padding_mode='reflect'" in message
    assert fusedres.fused_blocks(model) == ["layer4.0"]


def test_no_resnet_blocks_and_non_modules():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    assert "no ResNet block" in _convert_warns(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        fusedres.convert({"not": "a model"})
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        fusedres.revert(None)


# --------------------------------------------------------------------------------------
# The command line check
# --------------------------------------------------------------------------------------


def test_check_command_resnet18():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fusedres", "check", "--model", "resnet18"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "resnet18" in out and "PASS" in out
    if not torch.cuda.is_available():
        assert "Triton's interpreter" in out
    assert "blocks fused: 8" in out


def test_check_exits_nonzero_on_wrong_results(monkeypatch, capsys):
    import fusedres.api as api
    import fusedres.check as check

    def broken_convert(model):  # a fused model whose batch norms use another eps
        fusedres.convert(model)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 1e-3
        return model

    monkeypatch.setattr(api, "convert", broken_convert)
    assert check.main(["check", "--model", "resnet18", "--no-bench"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out.splitlines()[-1]
