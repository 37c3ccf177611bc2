"""Triton kernels and their launchers. Nothing else in fusedres imports triton."""
from .config import TileConfig, interpreting, tile_config
from .launch import LAUNCHES, bn_act_bwd, bn_act_fwd, bn_stats

__all__ = ["LAUNCHES", "TileConfig", "bn_act_bwd", "bn_act_fwd", "bn_stats", "interpreting",
           "tile_config"]
