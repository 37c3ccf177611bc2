"""``python -m fusedres check``: convert a model and check it against the original.

A thin layer over fusedres.check_model (see fusedres/api.py for what is compared and the
limits); on a CUDA GPU it then times the model with fusedres.benchmark (inference and a
train step). On a machine without a GPU the Triton kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set by ``python -m fusedres`` before Triton is imported) on a small
input.
"""
from __future__ import annotations

import argparse

from . import common
from .models import DEFAULT_MODEL, MODEL_HELP, model_from_args

HELP = "check a converted model against the original"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --model-kwargs, --checkpoint, --input-size, --device, --seed (check, bench)."""
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, metavar="NAME",
                   help=f"{MODEL_HELP} (default: {DEFAULT_MODEL})")
    p.add_argument("--model-kwargs", default=None, metavar="K=V,...",
                   help="keyword arguments for the model's constructor, e.g. drop_path_rate=0.1")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a state_dict to load before converting (default: random weights, "
                        "random batch-norm parameters and statistics)")
    p.add_argument("--input-size", type=common.input_size, default=None, metavar="C,H,W",
                   help="input dimensions, e.g. 3,224,224 (default: the model's)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("check", help=HELP, description=HELP + ".", epilog=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--batch", "-b", "--batch-size", dest="batch", type=common.positive_int,
                   default=None, help="batch size (default 64 on a GPU, 2 on the CPU)")
    p.add_argument("--size", "--img-size", dest="size", type=common.positive_int, default=None,
                   help="image side (default 224 on a GPU, 64 on the CPU)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="float32",
                   help="float32, or bfloat16/float16 through torch.autocast (default float32)")
    p.add_argument("--channels-last", action="store_true", help="channels_last input and model")
    p.add_argument("--no-bench", action="store_true", help="skip the GPU timing")
    p.add_argument("--no-compile", action="store_true",
                   help="leave torch.compile out of the GPU timing")
    p.add_argument("--iters", type=common.positive_int, default=20,
                   help="timed iterations per measurement (GPU)")
    p.set_defaults(run=run)
    return p


def example_input(args, default_size: tuple, on_gpu: bool):
    """The random input [N, C, H, W] the options ask for (seeded by --seed + 1)."""
    import torch
    c, h, w = args.input_size or default_size
    if args.input_size is None:
        h = w = args.size or (h if on_gpu else 64)
    batch = args.batch or (64 if on_gpu else 2)
    torch.manual_seed(args.seed + 1)
    return torch.randn(batch, c, h, w)


def run(args) -> int:
    import torch

    import fusedres
    dev, model, size = model_from_args(args, "check")
    x = example_input(args, size, dev.type == "cuda").to(dev)
    result = fusedres.check_model(model, x, dtype=args.dtype, channels_last=args.channels_last,
                                  seed=args.seed, name=args.model, progress=True)
    print(result, flush=True)
    if dev.type == "cuda" and not args.no_bench and result.summary.num_fused:
        warmup = 3 if args.no_compile else 5
        amp = args.dtype != "float32"
        print(fusedres.benchmark(model, x, precision="amp" if amp else "float32",
                                 amp_dtype=getattr(torch, args.dtype),
                                 channels_last=args.channels_last,
                                 torchcompile=None if args.no_compile else "inductor",
                                 warmup=warmup, iters=args.iters, name=args.model,
                                 progress=True))
    return 0 if result.passed else 1
