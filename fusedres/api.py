"""fusedres.check_model and fusedres.benchmark: is the fused model right, and is it faster?

Both take any model and an example input, work on copies (the model passed in is left as
it is) and return a result object: ``str(result)`` is the table ``python -m fusedres check``
and ``bench`` print, and the numbers are fields. The command line (fusedres/cli/) is a thin
layer over these two.

check_model converts a copy and runs one train step (forward, backward) and one eval
forward through the original and the fused model:

1. in float64, fused against PyTorch: outputs, every gradient, every running statistic
   must agree to 1e-9 of max|ref| (rounding never reaches a ReLU boundary in fp64, so this
   checks the whole model exactly). Where a training batch norm normalises fewer than 8
   values per channel it is ill-conditioned, rounding alone reaches ~1e-7 (ResNet-50 at
   2 values: 7e-8), and the limit is 1e-6: the result says so.
2. in the chosen dtype (fp32, or bf16/fp16 through autocast), fused and PyTorch both
   against the float64 model: the fused error in outputs and running statistics must be
   at most max(floor, 2 x PyTorch's own) (flash-attention's rule). Gradients are judged
   the same way on their norm over all parameters, but only warn: in low precision a
   pre-activation within rounding of zero flips a ReLU, and on small inputs that moves
   the gradients of a deep network by up to tens of percent, PyTorch's as much as ours.
   bf16 on a CPU: Triton's interpreter rounds fp32 -> bf16 by truncation where a GPU
   rounds to nearest even (fp16 rounds to nearest in both). There the limit also admits
   the error of the same computation with truncating rounding (the fused model on the
   reference backend, each of its fp32 -> bf16 casts truncated) plus PyTorch's own.

benchmark times eager, fused, and on request torch.compile and fused + torch.compile (and,
for inference, ``fusedres.fold_for_inference``'s model) on one input, on a CUDA GPU.
Without one it checks that the model converts and runs instead, and says so.
"""
from __future__ import annotations

import copy
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .backend import backend_for, use_backend
from .convert import Summary, convert, fused_blocks, revert, summary

__all__ = ["BenchResult", "BenchRow", "CheckResult", "CheckRow", "UsageError", "benchmark",
           "check_model"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Error floors relative to max|ref| for a whole model: ~15-50 batch norms of rounding.
FLOOR = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}
TOL64 = 1e-9
# Fewer values per channel than this in a training batch norm: float64 gets TOL64_FEW.
# Measured (resnet50, reference backend, worst gradient): 6.8e-8 at 2 values per channel,
# 3.5e-11 at 4, 4e-12 at 8 and at 16.
FEW_VALUES = 8
TOL64_FEW = 1e-6


class UsageError(ValueError):
    """A mistake in what was asked (an input the model cannot take, no GPU for a CUDA
    device, a bad backend name): the command line prints it and exits 2, no traceback."""


# --------------------------------------------------------------------------------------
# Progress on stderr
# --------------------------------------------------------------------------------------


class Progress:
    """Steps of a long job on stderr: a tqdm bar when tqdm is importable and stderr is a
    terminal, else one plain line per step; silent when not ``enabled`` (the API's
    default)."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self.enabled, self.desc, self.bar = enabled, desc, None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False,
                                dynamic_ncols=True, bar_format="{desc} [{n}/{total}, {elapsed}]")
            except ImportError:
                pass

    def step(self, what: str) -> None:
        """Announce the step that starts now (the previous one is done)."""
        if not self.enabled:
            return
        if self.bar is None:
            print(f"{self.desc}: {what} ...", file=sys.stderr, flush=True)
            return
        if self.bar.desc != self.desc:
            self.bar.update(1)
        self.bar.set_description(f"{self.desc}: {what}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def rel_err(result: Tensor, ref: Tensor) -> float:
    """max|result - ref| / max|ref|, in float64."""
    ref = ref.detach().double()
    scale = ref.abs().max().item() or 1.0
    return (result.detach().double() - ref).abs().max().item() / scale


def norm_err(results: dict, refs: dict) -> float:
    """||result - ref|| / ||ref|| over all the tensors together."""
    num = sum((results[n].double() - refs[n].double()).square().sum() for n in refs)
    den = sum(refs[n].double().square().sum() for n in refs)
    return (num / den).sqrt().item() if den > 0 else float(num > 0)


def _output_tensor(out: Any) -> Tensor:
    """The model's output, or the first tensor of a tuple/list output."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise UsageError(f"the model must return a tensor (or a tuple whose first item is one), "
                     f"got {type(out).__name__}")


