"""``python -m fusedres bench``: throughput of your model, eager against fused.

Options follow timm's benchmark.py where they apply (--model, --bench, -b/--batch-size,
--img-size, --input-size, --precision, --amp, --channels-last, --torchcompile,
--results-file, --num-warm-iter, --num-bench-iter). One run times eager and fused, with
--torchcompile also torch.compile and fused + torch.compile, and for inference the model
after fusedres.fold_for_inference, all on one input; it prints
samples/s, ms per step, peak memory and the ratios, and --results-file writes them as JSON
(pytest-benchmark's layout; python bench/report.py FILE makes the markdown table).

Without a CUDA GPU nothing is timed: it says so, checks that the model converts and runs
one step of each mode on a small input (batch 2, 64x64 at most), and exits 0.
"""
from __future__ import annotations

import argparse
import json

from . import common
from .check import add_model_arguments
from .models import model_from_args

HELP = "time eager, fused and torch.compile on a model (needs a GPU)"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help=HELP, description=HELP + ".", epilog=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--bench", choices=["inference", "train", "both"], default="both",
                   help="what to time (default both)")
    p.add_argument("-b", "--batch-size", type=common.positive_int, default=256,
                   help="mini-batch size (default 256)")
    p.add_argument("--img-size", type=common.positive_int, default=None,
                   help="input image side (default: the model's)")
    p.add_argument("--precision", choices=["float32", "float16", "bfloat16", "amp"],
                   default="float32", help="float32/float16/bfloat16: model and input in that "
                                           "dtype; amp: autocast (default float32)")
    p.add_argument("--amp", action="store_true",
                   help="autocast mixed precision (as --precision amp; overrides --precision)")
    p.add_argument("--amp-dtype", choices=["float16", "bfloat16"], default="float16",
                   help="autocast dtype for --amp (default float16, as timm)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory layout")
    p.add_argument("--torchcompile", nargs="?", const="inductor", default=None,
                   metavar="BACKEND", help="also time torch.compile and fused + torch.compile "
                                           "(backend default inductor)")
    p.add_argument("--no-folded", action="store_true",
                   help="leave out the 'folded' provider (fusedres.fold_for_inference)")
    p.add_argument("--results-file", default=None, metavar="FILE",
                   help="write the results as JSON (bench/report.py reads it)")
    p.add_argument("--num-warm-iter", type=int, default=10,
                   help="warm-up iterations per measurement (default 10)")
    p.add_argument("--num-bench-iter", type=common.positive_int, default=40,
                   help="timed iterations per measurement (default 40)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    import torch

    import fusedres
    if args.num_warm_iter < 0:
        raise common.UsageError(f"--num-warm-iter must be at least 0, got {args.num_warm_iter}")
    dev, model, size = model_from_args(args, "bench")
    c, h, w = args.input_size or size
    if args.img_size and not args.input_size:
        h = w = args.img_size
    batch = args.batch_size
    if dev.type != "cuda":  # only a smoke test runs: keep it small
        batch, h, w = min(batch, 2), min(h, 64), min(w, 64)
    torch.manual_seed(args.seed + 1)
    x = torch.randn(batch, c, h, w, device=dev)
    precision = "amp" if args.amp else args.precision
    result = fusedres.benchmark(model, x, bench=args.bench, precision=precision,
                                amp_dtype=getattr(torch, args.amp_dtype),
                                channels_last=args.channels_last,
                                torchcompile=args.torchcompile, folded=not args.no_folded,
                                warmup=args.num_warm_iter, iters=args.num_bench_iter,
                                name=args.model, progress=True)
    print(result)
    if args.results_file:
        with open(args.results_file, "w") as f:
            json.dump(result.to_json(), f, indent=1)
        print(f"results: {args.results_file}" + ("" if result.measured else
                                                 " (no timings: no GPU)"))
    return 0
