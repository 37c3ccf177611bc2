"""csrc_ref: the fused primitives hand-written in C++ (CPU, OpenMP) and CUDA.

``load(device)`` compiles the sources with torch.utils.cpp_extension on first use (cached
under TORCH_EXTENSIONS_DIR, rebuilt only when a source changes) and returns an object whose
``bn_stats``, ``bn_act_fwd`` and ``bn_act_bwd``, and the pieces synchronised batch norm runs
around its all-reduces (``bn_moments``, ``bn_stats_from_moments``, ``bn_act_bwd_reduce``,
``bn_act_bwd_apply``), take the arguments of fusedres.reference's functions and return the
same results, the gate primitives (squeeze-excite / ECA: ``bn_stats_pool``, ``bn_pool``, the
[N, C] factor, per-sample sums, du_add) included. The ops are registered with the dispatcher as
``torch.ops.fusedres_csrc_ref.*``: the CPU library defines them and carries the CPU kernels;
the CUDA library, built only for a CUDA device, adds the CUDA kernels.

The sources ship inside the package (``fusedres/csrc_ref`` in a wheel); in a source checkout
they are the repository's ``csrc_ref/`` folder.
"""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .reference import running_stats

__all__ = ["load", "source_dir"]

_NAMESPACE = "fusedres_csrc_ref"
_CPU_SOURCES = ("fused_bn_cpu.cpp",)
_CUDA_SOURCES = ("fused_bn_cuda.cu",)
_HEADERS = ("fused_bn.h",)

_lock = threading.Lock()
_built: set = set()   # "cpu", "cuda": libraries loaded into this process


def source_dir() -> Path:
    """Folder holding the C++/CUDA sources: inside the installed package, or the checkout's."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc_ref", here.parent / "csrc_ref"):
        if (cand / _CPU_SOURCES[0]).is_file():
            return cand
    raise RuntimeError(
        "fusedres csrc_ref: the C++ sources were not found (looked in "
        f"{here / 'csrc_ref'} and {here.parent / 'csrc_ref'}); reinstall fusedres from a "
        "wheel or a source checkout that includes csrc_ref/")


def _cpp_extension():
    try:
        from torch.utils import cpp_extension
    except ImportError as e:  # pragma: no cover - part of every torch build
        raise RuntimeError(f"fusedres csrc_ref needs torch.utils.cpp_extension: {e}") from e
    return cpp_extension


def _check_host_toolchain(cpp_extension) -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"fusedres csrc_ref: no C++ compiler found (looked for {cxx!r}; "
                           "install g++ or set CXX) to build the CPU extension")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("fusedres csrc_ref: torch.utils.cpp_extension needs ninja to build "
                           "the extension (pip install ninja)")


def _nvcc(cpp_extension) -> str:
    if torch.version.cuda is None:
        raise RuntimeError("fusedres csrc_ref: this torch build has no CUDA support "
                           f"(torch {torch.__version__}); the CUDA kernels cannot be built")
    home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    if not nvcc or not os.path.exists(nvcc):
        raise RuntimeError("fusedres csrc_ref: no CUDA toolkit found (nvcc; set CUDA_HOME) to "
                           "build the CUDA kernels")
    return nvcc


def _openmp_flags() -> tuple[list, list]:
    # torch's own CPU build uses OpenMP; without it the loops still run, on one thread.
    if os.environ.get("FUSEDRES_CSRC_NO_OPENMP"):
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def _build(kind: str, verbose: bool) -> None:
    ce = _cpp_extension()
    _check_host_toolchain(ce)
    src = source_dir()
    cflags, ldflags = _openmp_flags()
    common = dict(extra_cflags=["-O3", *cflags], extra_ldflags=ldflags,
                  extra_include_paths=[str(src)], is_python_module=False, verbose=verbose)
    if kind == "cpu":
        ce.load(name=f"{_NAMESPACE}_cpu", sources=[str(src / s) for s in _CPU_SOURCES], **common)
    else:
        _nvcc(ce)
        ce.load(name=f"{_NAMESPACE}_cuda", sources=[str(src / s) for s in _CUDA_SOURCES],
                extra_cuda_cflags=["-O3", "-lineinfo"], with_cuda=True, **common)


def load(device: Optional[torch.device] = None, verbose: bool = False) -> "CsrcOps":
    """Build (first call only) and load the extension for ``device``; returns the ops.

    The CPU library is always built; the CUDA one too when ``device`` is a CUDA device.
    Raises RuntimeError naming what is missing (a C++ compiler, ninja, nvcc, CUDA torch)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"fusedres csrc_ref runs on CPU and CUDA tensors, got {device}")
    kinds = ["cpu"] + (["cuda"] if device.type == "cuda" else [])
    with _lock:
        for kind in kinds:  # the CPU library first: it defines the ops the CUDA one extends
            if kind not in _built:
                _build(kind, verbose)
                _built.add(kind)
    return _OPS


