"""Tile and grid choice: pure, cached integer functions of shape, layout and device.

Every streaming kernel walks the samples of its tile in a ``tl.range(..., num_stages=
NUM_STAGES)`` loop, the only loop Triton software-pipelines: with cp.async it keeps
NUM_STAGES - 1 tiles of loads in flight per program, on top of the programs resident per
SM. Tiles, warps and stages are chosen so that every launch at a ResNet batch-norm site
keeps at least 32 KB of activation loads in flight per H100 SM at batch 256 (Little's
law at ~3.3 TB/s and ~0.7 us needs ~20 KB just to approach the copy rate); the compile
report (compile_check.py) measures it from the variants the JIT really builds.

The grid splits the batch into chunks of N_PER_PROG samples: reductions until about one
wave of resident programs fills the GPU (each program writes one partial the last program
merges, so fewer programs is less to merge), elementwise kernels until a few waves do.
Under TRITON_INTERPRET=1 every program instance costs a few milliseconds whatever its
size, so there the launchers take one large tile and the whole batch per program.

No Triton host call here: in triton 3.8 ``triton.cdiv``/``next_power_of_2`` are
ConstexprFunctions costing microseconds a call from Python.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

NUM_WARPS = 8
NUM_STAGES = 4                # cp.async buffers per loaded tensor: 3 tiles in flight
# Bytes per thread of one tensor's tile: one 16-byte vector access per thread and tensor
# per sample (8 bf16, 4 fp32, 2 fp64 elements), so every tile costs the same registers per
# byte and fp32 tiles leave room for more resident programs.
TILE_BYTES_PER_THREAD = 16
# Programs per SM the grid aims at: reductions one wave of what is resident (fewer
# partials), elementwise kernels a few waves (even tails).
PROGRAMS_PER_SM = {"stats": 3, "reduce": 3, "elementwise": 8}
# An explicit .maxnreg at the hardware limit: without one, ptxas sometimes caps a kernel at
# 64 registers and spills a few bytes rather than use the 92 it needs.
MAX_REGISTERS = 255
# Kernel arguments Triton's JIT must not specialise (16-divisibility, == 1): the batch, the
# samples per program and the number of partials change no address alignment, and each
# specialisation is one more variant to build at run time (and in the compile report).
SAMPLE_COUNTS = ("N", "N_PER_PROG", "P")
MERGE_ELEMENTS = 2048         # [BLOCK_P, BLOCK_C] partials the merging program loads at once
INTERPRET_TILE_ELEMENTS = 1 << 16


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: Read once: Triton itself reads TRITON_INTERPRET when it is imported.
INTERPRET = interpreting()
#: Whether the launchers take the interpreter's few large programs. Tests set it False to
#: run the GPU tiling (several partials and channel blocks) in the interpreter.
INTERPRET_TILES = INTERPRET


#: SMs of the GPU that meta tensors stand for (the compile report sets it per chip).
META_SMS = 132


class TileConfig(NamedTuple):
    BLOCK_C: int
    BLOCK_HW: int
    N_PER_PROG: int
    num_warps: int
    num_stages: int
    grid: tuple        # (position blocks x sample chunks, channel blocks)
    BLOCK_P: int       # partials the merging program loads at once (reductions)
    HW_VEC: int        # H*W is passed as H*W / HW_VEC (NCHW: the vector width rows allow)

    @property
    def num_programs(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_partials(self) -> int:
        return self.grid[0]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(x: int) -> int:
    """The smallest power of two >= max(x, 1)."""
    return 1 << (max(1, x) - 1).bit_length()


def _contiguous_width(length: int, widths=(256, 128, 64, 32, 16, 8)) -> int:
    """Tile width along the contiguous axis: the widest that wastes at most a quarter of
    its lanes on ``length`` (7x7 = 49 positions: 64), else the least wasteful."""
    def waste(w):
        return cdiv(length, w) * w - length
    for w in widths:
        if w <= pow2(length) and waste(w) * 4 <= cdiv(length, w) * w:
            return w
    return min(widths, key=lambda w: (waste(w), -w))


@functools.lru_cache(maxsize=4096)
def tile_config(N: int, C: int, HW: int, channels_last: bool, kind: str, num_sms: int,
                interpret: bool = False, itemsize: int = 2) -> TileConfig:
    """Pick the tile and grid for a [N, C, HW] activation.

    ``kind``: "stats" (statistics), "reduce" (backward sums) or "elementwise";
    ``itemsize``: bytes per stored element (the tile holds TILE_BYTES_PER_THREAD of them
    per thread). The contiguous axis (positions for NCHW,
    channels for channels_last) gets the wide side of the tile, at least 8 so the ReLU
    bits pack into whole bytes.
    """
    if kind not in PROGRAMS_PER_SM:
        raise ValueError(f"tile_config(kind): expected one of {tuple(PROGRAMS_PER_SM)}, "
                         f"got {kind!r}")
    if interpret:
        budget = INTERPRET_TILE_ELEMENTS
        if channels_last:
            block_c = max(8, min(pow2(C), budget // 8))
            block_hw = max(8, min(pow2(HW), budget // block_c))
        else:
            block_hw = max(8, min(pow2(HW), budget // 8))
            block_c = max(8, min(pow2(C), budget // block_hw))
        n_per_prog = max(1, N)
        stages = 1
    else:
        tile = TILE_BYTES_PER_THREAD // itemsize * 32 * NUM_WARPS
        if channels_last:
            block_c = _contiguous_width(C)
            block_hw = max(1, tile // block_c)
        else:
            block_hw = _contiguous_width(HW)
            block_c = max(1, tile // block_hw)
        base = max(1, cdiv(HW, block_hw) * cdiv(C, block_c))
        chunks = max(1, min(N, cdiv(PROGRAMS_PER_SM[kind] * num_sms, base)))
        n_per_prog = cdiv(max(N, 1), chunks)
        # Rows the compiler cannot vectorise (NCHW 7x7: 49 positions) load element by
        # element, an address register each: fewer programs fit, so more stages make up.
        vector = (C if channels_last else HW) % max(1, 8 // itemsize) == 0
        stages = NUM_STAGES if vector else NUM_STAGES + 2
    n_chunks = cdiv(max(N, 1), n_per_prog)
    grid = (cdiv(HW, block_hw) * n_chunks, cdiv(C, block_c))
    block_p = max(1, min(pow2(grid[0]), MERGE_ELEMENTS // block_c)) if kind != "elementwise" else 1
    # NCHW rows start at multiples of HW: the largest power of two (<= 16) dividing it lets
    # the compiler vectorise along positions; channels_last needs none (C is the stride).
    hw_vec = 1 if channels_last or HW == 0 else min(16, HW & -HW)
    return TileConfig(block_c, block_hw, n_per_prog, NUM_WARPS, stages, grid, block_p, hw_vec)


@functools.lru_cache(maxsize=256)
def finalize_config(C: int, R: int, interpret: bool = False) -> tuple:
    """(BLOCK_P, BLOCK_C, grid) of the kernel that merges R gathered moments per channel."""
    if interpret:
        block_c = max(2, min(pow2(C), 1024))
        return max(2, min(pow2(R), 1024)), block_c, (cdiv(C, block_c),)
    return 16, 128, (cdiv(C, 128),)
