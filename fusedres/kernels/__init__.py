"""Triton kernels and their launchers. Nothing else in fusedres imports triton.

The flat primitives below are the boundary: one launcher per op, beside its kernel
(stats.py, epilogue.py, backward.py)."""
from .backward import BoundBwd, bn_act_bwd, bn_act_bwd_apply, bn_act_bwd_reduce
from .config import TileConfig, interpreting, tile_config
from .epilogue import BoundFwd, bn_act_fwd
from .launch import LAUNCHES
from .stats import (BoundStats, bn_moments, bn_pool, bn_stats, bn_stats_from_moments,
                    bn_stats_pool)

__all__ = ["BoundBwd", "BoundFwd", "BoundStats", "LAUNCHES", "TileConfig", "bn_act_bwd", "bn_act_bwd_apply",
           "bn_act_bwd_reduce", "bn_act_fwd", "bn_moments", "bn_pool", "bn_stats",
           "bn_stats_from_moments", "bn_stats_pool", "interpreting", "tile_config"]
