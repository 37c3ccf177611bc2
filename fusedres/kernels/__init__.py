"""Triton kernels and their launchers. Nothing else in fusedres imports triton."""
from .config import TileConfig, interpreting, tile_config
from .launch import (LAUNCHES, bn_act_bwd, bn_act_bwd_apply, bn_act_bwd_reduce, bn_act_fwd,
                     bn_moments, bn_stats, bn_stats_from_moments)

__all__ = ["LAUNCHES", "TileConfig", "bn_act_bwd", "bn_act_bwd_apply", "bn_act_bwd_reduce",
           "bn_act_fwd", "bn_moments", "bn_stats", "bn_stats_from_moments", "interpreting",
           "tile_config"]
