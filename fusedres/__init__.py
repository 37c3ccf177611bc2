"""fusedres: Triton kernels that fuse batch norm, ReLU and the residual add of ResNet blocks
around cuDNN convolutions, checked against a plain-PyTorch reference."""
from . import ops, reference
from .api import benchmark, check_model
from .backend import backend_for, use_backend
from .batchnorm import FusedBatchNorm, fused_batch_norm
from .convert import convert, fused_blocks, revert, summary, why_not_fused
from .function import BlockSpec, BNSpec, ConvSpec, FusedResidualBlock
from .inference import fold_for_inference
from .plan import fused_residual_block
from .modules import (FusedBasicBlock, FusedBottleneck, FusedPreActBlock, FusedPreActBottleneck,
                      FusedSyncBatchNorm)

__version__ = "0.1.0"

__all__ = [
    "BNSpec", "BlockSpec", "ConvSpec", "FusedBasicBlock", "FusedBatchNorm", "FusedBottleneck",
    "FusedPreActBlock", "FusedPreActBottleneck", "FusedResidualBlock", "FusedSyncBatchNorm",
    "backend_for", "benchmark", "check_model", "convert", "fold_for_inference",
    "fused_batch_norm", "fused_blocks", "fused_residual_block", "ops", "reference", "revert",
    "summary", "use_backend", "why_not_fused",
]