class CsrcOps:
    """bn_stats / bn_act_fwd / bn_act_bwd and the synchronised-BN pieces over
    torch.ops.fusedres_csrc_ref, with fusedres.reference's signatures."""

    @staticmethod
    def _op(name: str):
        return getattr(getattr(torch.ops, _NAMESPACE), name)

    def bn_stats(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float):
        return torch.stack(self._op("bn_stats")(
            x, weight, bias, running_mean, running_var, num_batches_tracked,
            None if momentum is None else float(momentum), float(eps)))

    def bn_act_fwd(self, z: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                   weight: Optional[Tensor], bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], eps: float,
                   skip: Optional[Tensor], skip_scale: Optional[Tensor],
                   skip_shift: Optional[Tensor], skip_weight: Optional[Tensor],
                   skip_bias: Optional[Tensor], skip_running_mean: Optional[Tensor],
                   skip_running_var: Optional[Tensor], skip_eps: float, skip_norm: bool,
                   factor: Optional[Tensor], relu: bool, write_mask: bool):
        # eval mode: the extension takes scale and shift, derived here as the reference does
        sdt = torch.float64 if z.dtype == torch.float64 else torch.float32
        stats, skip_stats = z.new_empty((0,), dtype=sdt), z.new_empty((0,), dtype=sdt)
        if scale is None:
            stats = running_stats(weight, bias, running_mean, running_var, eps, sdt)
            scale, shift = stats[2], stats[3]
        if skip_norm and skip_scale is None:
            skip_stats = running_stats(skip_weight, skip_bias, skip_running_mean,
                                       skip_running_var, skip_eps, sdt)
            skip_scale, skip_shift = skip_stats[2], skip_stats[3]
        y, mask = self._op("bn_act_fwd")(z, scale, shift, skip,
                                         skip_scale if skip_norm else None,
                                         skip_shift if skip_norm else None,
                                         factor, bool(relu), bool(write_mask))
        return y, mask, stats, skip_stats

    def bn_act_bwd(self, dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
                   shift: Tensor, mask: Optional[Tensor], mask_mode: int,
                   factor: Optional[Tensor], skip_mode: int, zd: Optional[Tensor],
                   mean_d: Optional[Tensor], rstd_d: Optional[Tensor],
                   scale_d: Optional[Tensor], batch_stats: bool, batch_stats_d: bool,
                   need_sums: bool, dz_add: Optional[Tensor]):
        return tuple(self._op("bn_act_bwd")(
            dy, z, mean, rstd, scale, shift, mask, int(mask_mode), factor, int(skip_mode), zd,
            mean_d, rstd_d, scale_d, bool(batch_stats), bool(batch_stats_d), bool(need_sums),
            dz_add))

    def bn_stats_pool(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                      eps: float):
        *stats, pooled = self._op("bn_stats_pool")(
            x, weight, bias, running_mean, running_var, num_batches_tracked,
            None if momentum is None else float(momentum), float(eps))
        return torch.stack(stats), pooled

    def bn_pool(self, x: Tensor) -> Tensor:
        return self._op("bn_pool")(x)

    def bn_moments(self, x: Tensor) -> Tensor:
        return self._op("bn_moments")(x)

    def bn_stats_from_moments(self, moments: Tensor, weight: Optional[Tensor],
                              bias: Optional[Tensor], running_mean: Optional[Tensor],
                              running_var: Optional[Tensor],
                              num_batches_tracked: Optional[Tensor], momentum: Optional[float],
                              eps: float):
        return torch.stack(self._op("bn_stats_from_moments")(
            moments, weight, bias, running_mean, running_var, num_batches_tracked,
            None if momentum is None else float(momentum), float(eps)))

    def bn_act_bwd_reduce(self, dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor,
                          scale: Tensor, shift: Tensor, mask: Optional[Tensor], mask_mode: int,
                          factor: Optional[Tensor], skip_mode: int, zd: Optional[Tensor],
                          mean_d: Optional[Tensor], rstd_d: Optional[Tensor],
                          per_sample: bool = False) -> Tensor:
        return self._op("bn_act_bwd_reduce")(
            dy, z, mean, rstd, scale, shift, mask, int(mask_mode), factor, int(skip_mode), zd,
            mean_d, rstd_d, bool(per_sample))

    def bn_act_bwd_apply(self, dy: Tensor, z: Tensor, mean: Tensor, rstd: Tensor,
                         scale: Tensor, shift: Tensor, mask: Optional[Tensor], mask_mode: int,
                         factor: Optional[Tensor], skip_mode: int, zd: Optional[Tensor],
                         mean_d: Optional[Tensor], rstd_d: Optional[Tensor],
                         scale_d: Optional[Tensor], batch_stats: bool, batch_stats_d: bool,
                         dz_add: Optional[Tensor], mean_sums: Tensor,
                         du_add: Optional[Tensor] = None):
        return tuple(self._op("bn_act_bwd_apply")(
            dy, z, mean, rstd, scale, shift, mask, int(mask_mode), factor, int(skip_mode), zd,
            mean_d, rstd_d, scale_d, bool(batch_stats), bool(batch_stats_d), dz_add,
            mean_sums, du_add))


_OPS = CsrcOps()
