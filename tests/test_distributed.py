"""Synchronised batch norm across processes (fusedres.distributed) and DDP training.

Each multi-process test spawns its ranks on this machine with the gloo backend (a file
store, loopback only), runs them under a deadline and ends them itself. The ranks hold
different numbers of samples; every result is compared with the plain PyTorch block run in
one process on the concatenation of all ranks' batches, which is what nn.SyncBatchNorm
computes (nn.SyncBatchNorm itself refuses CPU tensors). Everything runs in float64 so that
the comparison can be tight (1e-9 of the largest value): in fp32 a pre-activation within
rounding of zero flips a ReLU on one side only and moves a gradient by O(1).

With TRITON_INTERPRET=1 the ranks run the Triton kernels in the interpreter; without it the
CPU ranks run the reference backend (the collectives are the same either way).
"""
from __future__ import annotations

import contextlib
import copy
import multiprocessing
import os
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fusedres
from checks import HAS_CUDA, INTERPRET, make_pair
from fusedres import distributed as D

DEADLINE_S = 110  # the budget is two minutes a test, start-up included


# --------------------------------------------------------------------------------------
# Running ranks
# --------------------------------------------------------------------------------------


def _rank_main(worker, rank, world, init, outdir, backend, args):
    try:
        torch.set_num_threads(1)
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
        try:
            worker(rank, world, *args)
        finally:
            dist.destroy_process_group()
        open(os.path.join(outdir, f"ok{rank}"), "w").close()
    except BaseException:
        with open(os.path.join(outdir, f"err{rank}"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_ranks(worker, world: int, *args, backend: str = "gloo", deadline: float = DEADLINE_S):
    """Run ``worker(rank, world, *args)`` in ``world`` spawned processes; fail with the
    first rank's traceback, or when the deadline passes (the ranks are then killed)."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        init = "file://" + os.path.join(d, "store")
        procs = [ctx.Process(target=_rank_main, args=(worker, r, world, init, d, backend, args),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline
        try:
            for p in procs:
                p.join(max(0.0, end - time.monotonic()))
        finally:
            late = [r for r, p in enumerate(procs) if p.is_alive()]
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        errors = []
        for r in range(world):
            path = os.path.join(d, f"err{r}")
            if os.path.exists(path):
                errors.append(f"rank {r}:\n" + open(path).read())
        assert not errors, "\n".join(errors)
        assert not late, f"ranks {late} still running after {deadline} s: killed"
        for r, p in enumerate(procs):
            assert p.exitcode == 0 and os.path.exists(os.path.join(d, f"ok{r}")), \
                f"rank {r} exited with {p.exitcode}"


# --------------------------------------------------------------------------------------
# Helpers the ranks use
# --------------------------------------------------------------------------------------


def _close(actual, expected, what):
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9 * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


class Collectives:
    """Counts the collectives fusedres issues (wraps torch.distributed's functions)."""

    NAMES = tuple(n for n in ("all_gather", "all_gather_into_tensor", "all_gather_single",
                              "all_reduce") if hasattr(dist, n))

    def __enter__(self):
        self.calls = {n: 0 for n in self.NAMES}
        self.saved = {n: getattr(dist, n) for n in self.NAMES}
        for n in self.NAMES:
            def counted(*a, _n=n, **k):
                self.calls[_n] += 1
                return self.saved[_n](*a, **k)
            setattr(dist, n, counted)
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(dist, n, f)

    @property
    def total(self):
        return sum(self.calls.values())


def _num_bns(block) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in block.modules())


def _pairs(ref, fus, what):
    """zip of two modules' named parameters or buffers, failing on any name mismatch."""
    a, b = list(getattr(ref, what)()), list(getattr(fus, what)())
    assert [n for n, _ in a] == [n for n, _ in b], what
    return [(n, x, y) for (n, x), (_, y) in zip(a, b)]


BLOCKS = [  # (kind, c_in, planes, stride, channels_last, backward all_reduces)
    ("basic", 6, 8, 2, False, 2),             # projection: its two BNs share one reduction
    ("bottleneck", 16, 4, 1, True, 3),         # identity shortcut, channels_last
    ("preact_bottleneck", 6, 4, 2, False, 3),  # pre-activation, its first BN on the input
]


def assert_rank_state(ref, fus, name):
    """This rank's parameter gradients, summed over the ranks, against the whole batch's
    (each rank's are its own: DDP reduces them), and the buffers (test_gate_blocks uses it)."""
    for n, pr, pf in _pairs(ref, fus, "named_parameters"):
        grad = pf.grad.clone()
        dist.all_reduce(grad)
        _close(grad, pr.grad, f"{name} {n}.grad summed over ranks")
    for n, br, bf in _pairs(ref, fus, "named_buffers"):
        if br.dtype == torch.long:
            assert torch.equal(br, bf), (name, n)
        else:
            _close(bf, br, f"{name} {n}")


def _block_worker(rank, world, sizes, convert_first, backend=None):
    """One block per kind: the fused synchronised block on this rank's slice against the
    plain block on the whole batch (every rank computes the reference itself)."""
    with fusedres.use_backend(backend) if backend else contextlib.nullcontext():
        assert fusedres.backend_for(torch.device("cpu")) == (
            backend or ("triton" if INTERPRET else "reference"))
        _block_cases(rank, world, sizes, convert_first)
    if INTERPRET and backend is None:  # the Triton kernels ran, not the reference
        from fusedres.kernels import LAUNCHES
        assert LAUNCHES["_bn_stats_finalize_kernel"] > 0
        assert LAUNCHES["_bn_act_bwd_apply_kernel"] > 0 or sizes[rank] == 0


def _block_cases(rank, world, sizes, convert_first):
    torch.set_default_dtype(torch.float64)
    offsets = [sum(sizes[:r]) for r in range(world + 1)]
    lo, hi = offsets[rank], offsets[rank + 1]
    for kind, c_in, planes, stride, cl, reductions in BLOCKS:
        ref, fus = make_pair(kind, c_in, planes, stride, seed=7)
        ref, fus = ref.double(), fus.double()
        if convert_first:  # fused block first, then SyncBatchNorm put into it
            fus = nn.SyncBatchNorm.convert_sync_batchnorm(fus)
        else:  # SyncBatchNorm first, then the block converted
            plain = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
            fus = fusedres.convert(plain)
            assert fusedres.fused_blocks(fus) == [""]
        assert all(type(m) in (nn.SyncBatchNorm, fusedres.FusedSyncBatchNorm)
                   for m in fus.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        torch.manual_seed(11)
        x = torch.randn(offsets[-1], c_in, 9, 8)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        xr = x.clone().requires_grad_()
        out = ref(xr)
        g = torch.randn_like(out)
        (out * g).sum().backward()

        xf = x[lo:hi].clone().requires_grad_()
        with Collectives() as calls:
            y = fus(xf)
            forward_calls = calls.total
            (y * g[lo:hi]).sum().backward()
        name = f"{kind} rank {rank}/{world} ({hi - lo} samples)"
        # one collective per BN in the forward, one per reduction pass in the backward
        assert forward_calls == _num_bns(fus), (name, calls.calls)
        assert calls.total - forward_calls == reductions, (name, calls.calls)
        _close(y, out[lo:hi], f"{name} output")
        _close(xf.grad, xr.grad[lo:hi], f"{name} x.grad")
        if cl and hi > lo:  # (an empty tensor is contiguous both ways; PyTorch's too)
            assert y.is_contiguous(memory_format=torch.channels_last)
        assert_rank_state(ref, fus, name)

        # eval mode: the running statistics, no collective
        fus.eval(), ref.eval()
        with Collectives() as calls, torch.no_grad():
            _close(fus(x[lo:hi]), ref(x)[lo:hi], f"{name} eval output")
        assert calls.total == 0, (name, calls.calls)


def _functional_worker(rank, world):
    """fused_residual_block(process_group=...) synchronises plain BatchNorm2d norms; a group
    of one rank synchronises nothing and issues no collective."""
    torch.set_default_dtype(torch.float64)
    singles = [dist.new_group([r]) for r in range(world)]  # every rank makes every group
    ref, fus = make_pair("basic", 4, 4, 1, seed=3)
    ref, fus = ref.double(), fus.double()
    torch.manual_seed(5)
    x = torch.randn(2 * world, 4, 6, 6)
    lo, hi = 2 * rank, 2 * rank + 2
    convs, norms = [fus.conv1, fus.conv2], [fus.bn1, fus.bn2]

    with Collectives() as calls:
        y = fusedres.fused_residual_block(x[lo:hi], convs, norms,
                                          process_group=dist.group.WORLD)
    assert calls.total == 2, calls.calls
    _close(y, ref(x)[lo:hi], "process_group=WORLD output")

    for group, what in ((singles[rank], "a one-rank group"),
                        (singles[1 - rank], "a group this rank is not in")):
        local = copy.deepcopy(ref)
        with Collectives() as calls:
            y = fusedres.fused_residual_block(x[lo:hi], convs, norms, process_group=group)
        assert calls.total == 0, (what, calls.calls)
        _close(y, local(x[lo:hi]), f"{what}: the block on this rank's batch")


def _compiled_worker(rank, world):
    """torch.compile (aot_eager, whole graph) of a synchronised fused block: the same as
    eager, the collectives included."""
    torch.set_default_dtype(torch.float64)
    _, fus = make_pair("basic", 6, 8, 2, seed=7)
    plain = copy.deepcopy(fus).double()
    fus = nn.SyncBatchNorm.convert_sync_batchnorm(fus.double())
    eager = copy.deepcopy(fus)
    compiled = torch.compile(fus, backend="aot_eager", fullgraph=True)
    torch.manual_seed(rank)
    x = torch.randn(2 + rank, 6, 9, 8)
    with torch.no_grad():  # the test has teeth: these ranks' own statistics give another y
        diff = (copy.deepcopy(eager)(x) - plain(x)).abs().max().item()
    assert diff > 1e-3, diff
    for step in range(2):
        y = compiled(x)  # (no Collectives() here: dynamo would trace the counting wrapper)
        y.sum().backward()
        ye = eager(x)
        ye.sum().backward()
        _close(y, ye, f"compiled vs eager, step {step}")
        for n, p, pe in _pairs(fus, eager, "named_parameters"):
            _close(p.grad, pe.grad, f"{n}.grad step {step}")
        for n, b, be in _pairs(fus, eager, "named_buffers"):
            if b.dtype != torch.long:
                _close(b, be, f"{n} step {step}")
    from torch._dynamo.utils import counters
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])


def _sgd_models(sync_first: bool):
    """(reference resnet18, the converted synchronised copy) with the same weights."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=5).double()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model = copy.deepcopy(ref)
    if sync_first:
        model = fusedres.convert(nn.SyncBatchNorm.convert_sync_batchnorm(model))
    else:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(fusedres.convert(model))
        # PyTorch's own SyncBatchNorm, now in the stem, refuses CPU tensors: convert again
        # to serve it (on a GPU it would run as it is)
        model = fusedres.convert(model)
    assert len(fusedres.fused_blocks(model)) == 8
    return ref, model


def _ddp_worker(rank, world, per_rank, steps):
    """2 DDP train steps of a converted resnet18 with synchronised norms, equal batches, in
    both orders of convert and convert_sync_batchnorm, against one process on the whole
    batch (DDP averages the ranks' gradients: the whole batch's mean loss)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(1)
    # 48x48 still leaves layer4 2x2 (64x64 did too, at twice the interpreter time)
    xs = [torch.randn(per_rank * world, 3, 48, 48) for _ in range(steps)]
    ys = [torch.randint(0, 5, (per_rank * world,)) for _ in range(steps)]
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    results = []
    for sync_first in (True, False):
        ref, model = _sgd_models(sync_first)
        ddp = DDP(model)
        opt_r = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
        opt_f = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        for step in range(steps):
            loss_r = nn.functional.cross_entropy(ref(xs[step]), ys[step])
            opt_r.zero_grad()
            loss_r.backward()
            opt_r.step()
            loss_f = nn.functional.cross_entropy(ddp(xs[step][lo:hi]), ys[step][lo:hi])
            opt_f.zero_grad()
            loss_f.backward()
            opt_f.step()
            total = loss_f.detach().clone()
            dist.all_reduce(total)
            _close(total / world, loss_r.detach(), f"loss step {step}")
        for n, pr, pf in _pairs(ref, model, "named_parameters"):
            _close(pf, pr, f"sync_first={sync_first} {n} after {steps} steps")
        for n, br, bf in _pairs(ref, model, "named_buffers"):
            if br.dtype == torch.long:
                assert torch.equal(br, bf), n
            else:
                _close(bf, br, f"sync_first={sync_first} {n} after {steps} steps")
        results.append(copy.deepcopy(model.state_dict()))
    for k, v in results[0].items():  # both orders: the same model
        torch.testing.assert_close(results[1][k], v, rtol=1e-12, atol=1e-12, msg=k)


def _cuda_case(kind, c_in, planes, stride, cl, rank):
    ref, fus = make_pair(kind, c_in, planes, stride, seed=7)
    torch.manual_seed(11 + rank)
    x = torch.randn(2 + rank, c_in, 9, 8, dtype=torch.float64, device="cuda")
    return ref, fus, x.contiguous(memory_format=torch.channels_last) if cl else x


def _cuda_worker(rank, world):
    """On one GPU: the fused synchronised block and FusedSyncBatchNorm against
    nn.SyncBatchNorm itself, in the same ranks (gloo carries CUDA tensors)."""
    torch.cuda.set_device(0)
    torch.backends.cudnn.allow_tf32 = False

    def compare(ref, fus, x, name):
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, y = ref(xr), fus(xf)
        g = torch.randn_like(out)
        (out * g).sum().backward()
        (y * g).sum().backward()
        _close(y, out, f"{name} output")
        _close(xf.grad, xr.grad, f"{name} x.grad")
        for n, pr, pf in _pairs(ref, fus, "named_parameters"):
            _close(pf.grad, pr.grad, f"{name} {n}.grad")
        for n, br, bf in _pairs(ref, fus, "named_buffers"):
            if br.dtype == torch.long:
                assert torch.equal(br, bf), (name, n)
            else:
                _close(bf, br, f"{name} {n}")

    for kind, c_in, planes, stride, cl, _ in BLOCKS:
        ref, fus, x = _cuda_case(kind, c_in, planes, stride, cl, rank)
        ref = nn.SyncBatchNorm.convert_sync_batchnorm(ref).double().cuda()
        fus = nn.SyncBatchNorm.convert_sync_batchnorm(fus).double().cuda()
        compare(ref, fus, x, kind)
    stem = nn.SyncBatchNorm(5).double().cuda()
    with torch.no_grad():
        stem.weight.uniform_(0.5, 1.5)
        stem.bias.uniform_(-0.5, 0.5)
    fstem = copy.deepcopy(stem)
    fstem.__class__ = fusedres.FusedSyncBatchNorm  # what convert() does to it
    torch.manual_seed(3 + rank)
    compare(stem, fstem, torch.randn(3 + rank, 5, 4, 4, dtype=torch.float64, device="cuda"),
            "FusedSyncBatchNorm")


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("world,sizes", [(2, (3, 1)), (3, (3, 0, 2))], ids=["2ranks", "3ranks"])
def test_sync_block_matches_whole_batch(world, sizes):
    # 2 ranks: SyncBatchNorm put into fused blocks; 3 ranks, one of them with no sample:
    # blocks converted after
    run_ranks(_block_worker, world, sizes, world == 2)


def test_sync_block_on_csrc_ref():
    """The same through the hand-written C++ primitives (built here first; the ranks load
    the build from cpp_extension's cache)."""
    import shutil
    from torch.utils import cpp_extension
    if shutil.which(os.environ.get("CXX", "c++")) is None or not cpp_extension.is_ninja_available():
        pytest.skip("cannot build csrc_ref: no C++ compiler or no ninja")
    from fusedres import csrc
    csrc.load(torch.device("cpu"))
    run_ranks(_block_worker, 2, (2, 3), False, "csrc_ref")


def test_sync_functional_process_group_and_one_rank_group():
    run_ranks(_functional_worker, 2)


def _sync_gate_worker(rank, world, sizes):
    """timm blocks with a squeeze-excite / ECA gate and nn.SyncBatchNorm, converted, on
    this rank's slice against the plain block on the whole batch: the gate pools per
    sample (bn_pool: the moments pass does not pool), the last BN's backward sums, the
    gate's share included, go over the ranks."""
    from timm.layers import EcaModule, SEModule
    from timm.models.resnet import BasicBlock, Bottleneck
    from test_convert import randomize
    torch.set_default_dtype(torch.float64)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    cases = {"basic+se, projection": lambda: BasicBlock(
                 6, 8, stride=2, attn_layer=SEModule, downsample=nn.Sequential(
                     nn.Conv2d(6, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))),
             "bottleneck+eca, identity": lambda: Bottleneck(16, 4, attn_layer=EcaModule)}
    for name, make in cases.items():
        torch.manual_seed(7)
        ref = randomize(make())
        fus = fusedres.convert(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref)))
        assert fusedres.fused_blocks(fus) == [""], name
        x = torch.randn(sum(sizes), ref.conv1.in_channels, 9, 8)
        xr = x.clone().requires_grad_()
        out = ref(xr)
        g = torch.randn_like(out)
        (out * g).sum().backward()
        xf = x[lo:hi].clone().requires_grad_()
        y = fus(xf)
        (y * g[lo:hi]).sum().backward()
        what = f"{name}, rank {rank}"
        _close(y, out[lo:hi], f"{what} output")
        _close(xf.grad, xr.grad[lo:hi], f"{what} x.grad")
        assert_rank_state(ref, fus, what)


