"""Tile and grid choice: pure functions of shape, layout and device, so tests can check them.

On a GPU the grid must fill the chip for every ResNet shape: a reduction splits the batch
into chunks until there are at least ``REDUCE_PROGRAMS_PER_SM`` programs per SM, and the
elementwise kernels give each program one sample. Under TRITON_INTERPRET=1 every program
instance costs a few milliseconds whatever its size, so there the launchers take one large
tile and the whole batch per program.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import triton

TILE_ELEMENTS = 1024          # elements per tile on a GPU: 4 per thread at 8 warps
# The statistics kernel holds two accumulators per element and few registers otherwise:
# 16 elements per thread keep more bytes in flight in its loop over samples.
STATS_TILE_ELEMENTS = 4096
NUM_WARPS = 8
# An explicit .maxnreg at the hardware limit: without one, ptxas sometimes caps a kernel at
# 64 registers and spills a few bytes rather than use the 92 it needs.
MAX_REGISTERS = 255
REDUCE_PROGRAMS_PER_SM = 4    # reductions: enough programs in flight to hide latency
INTERPRET_TILE_ELEMENTS = 1 << 16


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class TileConfig:
    BLOCK_C: int
    BLOCK_HW: int
    N_PER_PROG: int
    num_warps: int
    grid: tuple[int, int]   # (position blocks x sample chunks, channel blocks)

    @property
    def num_programs(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_partials(self) -> int:
        return self.grid[0]


def _pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


def tile_config(N: int, C: int, HW: int, channels_last: bool, reduction: bool,
                num_sms: int, interpret: bool = False, fp64: bool = False,
                stats: bool = False) -> TileConfig:
    """Pick the tile and grid for a [N, C, HW] activation.

    ``reduction``: the kernel writes per-program partials (statistics, backward sums)
    rather than one output per element; ``stats``: the statistics kernel's larger tile.
    ``fp64``: half-size tiles (twice the registers per element). The contiguous axis (positions for NCHW, channels for channels_last)
    gets the wide side of the tile, at least 8 so the ReLU bits pack into whole bytes.
    """
    if interpret:
        budget = INTERPRET_TILE_ELEMENTS
        if channels_last:
            block_c = max(8, min(_pow2(C), budget // 8))
            block_hw = max(8, min(_pow2(HW), budget // block_c))
        else:
            block_hw = max(8, min(_pow2(HW), budget // 8))
            block_c = max(8, min(_pow2(C), budget // block_hw))
        n_per_prog = max(1, N)
    else:
        # A fixed menu of tiles (so the compile test can build every variant): the
        # contiguous side is 64 or 256 wide, and each tile holds TILE_ELEMENTS.
        tile = (STATS_TILE_ELEMENTS if stats else TILE_ELEMENTS) // (2 if fp64 else 1)
        if channels_last:
            block_c = 64 if C <= 64 else 256
            block_hw = tile // block_c
        else:
            block_hw = 64 if HW <= 64 else 256
            block_c = tile // block_hw
        n_per_prog = 1
        if reduction:
            base = triton.cdiv(HW, block_hw) * triton.cdiv(C, block_c)
            chunks = max(1, min(N, triton.cdiv(REDUCE_PROGRAMS_PER_SM * num_sms, base)))
            n_per_prog = triton.cdiv(max(N, 1), chunks)
    n_chunks = triton.cdiv(max(N, 1), n_per_prog)
    grid = (triton.cdiv(HW, block_hw) * n_chunks, triton.cdiv(C, block_c))
    return TileConfig(block_c, block_hw, n_per_prog, NUM_WARPS, grid)


def gpu_tiles(fp64: bool, stats: bool = False) -> tuple:
    """Every (CHANNELS_LAST, BLOCK_C, BLOCK_HW) tile_config can pick on a GPU."""
    tile = (STATS_TILE_ELEMENTS if stats else TILE_ELEMENTS) // (2 if fp64 else 1)
    return tuple((cl, c, tile // c) if cl else (cl, tile // hw, hw)
                 for cl in (False, True) for c, hw in ((64, 64), (256, 256)))


def finalize_config(C: int, P: int, interpret: bool = False) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) for the per-channel kernels that merge P partials."""
    if interpret:
        return max(2, min(_pow2(P), 1024)), max(2, min(_pow2(C), 1024))
    return 32, 64
