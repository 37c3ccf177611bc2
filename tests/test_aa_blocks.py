"""timm's anti-aliased ResNets (resnetblur*, resnetaa*), converted.

The ``aa`` layer (BlurPool2d or nn.AvgPool2d after the strided conv's activation) runs in
its functional form inside the fused block (fusedres.antialias); the BN + ReLU around it
stay fused. Run with TRITON_INTERPRET=1, as test_convert.py, whose comparisons and
tolerances these tests reuse, with one block per stage. Inputs: 2x3x48x48 for
resnetblur18, whose last stage's batch norms then see 8 values per channel as at 64x64
(BlurPool2d pads, so odd sizes round up); at 32x32 they see 2, and after three steps the
fp64 runs differ by 1.5e-9, the conditioning, not the arithmetic. resnetaa50 needs sizes
that stay even down to its last stage (AvgPool2d(2) rounds down where the strided
shortcut conv rounds up: timm's own model fails at 48x48), so 64x64.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fusedres
from checks import assert_compiles_like_eager, assert_jvp_and_vmap_match
from fusedres.antialias import aa_backward, aa_forward, aa_out_hw, read_aa
from fusedres.convert import why_not_fused
from test_convert import (assert_bf16_outputs, assert_close64, assert_one_step_close,
                          assert_trains_like, convert_quietly, randomize)

timm = pytest.importorskip("timm")
from timm.layers import BlurPool2d  # noqa: E402

ONE = [1, 1, 1, 1]
# An eighth of the widths: what is compared does not depend on them, and the convs
# (BlurPool2d's depthwise one, on both sides) and interpreted kernels get cheaper
NARROW = dict(layers=ONE, channels=(8, 16, 32, 64), stem_width=8)
# BasicBlock with BlurPool2d, Bottleneck with AvgPool2d: both aa kinds, both positions
MODELS = {"resnetblur18": lambda: timm.create_model("resnetblur18", **NARROW),
          "resnetaa50": lambda: timm.create_model("resnetaa50", **NARROW)}
# resnetaa50 runs the recomputed backward (the aa step recomputed from the BN input),
# resnetblur18 the saved one
RECOMPUTE = {"resnetblur18": False, "resnetaa50": True}
SIZE = {"resnetblur18": 48, "resnetaa50": 64}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(MODELS[name]())


def aa_blocks(model: nn.Module) -> list:
    return [m for m in model.modules()
            if hasattr(m, "aa") and not isinstance(m.aa, nn.Identity) and hasattr(m, "conv1")]


# --------------------------------------------------------------------------------------
# The functional aa step against the modules themselves
# --------------------------------------------------------------------------------------

AA_LAYERS = {
    "avg2": lambda: nn.AvgPool2d(2),  # what resnetaa* builds
    "avg3_ceil": lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
    "blur3_reflect": lambda: BlurPool2d(6, 3, 2),  # what resnetblur* builds
    "blur5_constant": lambda: BlurPool2d(6, 5, 2, pad_mode="constant"),
    "blur3_replicate_shared": lambda: BlurPool2d(None, 3, 2, pad_mode="replicate"),
}


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
@pytest.mark.parametrize("layer", list(AA_LAYERS))
def test_aa_step_matches_the_module(layer, fmt):
    torch.manual_seed(0)
    m = AA_LAYERS[layer]().double()
    for shape in ((2, 6, 7, 9), (2, 6, 8, 8)):
        x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=fmt)
        x.requires_grad_()
        ref = m(x)
        g = torch.randn_like(ref)
        (gx,) = torch.autograd.grad(ref, x, g)
        spec, filt = read_aa(m, 0)
        out = aa_forward(x.detach(), spec, filt)
        assert tuple(out.shape[2:]) == aa_out_hw(spec, *shape[2:])
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)
        gi = aa_backward(g, x.detach(), spec, filt)
        torch.testing.assert_close(gi, gx, rtol=0, atol=1e-13)
        assert out.is_contiguous(memory_format=fmt) and gi.is_contiguous(memory_format=fmt)


def test_unserved_aa_layers_are_named():
    block = MODELS["resnetblur18"]().layer2[0]
    assert why_not_fused(block) is None
    block.aa = nn.MaxPool2d(2)
    assert "neither nn.AvgPool2d nor timm's BlurPool2d" in why_not_fused(block)
    block.aa = BlurPool2d(16, 3, 2, pad_mode="circular")
    assert "pad_mode='circular'" in why_not_fused(block)


# --------------------------------------------------------------------------------------
# Whole models: converted against unconverted
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_aa_model_trains_like_original(name):
    original = build(name)
    fused32 = convert_quietly(copy.deepcopy(original))
    assert len(fusedres.fused_blocks(fused32)) == 4
    for block in fusedres.fused_blocks(fused32):
        fused32.get_submodule(block).recompute = RECOMPUTE[name]
    assert len(aa_blocks(fused32)) == 3  # every stage but the first downsamples
    assert_trains_like(fused32, original, SIZE[name])


def test_aa_model_bf16_outputs():
    """bf16 (tests/checks.py's rule): the fused error against fp64 at most twice
    PyTorch's own bf16 error plus one ulp, in training and in eval."""
    original = build("resnetblur18")
    assert_bf16_outputs(original, 48)


def test_aa_model_channels_last():
    """channels_last activations, one fp64 step against the original."""
    original = build("resnetblur18").double()
    fused = convert_quietly(copy.deepcopy(original))
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fused, original = (m.to(memory_format=torch.channels_last) for m in (fused, original))
    x = x.contiguous(memory_format=torch.channels_last)
    assert_one_step_close(fused, original, x)


def test_backward_keeps_the_post_aa_activation_only():
    """The fused block saves the downsampled activation the next conv needs; at the
    pre-aa shape it saves only the conv output z (the ReLU recomputes from it)."""
    block = convert_quietly(build("resnetblur18")).layer2[0].train()
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        block(x)
    pre_aa, post_aa = (2, 16, 12, 12), (2, 16, 6, 6)
    # pre-aa: z1; post-aa: the activation, z2 and the projection conv's output
    assert saved.count(pre_aa) == 1 and saved.count(post_aa) == 3, saved


def test_replaced_aa_layer_is_picked_up():
    """The plan cache keys on the aa module: a new one is used on the next call."""
    original = build("resnetaa50").double().eval()
    fused = convert_quietly(copy.deepcopy(original))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert_close64("eval output", fused(x), original(x))
        for m in (fused, original):
            m.layer3[0].aa = BlurPool2d(m.layer3[0].conv2.out_channels, 3, 2).double()
        assert_close64("eval output, new aa", fused(x), original(x))


def test_compiled_aa_model_matches_eager():
    eager = convert_quietly(build("resnetblur18"))
    assert_compiles_like_eager(eager, torch.randn(2, 3, 48, 48,
                                                  generator=torch.Generator().manual_seed(4)))


def test_fold_for_inference_leaves_aa_blocks_unfolded():
    """fold_for_inference folds what convert fuses, but not the aa step: those blocks stay
    as they are, named in its warning, and the model still computes the same."""
    model = build("resnetblur18").eval()
    with pytest.warns(UserWarning, match="anti-aliasing layer aa"):
        folded = fusedres.fold_for_inference(model)
    assert sorted(name for name, _ in folded.unfolded) == ["layer2.0", "layer3.0", "layer4.0"]
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_ad_and_vmap_take_the_aa_step(name):
    """Forward AD and vmap run the plain modules (fusedres.parity): the aa layer included."""
    ref = build(name).double()
    fused = fusedres.convert(copy.deepcopy(ref))
    block, ref_block = aa_blocks(fused)[0], aa_blocks(ref)[0]
    assert_jvp_and_vmap_match(block, ref_block,
                              torch.randn(2, block.conv1.in_channels, 8, 8, dtype=torch.float64))