class Run:
    """One model's train step and eval forward, and what they produced."""

    def __init__(self, model: nn.Module, x: Tensor, amp: Optional[torch.dtype], seed: int = 0):
        dev = x.device.type
        torch.manual_seed(seed)  # every run draws the same stochastic-depth samples
        model.train()
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=amp or torch.float32, enabled=amp is not None):
            out = _output_tensor(model(x))
        out.float().square().mean().backward()
        self.train_out = out.detach()
        self.grads = {n: p.grad.detach() for n, p in model.named_parameters()
                      if p.grad is not None}
        model.zero_grad(set_to_none=True)
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        model.eval()
        with torch.no_grad(), torch.autocast(dev, dtype=amp or torch.float32,
                                             enabled=amp is not None):
            self.eval_out = _output_tensor(model(x)).detach()


class CheckRow(NamedTuple):
    """One line of a check: the fused error, PyTorch's own (None in the float64 rows,
    which compare fused against PyTorch directly), the limit, the worst tensor, status
    ('ok', 'warn' or 'FAIL'), and on a CPU in bf16 the truncating computation's error."""
    what: str
    fused: float
    pytorch: Optional[float]
    limit: float
    worst: str
    status: str
    truncating: Optional[float] = None


def _worst(results: dict, refs: dict, names) -> tuple:
    errs = [(rel_err(results[n], refs[n]), n) for n in names if n in results]
    return max(errs) if errs else (0.0, "-")


def _stat_names(run: Run) -> list:
    return [n for n, b in run.buffers.items() if b.is_floating_point()]


def compare64(fused: Run, ref: Run, tol: float = TOL64) -> list:
    """CheckRows in float64, fused against PyTorch."""
    rows = [("train output", rel_err(fused.train_out, ref.train_out), ""),
            ("param grads (worst)", *_worst(fused.grads, ref.grads, ref.grads)),
            ("running stats (worst)", *_worst(fused.buffers, ref.buffers, _stat_names(ref))),
            ("eval output", rel_err(fused.eval_out, ref.eval_out), "")]
    out = [CheckRow(what, f, None, tol, worst, "ok" if f <= tol else "FAIL")
           for what, f, worst in rows]
    same = all(torch.equal(fused.buffers[n], t) for n, t in ref.buffers.items()
               if not t.is_floating_point())
    out.append(CheckRow("num_batches_tracked", 0.0 if same else 1.0, None, 0.0, "",
                        "ok" if same else "FAIL"))
    return out


def compare_dtype(fused: Run, torch_run: Run, ref: Run, floor: float,
                  truncating: Optional[Run] = None) -> list:
    """CheckRows at the checked dtype, fused and PyTorch against float64; with a
    ``truncating`` run the limit also admits its error plus PyTorch's."""
    rows = []
    stats = _stat_names(ref)

    def row(what, of: Callable[[Run], float], worst="", soft=False):
        f, t = of(fused), of(torch_run)
        tr = of(truncating) if truncating is not None else None
        limit = max(floor, 2.0 * t, (tr + t) if tr is not None else 0.0)
        status = "ok" if f <= limit else ("warn" if soft else "FAIL")
        rows.append(CheckRow(what, f, t, limit, worst, status, tr))

    row("train output", lambda r: rel_err(r.train_out, ref.train_out))
    row("running stats (worst)", lambda r: _worst(r.buffers, ref.buffers, stats)[0],
        _worst(fused.buffers, ref.buffers, stats)[1])
    row("eval output", lambda r: rel_err(r.eval_out, ref.eval_out))
    row("param grads (norm)", lambda r: norm_err(r.grads, ref.grads), soft=True)
    return rows


