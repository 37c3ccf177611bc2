"""``python -m fusedres degradation`` and ``python -m fusedres lesion``: the residual idea at work.

*degradation* (He et al. 2016, fig. 1 and 6): CIFAR-style networks of 6n+2 layers (a 3x3
stem conv, three stages of n two-conv blocks with 16/32/64 channels, global average pool,
linear classifier) are trained twice from the same seed: once with residual blocks
(``fusedres.FusedBasicBlock``, or ``FusedPreActBlock`` with ``--preact``) and once as a
*plain* network built of the same blocks with the skip removed. A deeper plain network
trains worse than a shallower one; a deeper residual network does not.

*lesion* (Veit et al. 2016): removes one block at a time from the trained networks and
measures the test error. A residual block removed leaves its input to flow on through the
skip, so the network barely notices; a plain network loses a layer of its one path.

The data set is drawn in code (``make_dataset``): ten classes of shapes and stripe textures
with random position, size, colour and noise, so nothing is downloaded and every run sees
the same images. Seeds are fixed: the same command on the same machine prints the same
table.

Which code runs: residual and plain blocks alike run the fused primitives (the plain ones
through the epilogue's no-skip path), i.e. the Triton kernels on CUDA and the plain-PyTorch
reference backend on a CPU (``fusedres.backend_for``).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backend import backend_for
from .plan import fused_residual_block
from .modules import FusedBasicBlock, FusedPreActBlock
from .reference import conv1x1, conv3x3

NUM_CLASSES = 10
CLASS_NAMES = ("disk", "ring", "square", "frame", "plus", "cross",
               "h-stripes", "v-stripes", "d-stripes", "checker")
FORMS = ("plain", "residual")
WIDTHS = (16, 32, 64)
RESULTS_FILE = "results.pt"


# --------------------------------------------------------------------------- data

def make_dataset(n: int, size: int = 16, seed: int = 0) -> tuple:
    """``n`` images [n, 3, size, size] (float32, roughly zero mean, unit spread) and their
    labels [n] (int64, balanced over the 10 classes), drawn deterministically from ``seed``.

    Each image is one shape or texture (see CLASS_NAMES) at a random centre, size, small
    rotation, foreground and background colour and contrast, over a random colour gradient
    and Gaussian pixel noise of random strength: learnable, but not in one epoch."""
    if n < 1 or size < 8:
        raise ValueError(f"make_dataset needs n >= 1 and size >= 8, got n={n}, size={size}")
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(n, *shape, generator=g)  # noqa: E731
    labels = torch.arange(n) % NUM_CLASSES
    labels = labels[torch.randperm(n, generator=g)]
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = coords.view(1, size, 1), coords.view(1, 1, size)
    cx, cy = u(0.3, 0.7, 1, 1), u(0.3, 0.7, 1, 1)
    r = u(0.2, 0.38, 1, 1)                       # half-size of the shape
    w = u(0.05, 0.09, 1, 1)                      # line half-width, about one pixel
    angle = u(-0.3, 0.3, 1, 1)                   # jitter, small enough to keep h/v/d apart
    freq = u(3.0, 4.5, 1, 1)                     # stripes: cycles per image width
    phase = u(0.0, 2 * math.pi, 1, 1)
    dx, dy = xx - cx, yy - cy
    cu, sv = torch.cos(angle), torch.sin(angle)
    a, b = cu * dx + sv * dy, -sv * dx + cu * dy  # rotated coordinates
    d, box = torch.sqrt(a * a + b * b), torch.maximum(a.abs(), b.abs())
    p, q = (a + b) / math.sqrt(2), (a - b) / math.sqrt(2)
    window = box < r * 1.3                       # where the textures are drawn
    stripes = lambda t: torch.sin(2 * math.pi * freq * t + phase) > 0  # noqa: E731
    masks = torch.stack([
        d < r,                                                           # disk
        (d - r).abs() < w,                                               # ring
        box < r,                                                         # square
        (box - r).abs() < w,                                             # frame
        ((a.abs() < w) & (b.abs() < r)) | ((b.abs() < w) & (a.abs() < r)),   # plus
        ((p.abs() < w) & (q.abs() < r)) | ((q.abs() < w) & (p.abs() < r)),   # cross
        window & stripes(b),                                             # h-stripes
        window & stripes(a),                                             # v-stripes
        window & stripes(p),                                             # d-stripes
        window & ((torch.sin(2 * math.pi * freq * a + phase)
                   * torch.sin(2 * math.pi * freq * b + phase)) > 0),    # checker
    ], 1)                                                                # [n, 10, S, S]
    mask = masks[torch.arange(n), labels].float().unsqueeze(1)           # [n, 1, S, S]
    bg = u(0.0, 1.0, 3, 1, 1)
    # foreground: the background moved by a random contrast in a random colour direction
    direction = torch.randn(n, 3, 1, 1, generator=g)
    direction = direction / direction.norm(dim=1, keepdim=True)
    fg = bg + u(0.35, 0.8, 1, 1, 1) * direction * math.sqrt(3)
    gradient = (u(-0.3, 0.3, 3, 1, 1) * (xx - 0.5).unsqueeze(1)
                + u(-0.3, 0.3, 3, 1, 1) * (yy - 0.5).unsqueeze(1))
    noise = u(0.05, 0.35, 1, 1, 1) * torch.randn(n, 3, size, size, generator=g)
    images = bg + (fg - bg) * mask + gradient + noise
    images = (images - 0.5) / 0.5
    return images.contiguous(), labels


# --------------------------------------------------------------------------- networks

class PlainBlock(nn.Module):
    """A residual block's main path with the skip removed, through the fused epilogue's
    no-skip path (``fused_residual_block(..., skip=False)``), so plain and residual networks
    differ by the shortcut alone.

    Post-activation: ``relu(bn2(conv2(relu(bn1(conv1(x))))))``, the BasicBlock without
    ``+ skip``; pre-activation: ``conv2(relu(bn2(conv1(relu(bn1(x))))))``. Same attribute
    names and parameters as the residual block, minus the shortcut.

    Without skips, a stack of pre-activation blocks is the same sequence of conv, BN and
    ReLU as a stack of post-activation ones (CifarNet moves the stem's BN + ReLU to the
    end), so the plain nets of ``--preact`` train exactly as those without it."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, preact: bool = False):
        super().__init__()
        self.preact = preact
        self.bn1 = nn.BatchNorm2d(inplanes if preact else planes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return fused_residual_block(x, [self.conv1, self.conv2], [self.bn1, self.bn2],
                                    preact=self.preact, skip=False)


def _residual_block(inplanes: int, planes: int, stride: int, preact: bool) -> nn.Module:
    if preact:
        return FusedPreActBlock(inplanes, planes, stride)  # builds its own 1x1 projection
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
    return FusedBasicBlock(inplanes, planes, stride, downsample)


class CifarNet(nn.Module):
    """He et al.'s CIFAR network of ``depth = 6n + 2`` layers, plain or residual.

    ``blocks`` is an nn.ModuleList of the 3n blocks in order, so ``lesion`` can take one
    out; ``block_removable(i)`` says whether block i keeps its input's shape."""

    def __init__(self, depth: int, form: str, preact: bool = False,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        check_depth(depth)
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.depth, self.form, self.preact = depth, form, preact
        n = (depth - 2) // 6
        self.conv1 = conv3x3(3, WIDTHS[0])
        # post-activation nets normalise the stem; pre-activation nets normalise at the end
        self.bn1 = nn.BatchNorm2d(WIDTHS[0]) if not preact else nn.Identity()
        blocks, inplanes = [], WIDTHS[0]
        for stage, planes in enumerate(WIDTHS):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                if form == "residual":
                    blocks.append(_residual_block(inplanes, planes, stride, preact))
                else:
                    blocks.append(PlainBlock(inplanes, planes, stride, preact))
                inplanes = planes
        self.blocks = nn.ModuleList(blocks)
        self.bn_final = nn.BatchNorm2d(inplanes) if preact else nn.Identity()
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def block_removable(self, i: int) -> bool:
        """True when block ``i`` maps a tensor to one of the same shape (stride 1, same
        channels), so the network still runs with the block replaced by the identity."""
        block = self.blocks[i]
        return block.stride == 1 and block.conv1.in_channels == block.conv2.out_channels

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        if not self.preact:
            x = F.relu(self.bn1(x))
        for block in self.blocks:
            x = block(x)
        if self.preact:
            x = F.relu(self.bn_final(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def check_depth(depth: int) -> None:
    """ValueError unless ``depth`` is 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, ...), "
                         f"got {depth!r}")


@contextlib.contextmanager
def lesioned(model: CifarNet, i: int):
    """Inside the ``with``, block ``i`` of ``model`` is replaced by the identity; the block
    is put back on exit, so the model is unchanged afterwards. ValueError if the block
    changes the shape of its input (a stride-2 or widening block), where no identity fits.

    For a residual block this keeps the skip and drops the residual branch (the input
    of a post-activation block is already a ReLU output, so relu(x) = x); for a plain
    block it drops the layer from the network's only path."""
    if not 0 <= i < len(model.blocks):
        raise ValueError(f"block index must be in [0, {len(model.blocks)}), got {i}")
    if not model.block_removable(i):
        raise ValueError(f"block {i} changes its input's shape and cannot be removed")
    block = model.blocks[i]
    model.blocks[i] = nn.Identity()
    try:
        yield model
    finally:
        model.blocks[i] = block


# --------------------------------------------------------------------------- training

def _progress(total: int, desc: str, quiet: bool):
    """A tqdm bar on stderr, or a no-op stand-in when quiet or tqdm is missing."""
    if not quiet:
        try:
            from tqdm import tqdm
            return tqdm(total=total, desc=desc, unit="epoch", file=sys.stderr,
                        dynamic_ncols=True, leave=True)
        except ImportError:
            pass

    class _Quiet:
        def update(self, n=1):
            if not quiet:
                print(f"{desc}: epoch done", file=sys.stderr, flush=True)

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass
    return _Quiet()


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch: int = 500) -> float:
    """Classification error (fraction wrong) of ``model`` in eval mode; restores the mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wrong = 0
    for s in range(0, len(images), batch):
        out = model(images[s:s + batch].to(device))
        wrong += (out.argmax(1).cpu() != labels[s:s + batch]).sum().item()
    model.train(was_training)
    return wrong / len(images)


def train(model: nn.Module, data: tuple, epochs: int, batch: int, lr: float, seed: int,
          device: torch.device, desc: str = "", quiet: bool = False) -> dict:
    """Trains ``model`` with SGD (momentum 0.9, weight decay 1e-4, cosine-decayed ``lr``,
    one linear warm-up epoch so the deepest plain nets start stable) on ``data`` =
    (train_x, train_y, test_x, test_y). Returns the history: per epoch the training error
    over that epoch's batches (as in He et al.'s curves) and the test error after it."""
    train_x, train_y, test_x, test_y = data
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4,
                          nesterov=True)
    steps_per_epoch = math.ceil(len(train_x) / batch)
    total = epochs * steps_per_epoch
    warm = min(steps_per_epoch, total // 2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm
        else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    g = torch.Generator().manual_seed(seed)
    hist = {"train_err": [], "test_err": [], "seconds": []}
    bar = _progress(epochs, desc, quiet)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=g)
        wrong = 0
        for s in range(0, len(train_x), batch):
            idx = order[s:s + batch]
            x, y = train_x[idx].to(device), train_y[idx].to(device)
            if torch.rand((), generator=g) < 0.5:   # the only augmentation: a mirror image
                x = x.flip(3)
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            wrong += (out.argmax(1) != y).sum().item()
        hist["train_err"].append(wrong / len(train_x))
        hist["test_err"].append(evaluate(model, test_x, test_y))
        hist["seconds"].append(time.perf_counter() - start)
        bar.set_postfix_str(f"train err {hist['train_err'][-1]:.3f} "
                            f"test err {hist['test_err'][-1]:.3f}")
        bar.update(1)
    bar.close()
    return hist


def _describe_backend(device: torch.device) -> str:
    name = backend_for(device)
    where = {"triton": "Triton kernels" + (" (interpreter)" if device.type == "cpu" else ""),
             "reference": "fusedres reference backend: plain PyTorch",
             "csrc_ref": "fusedres csrc_ref backend: hand-written C++/CUDA"}[name]
    return (f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"residual and plain blocks: {where}")


def _data_for(cfg: dict) -> tuple:
    train_x, train_y = make_dataset(cfg["train_size"], cfg["image_size"], cfg["seed"])
    test_x, test_y = make_dataset(cfg["test_size"], cfg["image_size"], cfg["seed"] + 1)
    return train_x, train_y, test_x, test_y


def run_degradation(cfg: dict, device: torch.device, quiet: bool = False) -> dict:
    """Trains every (form, depth) of ``cfg`` from the same seed per depth and returns
    ``{"config", "histories", "states", "environment"}``: histories and CPU state_dicts
    keyed ``"plain-20"`` / ``"residual-20"`` and so on."""
    data = _data_for(cfg)
    result = {"config": dict(cfg), "histories": {}, "states": {},
              "environment": _describe_backend(device)}
    for depth in cfg["depths"]:
        for form in FORMS:
            # the same seed for both forms of a depth: same conv initialisation, same batches
            torch.manual_seed(cfg["seed"] + depth)
            model = CifarNet(depth, form, cfg["preact"])
            key = f"{form}-{depth}"
            result["histories"][key] = train(
                model, data, cfg["epochs"], cfg["batch"], cfg["lr"], cfg["seed"] + depth,
                device, desc=f"{key:>12}", quiet=quiet)
            result["states"][key] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return result


# --------------------------------------------------------------------------- output

def degradation_table(result: dict) -> str:
    """Markdown table: final training and test error per depth and form."""
    cfg = result["config"]
    lines = ["| depth | form | train error (last epoch) | test error | seconds |",
             "|---:|---|---:|---:|---:|"]
    for depth in cfg["depths"]:
        for form in FORMS:
            h = result["histories"][f"{form}-{depth}"]
            lines.append(f"| {depth} | {form} | {100 * h['train_err'][-1]:.1f}% | "
                         f"{100 * h['test_err'][-1]:.1f}% | {h['seconds'][-1]:.0f} |")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


_NO_PLOT = ("matplotlib is not installed, so no plot was written; "
            "pip install 'fusedres[plot]' (or matplotlib) to get it")


def plot_degradation(result: dict, path: str) -> bool:
    """Training error vs epoch, plain beside residual (He et al. fig. 1/6), to ``path``.
    False (nothing written) when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    cfg = result["config"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True, dpi=90)
    colors = plt.cm.viridis([i / max(1, len(cfg["depths"]) - 1) * 0.8
                             for i in range(len(cfg["depths"]))])
    for ax, form in zip(axes, FORMS):
        for depth, color in zip(cfg["depths"], colors):
            h = result["histories"][f"{form}-{depth}"]
            epochs = range(1, len(h["train_err"]) + 1)
            ax.plot(epochs, [100 * e for e in h["train_err"]], color=color,
                    label=f"{form}-{depth} train")
            ax.plot(epochs, [100 * e for e in h["test_err"]], color=color, ls="--", lw=1,
                    label=f"{form}-{depth} test")
        kind = "pre-activation " if cfg["preact"] else ""
        ax.set_title(f"{kind}{form} networks")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("error (%)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def lesion_errors(model: CifarNet, test_x: Tensor, test_y: Tensor) -> list:
    """Test error with each removable block of ``model`` removed in turn:
    ``[(block index, stage, error or None when the block cannot be removed)]``."""
    n = len(model.blocks) // 3
    rows = []
    for i in range(len(model.blocks)):
        err = None
        if model.block_removable(i):
            with lesioned(model, i):
                err = evaluate(model, test_x, test_y)
        rows.append((i, i // n + 1, err))
    return rows


def lesion_table(base: dict, rows: dict) -> str:
    """Markdown table: one row per block, one column per network."""
    keys = list(rows)
    head = "| removed block | stage | " + " | ".join(keys) + " |"
    lines = [head, "|---:|---:|" + "---:|" * len(keys),
             "| none | – | " + " | ".join(f"{100 * base[k]:.1f}%" for k in keys) + " |"]
    for j, (i, stage, _) in enumerate(rows[keys[0]]):
        cells = []
        for k in keys:
            err = rows[k][j][2]
            cells.append("shape changes" if err is None else f"{100 * err:.1f}%")
        lines.append(f"| {i} | {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_lesion(base: dict, rows: dict, path: str) -> bool:
    """Test error vs removed block, one line per network, to ``path``; False without
    matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=90)
    for k, color in zip(rows, ("tab:red", "tab:blue", "tab:orange", "tab:green")):
        # NaN where a block cannot be removed, so the line breaks there instead of
        # suggesting a value
        ax.plot([i for i, _, _ in rows[k]],
                [math.nan if e is None else 100 * e for _, _, e in rows[k]],
                "o-", color=color, label=k)
        ax.axhline(100 * base[k], color=color, ls=":", lw=1, label=f"{k}, nothing removed")
    ax.axhline(100 * (1 - 1 / NUM_CLASSES), color="gray", ls="--", lw=1, label="chance")
    ax.set_xlabel("removed block (blocks that change shape cannot be removed)")
    ax.set_ylabel("test error (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
