"""How fusedres addresses a 4-D activation; shared by every backend, depends on nothing."""
import torch


def is_channels_last(t: torch.Tensor) -> bool:
    """True when ``t`` is read as NHWC. A tensor contiguous both ways (H*W == 1 or C == 1)
    is addressed identically either way and counts as NCHW."""
    return (not t.is_contiguous()) and t.is_contiguous(memory_format=torch.channels_last)


def memory_format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def mask_shape(z: torch.Tensor) -> tuple:
    """Shape of the packed ReLU mask of ``z``: 8 elements a byte along the contiguous axis,
    [N, C, ceil(HW/8)] for NCHW and [N, HW, ceil(C/8)] for channels_last."""
    N, C, H, W = z.shape
    if is_channels_last(z):
        return (N, H * W, (C + 7) // 8)
    return (N, C, (H * W + 7) // 8)


def stats_dtype(t: torch.Tensor) -> torch.dtype:
    """Batch statistics are fp32, or fp64 for fp64 storage."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