# --------------------------------------------------------------------------------------
# Truncating bf16 rounding: what Triton's interpreter does, emulated in PyTorch
# --------------------------------------------------------------------------------------


def truncate_to_bf16(t: Tensor) -> Tensor:
    """fp32 -> bf16 rounding toward zero (the low 16 bits dropped), as Triton's interpreter
    rounds; PyTorch and GPUs round to nearest even."""
    bits = t.contiguous().view(torch.int32) & -65536
    return bits.view(torch.float32).to(torch.bfloat16).view(t.shape)  # exact after the mask


class TruncatingBF16(TorchFunctionMode):
    """Inside it, ``Tensor.to`` and ``Tensor.copy_`` from fp32 to bf16 truncate.

    The fused primitives of the reference backend compute in fp32 and cast their results
    to the storage dtype with these calls, where the Triton kernels store theirs; parameters
    and the ``exempt`` tensors (the model input) keep PyTorch's rounding, as the casts
    autocast makes for the convolutions do (those run in C++, unseen by this mode)."""

    def __init__(self, exempt: Sequence[Tensor] = ()):
        super().__init__()
        self._exempt = {id(t) for t in exempt}

    def _truncates(self, src: Any, target: Optional[torch.dtype]) -> bool:
        return (isinstance(src, Tensor) and src.dtype == torch.float32
                and target == torch.bfloat16 and not isinstance(src, nn.Parameter)
                and id(src) not in self._exempt)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is Tensor.to and args:
            target = kwargs.get("dtype")
            for a in args[1:]:
                target = a if isinstance(a, torch.dtype) else (
                    a.dtype if isinstance(a, Tensor) else target)
            if self._truncates(args[0], target):
                return func(truncate_to_bf16(args[0]), *args[1:], **kwargs)
        if func is Tensor.copy_ and len(args) >= 2 and isinstance(args[0], Tensor):
            if self._truncates(args[1], args[0].dtype):
                return func(args[0], truncate_to_bf16(args[1]), *args[2:], **kwargs)
        return func(*args, **kwargs)


def truncating_run(fused: nn.Module, x: Tensor, seed: int = 0) -> Run:
    """The bf16 autocast Run of ``fused`` on the reference backend with truncating fp32 ->
    bf16 casts: the computation Triton's interpreter makes, in PyTorch."""
    with use_backend("reference"), TruncatingBF16(exempt=[x]):
        return Run(fused, x, torch.bfloat16, seed)


# --------------------------------------------------------------------------------------
# check_model
# --------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _backend(device: torch.device) -> str:
    try:
        return backend_for(device)
    except (ValueError, RuntimeError) as e:  # FUSEDRES_BACKEND misspelt, triton on a CPU
        raise UsageError(str(e)) from None


def backend_line(device: torch.device) -> str:
    """Which implementation the fused ops run on ``device``, in words."""
    name = _backend(device)
    if name == "triton":
        how = ("Triton kernels in Triton's interpreter (TRITON_INTERPRET=1)"
               if device.type != "cuda" and _interpreting()
               else "Triton kernels compiled for the GPU")
    elif name == "reference":
        how = ("the plain-PyTorch reference, not the Triton kernels (set TRITON_INTERPRET=1 "
               "to run them on the CPU)")
    else:
        how = "the hand-written C++/CUDA reference (csrc_ref)"
    return f"backend checked: {name}: {how}"


def _device_line(device: torch.device) -> str:
    if device.type == "cuda":
        tf32 = torch.backends.cudnn.allow_tf32
        return (f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
                f"TF32 convolutions {'on' if tf32 else 'off'} (both models alike)")
    return f"device: CPU, no CUDA GPU in use; torch {torch.__version__}"


