"""fusedres.fold_for_inference: folded eval outputs against the unfolded eval model.

Whole torchvision and timm ResNets on 1x3x32x32 inputs (16x16 in fp64; eval mode
normalises with the running statistics, so a small input is no harder than a large one),
each model built and folded once per module. Their batch norms get random affine parameters and statistics,
and every tenth one also three extreme channels (running_var 1e-6, running_var 1e3,
running_mean 1e3): in more of them the activations grow by ~300x a norm and fp32 PyTorch
itself drifts by ~1e-5 from fp64; the block tests put extremes in every norm.

On the CPU the folded model runs plain torch convolutions (no Triton kernel); the GPU
test at the end checks that both CUDA paths the dispatcher picks from agree.
"""
from __future__ import annotations

import contextlib
import copy
import os
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedres
from fusedres import inference
from fusedres import reference as R
from fusedres.check import norm_err
from fusedres.convert import _layout_of
from fusedres.inference import FoldedBlock, FoldedConv, FoldedNormReLU

from checks import HAS_CUDA, INTERPRET, assert_low_precision, triton_ran

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

TORCHVISION = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2")
TIMM = ("resnet50d", "resnetv2_50")
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
EXTREME_EVERY = 10


def randomize(model: nn.Module, extreme_every: int = EXTREME_EVERY, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and statistics (as fusedres.check.build), with extreme
    statistics in channels 0-2 of every ``extreme_every``-th norm."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for i, m in enumerate(norms):
            C = m.num_features
            m.weight.copy_(torch.rand(C, generator=g) + 0.5)
            m.bias.copy_(torch.randn(C, generator=g) * 0.2)
            if m.running_mean is None:
                continue
            m.running_mean.copy_(torch.randn(C, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(C, generator=g) + 0.5)
            if i % extreme_every == 0 and C >= 3:
                m.running_var[0], m.running_var[1], m.running_mean[2] = 1e-6, 1e3, 1e3
    return model


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name in TIMM:
        model = timm.create_model(name, pretrained=False)
    else:
        model = torchvision.models.get_model(name, weights=None)
    return randomize(model).eval()


_MODELS: dict = {}
_FOLDED: dict = {}


@pytest.fixture(scope="module")
def models():
    """Each model built once for the whole module (wide_resnet50_2 takes seconds)."""
    yield lambda name: _MODELS[name] if name in _MODELS else _MODELS.setdefault(name, build(name))
    _MODELS.clear()


@pytest.fixture(scope="module")
def folded_models(models):
    """The fp32 folded model of each, folded once (tests that change one copy it)."""
    yield lambda name: _FOLDED[name] if name in _FOLDED else _FOLDED.setdefault(name, fold(models(name)))
    _FOLDED.clear()


def fold(model, **kw) -> inference.FoldedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in these models may stay unfolded
        return fusedres.fold_for_inference(model, **kw)


def image(n=2, size=32, dtype=torch.float32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def err(out, ref) -> float:
    return norm_err({"y": out}, {"y": ref})


# --------------------------------------------------------------------------------------
# Whole models: folded against unfolded, fp32 and fp64, NCHW and channels_last
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", TORCHVISION + TIMM)
def test_folded_matches_unfolded(models, folded_models, name, dtype):
    model = models(name)
    if dtype == torch.float64:
        model = copy.deepcopy(model).double()  # fold from fp64 weights: no fp32 rounding
        folded = fold(model)
    else:
        folded = folded_models(name)
    # fp64 convs on the CPU are slow (grouped ones most): 16x16, stage 4 at 1x1, is enough
    # for rounding this far below fp32's; fp32 needs 32x32 to stay as well conditioned.
    x = image(n=1, size=16 if dtype == torch.float64 else 32, dtype=dtype)
    with torch.no_grad():
        ref = model(x)
        out = folded(x)
        out_cl = folded.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last))
        folded.to(memory_format=torch.contiguous_format)  # the cached model, as it was
    assert out.dtype == dtype and torch.isfinite(ref).all()
    assert err(out, ref) <= TOL[dtype], f"NCHW: {err(out, ref):.3g}"
    assert err(out_cl, ref) <= TOL[dtype], f"channels_last: {err(out_cl, ref):.3g}"


@pytest.mark.parametrize("name", TORCHVISION + TIMM)
def test_every_norm_folds(models, folded_models, name):
    """No batch norm is left but the final norm of a pre-activation net (after the last
    add, no conv before it); a pre-activation block keeps its leading one as FoldedNormReLU."""
    folded = folded_models(name)
    left = [n for n, m in folded.module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    blocks = [m for m in folded.modules() if isinstance(m, FoldedBlock)]
    assert len(blocks) == sum(1 for m in models(name).modules() if _layout_of(type(m)))
    if name == "resnetv2_50":
        assert left == ["norm"]
        assert all(b.preact and isinstance(b.pre_norm, FoldedNormReLU) for b in blocks)
        assert len(folded.folded) == len(blocks)  # its stem has no norm
    else:
        assert left == []
        assert not any(b.preact for b in blocks)
        assert len(folded.folded) > len(blocks)  # the stem too (three convs in resnet50d's)
    assert folded.unfolded == []


@pytest.mark.parametrize("kind", ["bottleneck", "preact_bottleneck", "basic", "preact"])
def test_block_with_extreme_statistics_in_every_norm(kind):
    torch.manual_seed(0)
    block = {"bottleneck": lambda: R.Bottleneck(32, 16, 2, R.projection(32, 64, 2, avg_down=True)),
             "preact_bottleneck": lambda: R.PreActBottleneck(32, 16, 2),
             "basic": lambda: R.BasicBlock(32, 32, 1),
             "preact": lambda: R.PreActBasicBlock(32, 16, 2)}[kind]()
    randomize(block, extreme_every=1).eval()
    x = torch.randn(2, 32, 9, 9)
    for dtype in (torch.float32, torch.float64):
        b = copy.deepcopy(block).to(dtype)
        with torch.no_grad():
            ref, out = b(x.to(dtype)), fold(b)(x.to(dtype))
        assert err(out, ref) <= TOL[dtype], f"{dtype}: {err(out, ref):.3g}"


def test_fold_arithmetic_in_float64():
    """W' = W*s and b' = beta + (b0 - mean)*s, s = gamma/sqrt(var + eps), rounded once."""
    conv = nn.Conv2d(4, 3, 3, bias=True)
    bn = nn.BatchNorm2d(3, eps=1e-3)
    randomize(bn, extreme_every=1)
    w, b = inference.fold_conv_norm(conv, bn)
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + 1e-3)
    assert torch.equal(w, (conv.weight.double() * s.view(-1, 1, 1, 1)).float())
    assert torch.equal(b, (bn.bias.double() + (conv.bias.double() - bn.running_mean.double())
                           * s).float())
    assert w.data_ptr() != conv.weight.data_ptr()


# --------------------------------------------------------------------------------------
# The original, converted models, hooks, what stays unfolded
# --------------------------------------------------------------------------------------


def test_original_and_its_state_dict_untouched(models):
    model = copy.deepcopy(models("resnet18")).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    folded = fold(model)
    assert model.training and all(m.training for m in model.modules())
    assert [type(m) for m in model.modules()] == classes
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ours = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    theirs = [t for t in list(folded.parameters()) + list(folded.buffers()) if t.numel()]
    assert not any(t.data_ptr() in ours for t in theirs), "the folded model shares a tensor"
    # A train-mode original folds its eval behaviour.
    x = image()
    with torch.no_grad():
        assert err(folded(x), model.eval()(x)) <= TOL[torch.float32]


def test_converted_model_folds_like_its_original(models, folded_models):
    converted = fusedres.convert(copy.deepcopy(models("resnet18")))
    folded = fold(converted)
    assert fusedres.fused_blocks(converted), "folding reverted the caller's model"
    x = image()
    with torch.no_grad():
        assert torch.equal(folded(x), folded_models("resnet18")(x))


def test_unfoldable_blocks_stay_and_are_named():
    torch.manual_seed(0)
    block = R.Bottleneck(16, 4, 1, None)
    model = nn.Sequential(copy.deepcopy(block), copy.deepcopy(block))
    model[1].bn2 = nn.BatchNorm2d(4, track_running_stats=False)  # batch statistics in eval
    model[0].conv1.register_forward_hook(lambda m, i, o: None)
    randomize(model)
    with pytest.warns(UserWarning, match="left 2 block"):
        folded = fusedres.fold_for_inference(model)
    assert [n for n, _ in folded.unfolded] == ["0", "1"]
    assert "hooks" in folded.unfolded[0][1] and "running statistics" in folded.unfolded[1][1]
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        assert err(folded(x), model.eval()(x)) <= TOL[torch.float32]


def test_frozen_batch_norms_fold():
    """torchvision's FrozenBatchNorm2d (detection backbones) in the blocks and the stem."""
    from torchvision.ops.misc import FrozenBatchNorm2d
    torch.manual_seed(0)
    model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                             norm_layer=FrozenBatchNorm2d)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2 + (t is m.weight))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    folded = fold(model)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in folded.modules())
    x = image()
    with torch.no_grad():
        assert err(folded(x), model(x)) <= TOL[torch.float32]


