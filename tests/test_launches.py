"""Launches per block call, as a profiler user would see them: Triton launches
(fusedres.kernels.LAUNCHES) and every other torch op (a TorchDispatchMode).

A train step of a Bottleneck makes <= 12 Triton launches (projection Bottleneck <= 13,
BasicBlock <= 8, pre-activation blocks likewise), eval one per BN, and apart from the
convolutions, allocations and views no torch op runs per BN (the residual gradient's one
addition per block is ATen's, as in eager PyTorch)."""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from checks import INTERPRET, make_pair
from fusedres.kernels import LAUNCHES

pytestmark = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (the Triton "
                                "kernels on CPU tensors)")

# ops a block may run besides its Triton kernels
CONV = {"convolution", "convolution_backward"}
ALLOC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
VIEW = {"view", "_unsafe_view", "as_strided", "select", "slice", "unbind", "permute", "expand",
        "t", "alias", "detach", "unsqueeze", "squeeze", "reshape", "_reshape_alias",
        "split", "split_with_sizes", "unsafe_split", "transpose"}


class _Ops(TorchDispatchMode):
    """Counts the ATen ops the block itself issues (not those the interpreter makes while it
    runs a kernel on CPU tensors: on a GPU those do not exist)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.inside_kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside_kernel:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _count():
    from triton.runtime.interpreter import InterpretedFunction
    mode = _Ops()
    orig = InterpretedFunction.run

    def run(self, *args, **kwargs):
        mode.inside_kernel += 1
        try:
            return orig(self, *args, **kwargs)
        finally:
            mode.inside_kernel -= 1

    before = sum(LAUNCHES.values())
    InterpretedFunction.run = run
    try:
        with mode:
            yield mode
    finally:
        InterpretedFunction.run = orig
    mode.launches = sum(LAUNCHES.values()) - before


def _others(ops) -> dict:
    return {k: v for k, v in ops.items() if k not in CONV | ALLOC | VIEW}


# (kind, c_in, planes, stride, BNs, Triton launches per train step at most)
CASES = [("bottleneck", 64, 16, 1, 3, 12), ("bottleneck", 32, 16, 2, 4, 13),
         ("basic", 16, 16, 1, 2, 8), ("basic", 8, 16, 2, 3, 9),
         ("preact", 16, 16, 1, 2, 8), ("preact_bottleneck", 64, 16, 1, 3, 12)]
IDS = ["bottleneck", "projection_bottleneck", "basic", "projection_basic", "preact",
       "preact_bottleneck"]


@pytest.mark.parametrize("kind,c_in,planes,stride,bns,budget", CASES, ids=IDS)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_train_step_launches(kind, c_in, planes, stride, bns, budget, cl):
    _, fus = make_pair(kind, c_in, planes, stride)
    x = torch.randn(2, c_in, 4, 4)
    if cl:
        fus = fus.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    fus(x.detach())  # first call: whatever a block caches is built outside the count
    y = fus(x)
    g = torch.randn_like(y)
    with _count() as fwd:
        y = fus(x)
    with _count() as bwd:
        y.backward(g)
    launches = fwd.launches + bwd.launches
    assert launches <= budget, f"{launches} Triton launches per train step (budget {budget})"
    # one statistics launch and at most one epilogue per BN forward; two per BN backward
    assert fwd.launches <= 2 * bns
    others = collections.Counter(_others(fwd.ops)) + collections.Counter(_others(bwd.ops))
    # at most the residual gradient's sum (added into the convolution's gradient, in
    # place) and the pre-activation block's forward add
    assert set(others) <= {"add", "add_"} and others["add"] + others["add_"] <= 2, dict(others)


@pytest.mark.parametrize("kind,c_in,planes,stride,bns,budget", CASES, ids=IDS)
def test_eval_launches(kind, c_in, planes, stride, bns, budget):
    """Eval: each BN's epilogue derives scale/shift itself, so one launch per fused
    epilogue and no torch op on the running statistics."""
    _, fus = make_pair(kind, c_in, planes, stride)
    fus.eval()
    x = torch.randn(2, c_in, 4, 4)
    with torch.no_grad():
        fus(x)
        with _count() as ev:
            fus(x)
    # post-activation: the projection BN rides in the last epilogue; pre-activation: its
    # last conv's output is added to the skip by ATen, as in eager PyTorch
    epilogues = bns - (1 if kind in ("bottleneck", "basic") and stride != 1 else 0)
    assert ev.launches == epilogues, f"{ev.launches} launches in eval, expected {epilogues}"
    others = _others(ev.ops)
    assert set(others) <= {"add"} and others.get("add", 0) <= 1, others