def _is_batch_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def values_per_channel(model: nn.Module, x: Tensor) -> tuple:
    """(fewest values per channel any batch norm of ``model`` normalises for input ``x``,
    that norm's name); one eval forward without gradients. (None, "") without a batch
    norm. UsageError when the model cannot take ``x`` at all."""
    fewest: list = [None, ""]
    hooks = []
    for name, m in model.named_modules():
        if _is_batch_norm(m):
            def hook(mod, args, name=name):
                count = args[0].numel() // max(1, args[0].shape[1])
                if fewest[0] is None or count < fewest[0]:
                    fewest[:] = [count, name]
            hooks.append(m.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"the model does not run on an input of shape {tuple(x.shape)}: "
                         f"{str(e).splitlines()[0]}") from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return tuple(fewest)


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UsageError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if dtype not in FLOOR:
        raise UsageError(f"dtype must be one of torch.float32, torch.bfloat16, "
                         f"torch.float16, got {dtype}")
    return dtype


def _check_input(example_input: Any) -> Tensor:
    if not isinstance(example_input, Tensor) or not example_input.is_floating_point():
        raise UsageError("example_input must be a floating-point tensor [N, C, H, W], got "
                         f"{type(example_input).__name__}")
    if example_input.dim() != 4:
        raise UsageError(f"example_input must be 4-D [N, C, H, W], got shape "
                         f"{tuple(example_input.shape)}")
    if example_input.shape[0] < 1 or example_input.numel() == 0:
        raise UsageError(f"example_input must hold at least one sample, got shape "
                         f"{tuple(example_input.shape)}")
    return example_input