def test_sequential_and_stem_folding_is_conservative():
    """conv -> BN [-> ReLU] folds inside an exact nn.Sequential; a custom module's
    conv and BN, whose order only its forward knows, do not."""
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.conv(self.bn(x[:, :1].expand(-1, 4, -1, -1))[:, :3])

    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3), Custom())
    randomize(model, extreme_every=1)
    model.eval()
    folded = fold(model)
    kinds = [type(m).__name__ for m in folded.module]
    assert kinds == ["FoldedConv", "Identity", "Identity", "FoldedConv", "Identity", "Custom"]
    assert folded.module[0].relu and not folded.module[3].relu
    assert isinstance(folded.module[5].bn, nn.BatchNorm2d)
    x = image(size=11)
    with torch.no_grad():
        assert err(folded(x), model(x)) <= TOL[torch.float32]


# --------------------------------------------------------------------------------------
# Inference only
# --------------------------------------------------------------------------------------


def test_refuses_training_and_grad_inputs(folded_models):
    folded = copy.deepcopy(folded_models("resnet18"))
    with pytest.raises(RuntimeError, match="fusedres.convert"):
        folded.train()
    assert not folded.training
    x = image()
    with pytest.raises(RuntimeError, match="require grad.*fusedres.convert"):
        folded(x.clone().requires_grad_())
    folded.module.train()  # around the wrapper: the folded blocks refuse it themselves
    with pytest.raises(RuntimeError, match="training mode.*fusedres.convert"):
        folded(x)
    folded.eval()
    assert not any(p.requires_grad for p in folded.parameters())
    y = folded(x)  # grad mode on, nothing to differentiate: no graph
    assert y.grad_fn is None


