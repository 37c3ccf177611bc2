"""``python -m fusedres degradation`` and ``python -m fusedres lesion``: the command lines of
fusedres/experiments.py (the networks, data set, training and tables live there).

Both check their options, the device, the backend and that ``--out`` can be written before
training starts, so a mistake costs seconds, not a lost run.
"""
from __future__ import annotations

import argparse
import os
import time

from . import common
from .. import experiments as E
from ..experiments import (FORMS, NUM_CLASSES, RESULTS_FILE, CifarNet, check_depth,
                           degradation_table, lesion_errors, lesion_table, run_degradation)

HELP_DEGRADATION = "train plain and residual nets of several depths (He et al.)"
HELP_LESION = "remove blocks one at a time from trained nets (Veit et al.)"


def _depths(text: str) -> list:
    try:
        depths = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--depths takes integers like 8,20, got {text!r}")
    if not depths:
        raise argparse.ArgumentTypeError("--depths needs at least one depth")
    for d in depths:
        try:
            check_depth(d)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e))
    return depths


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", default="fusedres_runs",
                   help="folder for results.pt and the PNG plots (default fusedres_runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: these small convolutions gain "
                        "little from more, and oversubscribed threads on a busy machine "
                        "slow training down by an order of magnitude)")


def _add_training(p: argparse.ArgumentParser, depths: str, epochs: int) -> None:
    p.add_argument("--depths", type=_depths, default=_depths(depths),
                   help=f"comma-separated depths 6n+2 (default {depths})")
    p.add_argument("--epochs", type=int, default=epochs, help=f"default {epochs}")
    p.add_argument("--train-size", type=int, default=DEFAULTS["train_size"],
                   help=f"training images (default {DEFAULTS['train_size']})")
    p.add_argument("--test-size", type=int, default=DEFAULTS["test_size"],
                   help=f"test images (default {DEFAULTS['test_size']})")
    p.add_argument("--image-size", type=int, default=DEFAULTS["image_size"],
                   help=f"image side in pixels (default {DEFAULTS['image_size']})")
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--preact", action="store_true",
                   help="pre-activation (ResNet v2) blocks: FusedPreActBlock")


# Sized so that `degradation` finishes in under 10 minutes on a 2-core CPU.
DEFAULTS = dict(depths="8,20", epochs=10, train_size=5000, test_size=1000, image_size=16,
                batch=64, lr=0.1)
# `lesion` without a saved run trains one small depth.
LESION_TRAIN = dict(depths="14", epochs=6)


def _device(args):
    """The device, after every check that needs no work: threads, device, backend, --out."""
    import torch
    if args.threads < 1:
        raise common.UsageError(f"--threads must be at least 1, got {args.threads}")
    device = common.device(args.device)
    common.require_backend(device)
    common.require_writable(args.out)
    torch.set_num_threads(args.threads)
    return device


def _config(args) -> dict:
    for name in ("epochs", "train_size", "test_size", "batch"):
        if getattr(args, name) < 1:
            raise common.UsageError(f"--{name.replace('_', '-')} must be at least 1, "
                                    f"got {getattr(args, name)}")
    if args.image_size < 8:
        raise common.UsageError(f"--image-size must be at least 8, got {args.image_size}")
    return dict(depths=list(args.depths), epochs=args.epochs, train_size=args.train_size,
                test_size=args.test_size, image_size=args.image_size, batch=args.batch,
                lr=args.lr, seed=args.seed, preact=args.preact)