def test_sync_gated_blocks_match_whole_batch():
    pytest.importorskip("timm")
    run_ranks(_sync_gate_worker, 2, (3, 1))


def test_sync_block_under_torch_compile():
    run_ranks(_compiled_worker, 2)


def test_ddp_resnet18_sync_trains_like_one_process():
    pytest.importorskip("torchvision")
    # 2 steps: the second already starts from DDP-averaged weights and SGD momentum
    run_ranks(_ddp_worker, 2, 2, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_sync_block_matches_syncbatchnorm_on_one_gpu():
    # compile the kernels here first: the ranks then find them in Triton's cache
    for kind, c_in, planes, stride, cl, _ in BLOCKS:
        _, fus, x = _cuda_case(kind, c_in, planes, stride, cl, 0)
        fus.double().cuda()(x.requires_grad_()).sum().backward()
    fusedres.fused_batch_norm(torch.randn(3, 5, 4, 4, dtype=torch.float64, device="cuda"),
                              nn.BatchNorm2d(5).double().cuda())
    run_ranks(_cuda_worker, 2)


# In-process checks: no process group is needed for these.


def test_mixed_norms_raise_and_are_left_unfused():
    _, fus = make_pair("basic", 4, 4, 1)
    fus.bn2 = nn.SyncBatchNorm(4)
    with pytest.raises(ValueError, match="all be nn.SyncBatchNorm or none"):
        fus(torch.randn(2, 4, 5, 5))
    torchvision = pytest.importorskip("torchvision")
    block = torchvision.models.resnet.BasicBlock(4, 4)
    block.bn2 = nn.SyncBatchNorm(4)
    with pytest.warns(UserWarning, match="all be nn.SyncBatchNorm or none"):
        fusedres.convert(nn.Sequential(block))
    assert not fusedres.fused_blocks(block)
    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))
    with pytest.warns(UserWarning, match=r"only its 1 SyncBatchNorm layer\(s\) became"):
        fusedres.convert(stem)
    assert type(stem[1]) is fusedres.FusedSyncBatchNorm