def test_pickles_whole(folded_models):
    folded = folded_models("resnet18")
    again = pickle.loads(pickle.dumps(folded))
    assert isinstance(again, inference.FoldedModel)
    x = image()
    with torch.no_grad():
        assert torch.equal(again(x), folded(x))
    with pytest.raises(RuntimeError, match="fusedres.convert"):
        again.train()


# --------------------------------------------------------------------------------------
# torch.compile, dtypes, autocast
# --------------------------------------------------------------------------------------


def _compiled_matches(folded, x, backend):
    torch._dynamo.reset()
    compiled = torch.compile(folded, backend=backend, fullgraph=True)
    with torch.no_grad():
        out, ref = compiled(x), folded(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_compile_fullgraph_aot_eager(folded_models):
    _compiled_matches(folded_models("resnet18"), image(n=1), "aot_eager")


def test_compile_fullgraph_preact_block_under_autocast():
    torch.manual_seed(0)
    folded = fold(randomize(R.PreActBottleneck(16, 8, 2)).eval())
    folded.to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(folded, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = compiled(x), folded(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)


@pytest.mark.skipif(not os.environ.get("FUSEDRES_TEST_INDUCTOR"),
                    reason="inductor compiles C++ on the CPU (~35 s on 2 cores); "
                           "set FUSEDRES_TEST_INDUCTOR=1")
def test_compile_fullgraph_inductor():
    torch.manual_seed(0)
    block = randomize(R.Bottleneck(32, 8, 2, R.projection(32, 32, 2))).eval()
    _compiled_matches(fold(block), torch.randn(2, 32, 8, 8), "inductor")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["bottleneck", "preact_bottleneck"])
def test_low_precision_model_within_twice_torch_error(kind, dtype):
    """A folded model moved to bf16/fp16 against the unfolded one in the same dtype, both
    against fp64 (flash-attention's rule, as tests/checks.py)."""
    torch.manual_seed(0)
    block = (R.Bottleneck(32, 16, 1, R.projection(32, 64, 1)) if kind == "bottleneck"
             else R.PreActBottleneck(32, 16, 1))
    block = randomize(block).eval()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        exact = copy.deepcopy(block).double()(x.double())
        own = copy.deepcopy(block).to(dtype)(x.to(dtype))
        out = fold(block).to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    assert_low_precision(out, own, exact, dtype, name=f"{kind} {dtype}")


def test_fp64_stays_fp64_under_autocast():
    """Autocast casts fp32 convs, never fp64 ones; the folded convs cast the same way."""
    torch.manual_seed(0)
    block = randomize(R.Bottleneck(16, 4, 1, None)).eval().double()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = block(x), fold(block)(x)
    assert out.dtype == torch.float64 and err(out, ref) <= TOL[torch.float64]


def test_autocast_bf16_cpu_within_twice_torch_error(models):
    model = models("resnet18")
    folded = fold(model).to(memory_format=torch.channels_last)  # not the cached one
    x = image(size=48)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            own = model(x)
            out = folded(x.contiguous(memory_format=torch.channels_last))
    assert out.dtype == own.dtype
    assert_low_precision(out, own, exact, torch.bfloat16, name="resnet18 autocast bf16")


# --------------------------------------------------------------------------------------
# The CUDA path choice: its bookkeeping runs anywhere, the paths themselves need a GPU
# --------------------------------------------------------------------------------------


def _site():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    return FoldedConv(conv, *inference.fold_conv_norm(conv, randomize(nn.BatchNorm2d(8))), True)


def test_path_choice_is_cached_and_never_timed_while_tracing(monkeypatch):
    site = _site().eval()
    x = torch.randn(2, 8, 5, 5)
    args = (x, site.weight, site.bias, None)
    assert site.path_for(*args) == inference.DEFAULT_PATH and site.choices == {}  # not tuning
    calls = []
    monkeypatch.setattr(inference, "_time_paths", lambda *a, **k: calls.append(1) or
                        {"cudnn_fused": 1.0, "conv_epilogue": 2.0})
    site.tuning = True
    for flags in (["torch.compiler.is_compiling"],
                  ["torch.cuda.is_available", "torch.cuda.is_current_stream_capturing"]):
        with monkeypatch.context() as m:
            for flag in flags:
                m.setattr(flag, lambda: True)
            assert site.path_for(*args) == inference.DEFAULT_PATH
    assert calls == [] and site.choices == {}
    assert site.path_for(*args) == "cudnn_fused" and len(calls) == 1
    assert site.path_for(*args) == "cudnn_fused" and len(calls) == 1  # cached: no timing
    assert site.path_for(x[:1], *args[1:]) == "cudnn_fused" and len(calls) == 2  # new shape
    site.tuning = False
    assert site.path_for(x.double(), site.weight, site.bias, None) == inference.DEFAULT_PATH


def test_path_choice_traces_whole_under_compile(monkeypatch):
    """torch.compile takes the path tuned for the input's dtype and layout (the default
    where tuned shapes disagree), static or dynamic shapes, and never times."""
    site = _site()
    x = torch.randn(2, 8, 5, 5)
    site.remember((tuple(x.shape), x.dtype, False), "cudnn_fused")
    site.tuning = True
    monkeypatch.setattr(inference, "_time_paths", lambda *a, **k: pytest.fail("timed"))

    def pick(x):
        path = site.path_for(x, site.weight, site.bias, None)
        return x + 1 if path == "cudnn_fused" else x - 1
    for dynamic in (False, True):
        torch._dynamo.reset()
        out = torch.compile(pick, backend="aot_eager", fullgraph=True, dynamic=dynamic)(x)
        assert torch.equal(out, x + 1), f"dynamic={dynamic}"
    site.remember(((1, 8, 5, 5), x.dtype, False), "conv_epilogue")  # shapes disagree
    torch._dynamo.reset()
    assert torch.equal(torch.compile(pick, backend="aot_eager", fullgraph=True)(x), x - 1)
    assert len(site.choices) == 2


@pytest.mark.parametrize("with_skip", [False, True], ids=["relu", "add_relu"])
def test_epilogue_path_matches_plain_torch_on_cpu(with_skip):
    """Path (b)'s arithmetic (bare conv, then the epilogue with scale 1 and the bias as
    shift) on CPU tensors: the Triton kernel itself under TRITON_INTERPRET=1, else the
    reference backend. Path (a) is cuDNN's and runs only on a GPU."""
    site = _site().eval()
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    skip = torch.randn(2, 8, 5, 5) if with_skip else None
    norm = FoldedNormReLU(randomize(nn.BatchNorm2d(8)))
    with triton_ran("_bn_act_fwd_kernel") if INTERPRET else contextlib.nullcontext():
        out = inference._run_path("conv_epilogue", site, x, site.weight, site.bias, skip)
        normed = inference.relu_epilogue(x, norm.scale, norm.shift, None)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, site(x, skip))
    torch.testing.assert_close(normed, norm(x))