def _original(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` (reverted if it holds fused blocks)."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return revert(copy.deepcopy(model)) if fused_blocks(model) else copy.deepcopy(model)


def _converted(original: nn.Module) -> nn.Module:
    import warnings
    with warnings.catch_warnings():  # the summary says what is left unfused, and why
        warnings.simplefilter("ignore", UserWarning)
        return convert(copy.deepcopy(original))


@dataclass
class CheckResult:
    """What check_model found; ``str()`` is the report ``python -m fusedres check`` prints.

    ``status`` is 'PASS', 'FAIL' or 'NOTHING FUSED' (no block of the model is one fusedres
    fuses: nothing to compare); ``passed`` is False only for 'FAIL'."""
    model: str
    input_shape: tuple
    dtype: str
    channels_last: bool
    device: str
    backend: str
    summary: Summary
    rows64: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    tol64: float = TOL64
    notes: list = field(default_factory=list)
    header: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def status(self) -> str:
        if self.summary.num_fused == 0:
            return "NOTHING FUSED"
        return "FAIL" if any(r.status == "FAIL" for r in self.rows64 + self.rows) else "PASS"

    @property
    def passed(self) -> bool:
        return self.status != "FAIL"

    @staticmethod
    def _table(rows: list) -> list:
        trunc = any(r.truncating is not None for r in rows)
        head = (f"  {'check':<24}{'fused':>10}{'pytorch':>10}"
                + (f"{'truncating':>12}" if trunc else "") + f"{'limit':>10}  status  worst tensor")
        lines = [head]
        for r in rows:
            t = "-" if r.pytorch is None else f"{r.pytorch:.2e}"
            tr = "" if not trunc else (
                f"{r.truncating:>12.2e}" if r.truncating is not None else f"{'-':>12}")
            lines.append(f"  {r.what:<24}{r.fused:>10.2e}{t:>10}{tr}{r.limit:>10.2e}  "
                         f"{r.status:<7} {r.worst}".rstrip())
        return lines

    def __str__(self) -> str:
        n, c, h, w = self.input_shape
        lines = [f"fusedres check: {self.model}, batch {n}, {c}x{h}x{w}, {self.dtype}"
                 f"{' (autocast)' if self.dtype != 'float32' else ''}, "
                 f"{'channels_last' if self.channels_last else 'NCHW'}", *self.header,
                 f"blocks fused: {self.summary.num_fused} of {self.summary.num_blocks}"]
        if self.summary.unfused or self.summary.unknown:
            lines.append(str(self.summary))
        if self.status == "NOTHING FUSED":
            lines.append("nothing to check: fusedres fuses none of this model's blocks, so "
                         "the converted model is the original (see the line above)")
            return "\n".join(lines)
        lines += [f"note: {note}" for note in self.notes]
        lines.append(f"errors: max|x - ref| / max|ref| per tensor ({self.seconds:.1f} s)")
        if self.rows64:
            lines.append(f"float64, fused against PyTorch (limit {self.tol64:g}):")
            lines += self._table(self.rows64)
        dt = DTYPES[self.dtype]
        trunc = any(r.truncating is not None for r in self.rows)
        lines.append(f"{self.dtype}, fused and PyTorch against float64 (limit max({FLOOR[dt]:g}, "
                     "2 x PyTorch's" + (", truncating + PyTorch's" if trunc else "")
                     + "); gradients only warn):")
        lines += self._table(self.rows)
        lines.append("PASS" if self.status == "PASS" else "FAIL: fused errors exceed the limits")
        return "\n".join(lines)


def check_model(model: nn.Module, example_input: Tensor, *, dtype="float32",
                channels_last: bool = False, seed: int = 0, float64: bool = True,
                name: Optional[str] = None, progress: bool = False) -> CheckResult:
    """Convert a copy of ``model`` and check it against the original on ``example_input``.

    One train step (forward, backward of mean(out²)) and one eval forward, in float64 and
    in ``dtype`` ('float32', or 'bfloat16'/'float16' through torch.autocast; a torch.dtype
    works too): see the module docstring for what is compared and the limits. The model
    runs on ``example_input``'s device; ``model`` itself is not modified. ``float64=False``
    leaves the float64 rows out (their fused run is the slow one on a CPU). ``progress``:
    report the steps on stderr. Raises UsageError for an input the model cannot take, a
    training batch norm left with one value per channel, or a bad backend setting."""
    x = _check_input(example_input)
    dt = _as_dtype(dtype)
    dtype_name = next(k for k, v in DTYPES.items() if v == dt)
    amp = None if dt == torch.float32 else dt
    device = x.device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    backend = _backend(device)
    header = [_device_line(device), backend_line(device)]
    original = _original(model).to(device=device, memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    fewest, where = values_per_channel(original, x.float())
    fused = _converted(original)
    result = CheckResult(name or type(model).__name__, tuple(x.shape), dtype_name,
                         channels_last, str(device), backend, summary(fused), header=header)
    if result.summary.num_fused == 0:
        return result
    if fewest is not None and fewest < 2:
        raise UsageError(f"batch norm {where} would normalise {fewest} value per channel in "
                         f"training (input {tuple(x.shape)}): PyTorch needs more than 1; use a "
                         "larger batch or image")
    if fewest is not None and fewest < FEW_VALUES:
        result.tol64 = TOL64_FEW
        result.notes.append(
            f"batch norm {where} normalises only {fewest} values per channel; below "
            f"{FEW_VALUES} batch norm is ill-conditioned and float64 rounding alone reaches "
            f"~1e-7, so the float64 limit is {TOL64_FEW:g} instead of {TOL64:g} (a larger "
            "batch or image restores it)")
    truncate = (amp == torch.bfloat16 and device.type == "cpu" and backend == "triton"
                and _interpreting())
    if truncate:
        result.notes.append(
            "bf16 on the CPU: Triton's interpreter rounds fp32 -> bf16 by truncation where a "
            "GPU rounds to nearest even, so the limit also admits the error of the same "
            "computation with truncating rounding (column 'truncating': the fused model on "
            "the reference backend, each fp32 -> bf16 cast of its fused ops truncated) plus "
            "PyTorch's")
    steps = Progress(progress, 3 + float64 + truncate, f"fusedres check {result.model}")
    t0 = time.perf_counter()
    try:
        fused_lowp, fused_trunc = copy.deepcopy(fused), copy.deepcopy(fused) if truncate else None
        steps.step("float64 PyTorch")
        ref = Run(copy.deepcopy(original).double(), x.double(), None, seed)
        if float64:
            steps.step("float64 fused")
            fused64 = Run(copy.deepcopy(fused).double(), x.double(), None, seed)
            result.rows64 = compare64(fused64, ref, result.tol64)
        steps.step(f"{dtype_name} fused")
        fused_run = Run(fused_lowp, x, amp, seed)
        steps.step(f"{dtype_name} PyTorch")
        torch_run = Run(original, x, amp, seed)
        trunc_run = None
        if truncate:
            steps.step("bf16 truncating reference")
            trunc_run = truncating_run(fused_trunc, x, seed)
        result.rows = compare_dtype(fused_run, torch_run, ref, FLOOR[dt], trunc_run)
    finally:
        steps.close()
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------------------
# benchmark
# --------------------------------------------------------------------------------------

PRECISIONS = ("float32", "float16", "bfloat16", "amp")
BENCH_MODES = {"inference": ("inference",), "train": ("train_step",),
               "both": ("train_step", "inference")}


class BenchRow(NamedTuple):
    """One provider in one mode: median ms per step, samples/s, peak memory (MiB allocated
    during the timed steps, model and inputs included), speed ratio to eager."""
    provider: str
    mode: str
    ms_per_step: float
    samples_per_s: float
    peak_mem_mb: float
    vs_eager: Optional[float]


@dataclass
class BenchResult:
    """What benchmark measured; ``str()`` is the table, ``to_json()`` the results file
    (pytest-benchmark's layout, which bench/report.py reads). Without CUDA ``measured``
    is False, ``rows`` is empty and ``smoke`` says what ran instead."""
    model: str
    input_shape: tuple
    precision: str
    channels_last: bool
    device: str
    summary: Summary
    measured: bool
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    smoke: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    warmup: int = 0
    iters: int = 0

    def row(self, provider: str, mode: str) -> Optional[BenchRow]:
        return next((r for r in self.rows if r.provider == provider and r.mode == mode), None)

    def __str__(self) -> str:
        n, c, h, w = self.input_shape
        layout = "channels_last" if self.channels_last else "NCHW"
        lines = [f"fusedres bench: {self.model}, batch {n}, {c}x{h}x{w}, {self.precision}, "
                 f"{layout}", f"blocks fused: {self.summary.num_fused} of "
                 f"{self.summary.num_blocks}"]
        if self.summary.unfused or self.summary.unknown:
            lines.append(str(self.summary))
        if not self.measured:
            lines.append("GPU throughput needs a CUDA GPU: there is none here, so nothing was "
                         "timed. Checked instead that the model converts and runs:")
            lines += [f"  {s}" for s in self.smoke]
            lines += [f"note: {note}" for note in self.notes]
            return "\n".join(lines)
        e = self.env
        lines.append(f"device: {e.get('card')}; torch {e.get('torch')}, triton "
                     f"{e.get('triton')}, cuDNN {e.get('cudnn')}; {e.get('date')}")
        lines.append(f"median of {self.iters} steps after {self.warmup} warm-up steps "
                     "(torch.compile compiles in its warm-up); peak = max memory allocated "
                     "while timing")
        lines.append(f"  {'provider':<16}{'mode':<12}{'samples/s':>12}{'ms/step':>10}"
                     f"{'peak MiB':>10}{'vs eager':>10}")
        for r in self.rows:
            ratio = "-" if r.vs_eager is None else f"{r.vs_eager:.2f}x"
            lines.append(f"  {r.provider:<16}{r.mode:<12}{r.samples_per_s:>12.1f}"
                         f"{r.ms_per_step:>10.2f}{r.peak_mem_mb:>10.0f}{ratio:>10}")
        for mode in dict.fromkeys(r.mode for r in self.rows):
            fc, cc = self.row("fused+compile", mode), self.row("torch.compile", mode)
            if fc and cc:
                lines.append(f"  {mode}: fused+compile / torch.compile "
                             f"{cc.ms_per_step / fc.ms_per_step:.2f}x")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict:
        """pytest-benchmark's layout: ``machine_info.fusedres`` and one entry per row with
        the numbers in ``extra_info`` (kind 'model'), as bench/report.py reads them."""
        names = {"torch.compile": "compile", "fused+compile": "fused_compile"}
        n, c, h, w = self.input_shape
        entries = []
        for r in self.rows:
            provider = names.get(r.provider, r.provider)
            dtype = _json_dtype(self.precision)
            layout = "cl" if self.channels_last else "nchw"
            name = f"bench[{self.model}-{r.mode}-{dtype}-{layout}-N{n}-{provider}]"
            entries.append({"name": name, "fullname": f"python -m fusedres bench::{name}",
                            "extra_info": {**self.env, "kind": "model", "case": self.model,
                                           "mode": r.mode, "dtype": dtype, "layout": layout,
                                           "batch": n, "image": h, "provider": provider,
                                           "median_ms": r.ms_per_step,
                                           "images_per_s": r.samples_per_s,
                                           "peak_mem_mb": r.peak_mem_mb,
                                           "rounds": self.iters}})
        return {"machine_info": {"fusedres": dict(self.env)}, "benchmarks": entries}


def _json_dtype(precision: str) -> str:
    # bench/bench_models.py's names: amp is bf16 autocast there
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "amp": "amp",
            "amp-float16": "amp-fp16"}.get(precision, precision)


def env_info(device: torch.device) -> dict:
    """Card, versions, date and commit: stored with every benchmark result."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    card = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    from . import __version__
    return {"device": device.type, "card": card, "torch": torch.__version__,
            "triton": triton_version, "cudnn": str(cudnn) if cudnn else None,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "profile": "python -m fusedres bench", "fusedres": __version__,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


def _loss(out: Tensor) -> Tensor:
    out = out.float()
    if out.dim() == 2:  # a classifier: cross-entropy against random labels, as timm does
        target = torch.randint(0, out.shape[1], (out.shape[0],), device=out.device,
                               generator=None)
        return nn.functional.cross_entropy(out, target)
    return out.square().mean()


def _steps(model: nn.Module, x: Tensor, mode: str, autocast: Optional[torch.dtype]):
    """The function one timed step calls."""
    dev = x.device.type
    ctx = lambda: torch.autocast(dev, dtype=autocast or torch.float32,  # noqa: E731
                                 enabled=autocast is not None)
    if mode == "inference":
        model.eval()

        def infer():
            with torch.no_grad(), ctx():
                model(x)
        return infer
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = _loss(_output_tensor(model(x)))
        loss.backward()
        opt.step()
    return train_step


def _time_cuda(fn: Callable[[], None], warmup: int, iters: int) -> tuple:
    """(median ms per call over ``iters`` CUDA-event-timed calls after ``warmup``, peak
    MiB allocated during them)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**20


def _providers(original: nn.Module, mode: str, torchcompile: Optional[str],
               folded: bool) -> dict:
    """name -> a zero-argument builder of that provider's model (built when timed, so one
    provider's memory is freed before the next)."""
    out = {"eager": lambda: copy.deepcopy(original), "fused": lambda: _converted(original)}
    if torchcompile:
        out["torch.compile"] = lambda: torch.compile(copy.deepcopy(original), backend=torchcompile)
        out["fused+compile"] = lambda: torch.compile(_converted(original), backend=torchcompile)
    if folded and mode == "inference":
        from .inference import fold_for_inference

        def build_folded():
            return fold_for_inference(copy.deepcopy(original).eval())
        out["folded"] = build_folded
    return out


def _smoke(original: nn.Module, x: Tensor, modes: Sequence[str],
           autocast: Optional[torch.dtype]) -> list:
    """Without a GPU: one step of each mode through the fused model; what it gave."""
    fused = _converted(original)
    lines = []
    for mode in modes:
        t0 = time.perf_counter()
        _steps(fused, x, mode, autocast)()
        what = ("one eval forward" if mode == "inference"
                else "one train step (forward, backward, SGD)")
        lines.append(f"{what} of the fused model on {tuple(x.shape)} on the CPU "
                     f"({backend_for(x.device)} backend): ran, {time.perf_counter() - t0:.1f} s")
    return lines


def benchmark(model: nn.Module, example_input: Tensor, *, bench: str = "both",
              precision: str = "float32", amp_dtype: torch.dtype = torch.float16,
              channels_last: bool = False, torchcompile: Optional[str] = None,
              folded: bool = True, warmup: int = 10, iters: int = 40,
              name: Optional[str] = None, progress: bool = False) -> BenchResult:
    """Time eager and fused (and with ``torchcompile``, a torch.compile backend name such as
    'inductor', torch.compile and fused + torch.compile; with ``folded``, the model after
    fusedres.fold_for_inference, inference only) on ``example_input``.

    timm benchmark.py's meanings: ``bench`` 'inference', 'train' or 'both'; ``precision``
    'float32', 'float16', 'bfloat16' (model and input in that dtype) or 'amp' (autocast to
    ``amp_dtype``). Every provider starts from a copy of ``model`` and times the same input;
    ``model`` is not modified. A train step is forward, cross-entropy against random labels
    (mean square for a non-classifier), backward and an SGD step. Without CUDA (an input on
    the CPU) nothing is timed: one step of each mode runs through the fused model instead."""
    x = _check_input(example_input)
    if bench not in BENCH_MODES:
        raise UsageError(f"bench must be one of {sorted(BENCH_MODES)}, got {bench!r}")
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if warmup < 0 or iters < 1:
        raise UsageError(f"warmup must be >= 0 and iters >= 1, got {warmup} and {iters}")
    device = x.device
    _backend(device)
    autocast = amp_dtype if precision == "amp" else None
    data_dtype = DTYPES.get(precision, torch.float32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    original = _original(model).to(device=device, dtype=data_dtype, memory_format=fmt)
    x = x.to(dtype=data_dtype).contiguous(memory_format=fmt)
    modes = BENCH_MODES[bench]
    if "train_step" in modes:
        fewest, where = values_per_channel(original, x)
        if fewest is not None and fewest < 2:
            raise UsageError(f"batch norm {where} would normalise {fewest} value per channel "
                             f"in training (input {tuple(x.shape)}): PyTorch needs more than "
                             "1; use a larger batch or image, or bench inference only")
    label = precision if precision != "amp" else (
        "amp" if amp_dtype == torch.bfloat16 else "amp-float16")
    result = BenchResult(name or type(model).__name__, tuple(x.shape), label, channels_last,
                         str(device), summary(_converted(original)), device.type == "cuda",
                         env=env_info(device), warmup=warmup, iters=iters)
    if result.summary.num_fused == 0:
        result.notes.append("no block of this model is one fusedres fuses: 'fused' is the "
                            "original model")
    if device.type != "cuda":
        steps = Progress(progress, 1, f"fusedres bench {result.model}")
        steps.step("one step of each mode on the CPU")
        try:
            result.smoke = _smoke(original, x, modes, autocast)
        finally:
            steps.close()
        return result
    plan = [(mode, p, build) for mode in modes for p, build in
            _providers(original, mode, torchcompile, folded).items()]
    steps = Progress(progress, len(plan), f"fusedres bench {result.model}")
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as timm's benchmark.py; put back afterwards
    result.env["cudnn_benchmark"] = True
    try:
        for mode, provider, build in plan:
            steps.step(f"{provider} {mode}")
            m = build()
            ms, peak = _time_cuda(_steps(m, x, mode, autocast), warmup, iters)
            del m
            gc.collect()  # compiled models hold reference cycles: free one before the next
            torch.cuda.empty_cache()
            eager = result.row("eager", mode)
            result.rows.append(BenchRow(provider, mode, ms, x.shape[0] / (ms / 1e3), peak,
                                        eager.ms_per_step / ms if eager else None))
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        steps.close()
    return result