def add_parsers(sub) -> None:
    """The ``degradation`` and ``lesion`` subcommands."""
    p = sub.add_parser("degradation", help=HELP_DEGRADATION,
                       description="Train plain and residual CIFAR-style networks of several "
                                   "depths and compare their errors.")
    _add_common(p)
    _add_training(p, DEFAULTS["depths"], DEFAULTS["epochs"])
    p.set_defaults(run=degradation)
    p = sub.add_parser("lesion", help=HELP_LESION,
                       description="Remove each block in turn from trained plain and residual "
                                   "networks and measure the test error.",
                       epilog=f"The training options apply only when it trains: when --out "
                              f"holds no {RESULTS_FILE}, or with --retrain.")
    _add_common(p)
    p.add_argument("--depth", type=int, default=None,
                   help="which trained depth to lesion (default: the deepest saved)")
    p.add_argument("--retrain", action="store_true",
                   help=f"train new networks even if {RESULTS_FILE} exists in --out")
    _add_training(p, LESION_TRAIN["depths"], LESION_TRAIN["epochs"])
    p.set_defaults(run=lesion)


def degradation(args) -> int:
    """``python -m fusedres degradation [options]``: see fusedres/experiments.py."""
    import torch
    device = _device(args)
    cfg = _config(args)
    torch.use_deterministic_algorithms(True, warn_only=True)
    print(f"degradation: depths {cfg['depths']}, {cfg['epochs']} epochs, "
          f"{cfg['train_size']} training / {cfg['test_size']} test images of "
          f"{cfg['image_size']}x{cfg['image_size']}, batch {cfg['batch']}, lr {cfg['lr']}, "
          f"seed {cfg['seed']}")
    print(E._describe_backend(device), flush=True)
    start = time.perf_counter()
    result = run_degradation(cfg, device, args.quiet)
    wall = time.perf_counter() - start
    result["wall_seconds"] = wall
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, RESULTS_FILE)
    torch.save(result, path)
    print()
    print(degradation_table(result))
    print(f"\ntotal {wall:.0f} s; networks and histories saved to {path} "
          f"(python -m fusedres lesion --out {args.out} uses them)")
    png = os.path.join(args.out, "degradation.png")
    print(f"plot: {png}" if E.plot_degradation(result, png) else E._NO_PLOT)
    return 0


def lesion(args) -> int:
    """``python -m fusedres lesion [options]``: see fusedres/experiments.py."""
    import torch
    device = _device(args)
    path = os.path.join(args.out, RESULTS_FILE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if os.path.exists(path) and not args.retrain:
        # tensors, numbers and strings only, so the safe loader reads it
        result = torch.load(path, map_location="cpu", weights_only=True)
        print(f"lesion: networks from {path} "
              f"(trained on: {result.get('environment', 'unknown')})")
    else:
        cfg = _config(args)
        if args.depth is not None and args.depth not in cfg["depths"]:
            raise common.UsageError(f"--depth {args.depth}: not among the depths to train, "
                                    f"{cfg['depths']} (--depths)")
        print(f"lesion: no {path} (or --retrain): training depths {cfg['depths']} for "
              f"{cfg['epochs']} epochs first")
        print(E._describe_backend(device), flush=True)
        result = run_degradation(cfg, device, args.quiet)
        os.makedirs(args.out, exist_ok=True)
        torch.save(result, path)
    cfg = result["config"]
    depth = args.depth if args.depth is not None else max(cfg["depths"])
    if depth not in cfg["depths"]:
        raise common.UsageError(f"--depth {depth}: the saved run has depths {cfg['depths']}")
    _, _, test_x, test_y = E._data_for(cfg)
    print(E._describe_backend(device), flush=True)
    base, rows = {}, {}
    for form in FORMS:
        key = f"{form}-{depth}"
        model = CifarNet(depth, form, cfg["preact"])
        model.load_state_dict(result["states"][key])
        model.to(device).eval()
        base[key] = E.evaluate(model, test_x, test_y)
        rows[key] = lesion_errors(model, test_x, test_y)
    print()
    print(lesion_table(base, rows))
    print(f"\nchance is {100 * (1 - 1 / NUM_CLASSES):.0f}% error; "
          "'shape changes': a stride-2 block, which no identity can replace")
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "lesion.png")
    print(f"plot: {png}" if E.plot_lesion(base, rows, png) else E._NO_PLOT)
    return 0