def test_tune_on_cpu_chooses_nothing(folded_models):
    folded = folded_models("resnet18")
    assert folded.tune(image(n=1)) is folded
    sites = [m for m in folded.modules() if isinstance(m, FoldedConv)]
    assert sites and all(m.choices == {} and not m.tuning for m in sites)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_cuda_paths_agree(dtype, layout):
    """Every path the dispatcher can pick (a path that raises for a dtype/layout is never
    picked) gives the plain-torch result, for conv+bias+ReLU and conv+bias+add+ReLU."""
    torch.manual_seed(0)
    for stride, groups, with_skip in ((1, 1, False), (2, 1, False), (1, 4, True), (1, 1, True)):
        conv = nn.Conv2d(32, 64, 3, stride=stride, padding=1, groups=groups)
        site = FoldedConv(conv, *inference.fold_conv_norm(conv, randomize(nn.BatchNorm2d(64))),
                          True).cuda().to(dtype).eval()
        x = torch.randn(4, 32, 14, 14, device="cuda", dtype=dtype).contiguous(memory_format=layout)
        ho = (14 - 1) // stride + 1
        skip = (torch.randn(4, 64, ho, ho, device="cuda", dtype=dtype)
                .contiguous(memory_format=layout) if with_skip else None)
        d = lambda t: None if t is None else t.double()  # noqa: E731
        exact = F.conv2d(x.double(), site.weight.double(), site.bias.double(), site.stride,
                         site.padding, site.dilation, groups)
        exact = torch.relu(exact + d(skip) if with_skip else exact)
        own = F.conv2d(x, site.weight, site.bias, site.stride, site.padding, site.dilation, groups)
        own = torch.relu(own + skip if with_skip else own)
        picked = inference._time_paths(site, x, site.weight, site.bias, skip, iters=1)
        assert inference.DEFAULT_PATH in picked, "the default path must run everywhere"
        if "cudnn_fused" in picked:  # its fake kernel against the real op (torch.compile)
            torch.library.opcheck(inference.cudnn_conv_bias_relu,
                                  (x, site.weight, site.bias.to(dtype), skip, site.stride,
                                   site.padding, site.dilation, groups))
        for path in picked:
            out = inference._run_path(path, site, x, site.weight, site.bias, skip)
            assert out.dtype == dtype and out.shape == own.shape
            name = f"{path} stride {stride} groups {groups} skip {with_skip}"
            if dtype == torch.float32:
                torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-4,
                                           msg=lambda m: f"{name}: {m}")
            else:
                assert_low_precision(out, own, exact, dtype, name=name)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_capture_never_tunes():
    """With tuning on, a site met first inside CUDA-graph capture takes the default path
    (timing would synchronise, which capture forbids) and caches nothing."""
    site = _site().cuda()
    y = torch.randn(3, 8, 6, 6, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        site(y)  # warm-up (Triton compile, cuDNN plan) without tuning: nothing cached
    torch.cuda.current_stream().wait_stream(side)
    assert site.choices == {}
    site.tuning = True
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = site(y)
    graph.replay()
    torch.cuda.synchronize()
    assert site.choices == {}
    site.tuning = False
    with torch.no_grad():
        torch.testing.assert_close(out, site(y))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["amp", "bf16"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_cuda_model_tuned_default_and_compiled_agree(name, precision):
    """channels_last, bf16 autocast ("amp") or a bf16 model: the folded model with the
    default paths, tuned, and (resnet18) tuned under torch.compile with inductor, each
    within twice the error of the unfolded model in the same precision."""
    torch.manual_seed(0)
    model = randomize(torchvision.models.get_model(name, weights=None)).eval().cuda()
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    folded = fold(model).to(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        if precision == "bf16":
            model, folded, x = model.to(torch.bfloat16), folded.to(torch.bfloat16), x.bfloat16()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "amp"):
            default = folded(x)
            folded.tune(x)
            tuned = folded(x)
            own = model(x)
            # Inductor's compile of ResNet-50 takes a minute: resnet18's covers the same ops.
            compiled = torch.compile(folded, fullgraph=True)(x) if name == "resnet18" else tuned
    picked = {p for m in folded.modules() if isinstance(m, FoldedConv) for p in m.choices.values()}
    assert picked and picked <= set(inference.PATHS), picked
    for what, out in (("default", default), ("tuned", tuned), ("compiled", compiled)):
        assert out.dtype == torch.bfloat16
        assert_low_precision(out, own, exact, torch.bfloat16, name=f"{name} {what} ({picked})")