def test_without_a_process_group_syncbatchnorm_blocks_run_unsynchronised():
    """No torch.distributed: a converted SyncBatchNorm model computes what nn.SyncBatchNorm
    computes then (plain batch norm), and revert gives every class back."""
    torchvision = pytest.importorskip("torchvision")
    assert not dist.is_initialized()
    torch.manual_seed(0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(
        torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                         num_classes=4)).double()
    fused = fusedres.convert(copy.deepcopy(model))
    assert len(fusedres.fused_blocks(fused)) == 4
    assert type(fused.bn1) is fusedres.FusedSyncBatchNorm
    x = torch.randn(2, 3, 64, 64)
    _close(fused(x.double()), model(x.double()), "output")
    for (n, b), (_, bf) in zip(model.named_buffers(), fused.named_buffers()):
        if b.dtype != torch.long:
            _close(bf, b, n)
    fusedres.revert(fused)
    assert type(fused.bn1) is nn.SyncBatchNorm and not fusedres.fused_blocks(fused)
    assert D.block_group([fused.layer1[0].bn1, fused.layer1[0].bn2]) is None


def test_fused_batch_norm_matches_batch_norm():
    """The standalone fused BN (the stem's, synchronised or not) is batch norm."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).double()
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.5, 0.5)
    ref = copy.deepcopy(bn)
    x = torch.randn(3, 6, 5, 4, dtype=torch.float64)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, yr = fusedres.fused_batch_norm(xf, bn), ref(xr)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    _close(y, yr, "output")
    _close(xf.grad, xr.grad, "x.grad")
    _close(bn.weight.grad, ref.weight.grad, "weight.grad")
    _close(bn.bias.grad, ref.bias.grad, "bias.grad")
    _close(bn.running_var, ref.running_var, "running_var")
    bn.weight.grad = ref.weight.grad = None  # an input that needs no gradient: sums alone
    (fusedres.fused_batch_norm(x, bn) * g).sum().backward()
    (ref(x) * g).sum().backward()
    _close(bn.weight.grad, ref.weight.grad, "weight.grad, x without grad")
    with pytest.raises(ValueError, match="4-D"):
        fusedres.fused_batch_norm(x[0], bn)
