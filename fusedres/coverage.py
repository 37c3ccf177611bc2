"""How much of timm's ResNet family fusedres.convert fuses: the census behind
tests/test_coverage.py and README's coverage table.

    python -m fusedres.coverage            # the census against the committed table
    python -m fusedres.coverage --write    # rewrite tests/data/coverage.json from it
    python -m fusedres.coverage --readme   # the Markdown table README.md carries

Every model is built on the meta device (no memory, no data) with its weight
initialisation skipped, converted, and described by what convert did to its blocks:
"full" (every block it knows fused), "partial" (some), "none" (none, or no block it knows),
with the distinct reasons of the blocks it left alone. Building the 142 models of timm
1.0.31 takes about 10 s this way (about 32 s with the initialisation, which on meta
tensors runs PyTorch's Python reference of every random fill).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .convert import _layout_of, convert, is_fused, why_not_fused

__all__ = ["PATTERNS", "TABLE", "census", "family", "meta_model", "model_coverage",
           "readme_table", "summary"]

#: timm.list_models patterns of the ResNet family the census covers (issue 15).
PATTERNS = ("resnet*", "resnext*", "wide_resnet*", "resnetv2*", "seresnet*", "seresnext*",
            "ecaresnet*", "ecaresnext*", "resnetrs*", "resnetblur*", "resnetaa*",
            "seresnetaa*", "skresnet*", "gluon_resnet*", "legacy_seresnet*", "resnest*",
            "res2net*")

#: The committed census (tests/test_coverage.py compares the live one with it).
TABLE = Path(__file__).resolve().parent.parent / "tests" / "data" / "coverage.json"

# Residual-block classes convert does not know, named in a model's "none" reason; a
# name pattern, because timm has no common base class for its blocks.
_BLOCK_NAME = re.compile(r"Block|Bottle|Basic")
_UNKNOWN = "no block fusedres knows"

# In-place fills that only set values: on meta tensors they compute nothing useful.
_FILLS = frozenset(("normal_", "uniform_", "zero_", "fill_", "copy_", "erfinv_", "clamp_",
                    "mul_", "add_", "exponential_", "bernoulli_"))


class _SkipMetaInit(TorchFunctionMode):
    """Skip weight initialisation on meta tensors: every torch.nn.init function and every
    in-place fill returns its tensor untouched. Structure, shapes and dtypes do not depend
    on values, so what convert sees is the same."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        target = args[0] if args else None
        if (isinstance(target, torch.Tensor) and target.is_meta
                and (getattr(func, "__module__", None) == "torch.nn.init" or name in _FILLS)):
            return target
        return func(*args, **(kwargs or {}))


def family() -> list:
    """Every model name of the ResNet family in the installed timm, sorted."""
    import timm
    return sorted({n for p in PATTERNS for n in timm.list_models(p)})


def meta_model(name: str, **kwargs) -> nn.Module:
    """timm model ``name`` (pretrained=False) on the meta device, weights uninitialised."""
    import timm
    with torch.device("meta"), _SkipMetaInit():
        return timm.create_model(name, pretrained=False, **kwargs)


def model_coverage(model: nn.Module) -> dict:
    """Convert ``model`` in place; returns {"status", "blocks", "fused", "reasons"}:
    ``blocks`` the blocks convert knows, ``fused`` how many it fused, ``reasons`` the
    sorted distinct "BlockClass: why_not_fused" of the others (or, with no known block,
    the block classes it does not know)."""
    before = {name: why_not_fused(m) for name, m in model.named_modules()
              if _layout_of(type(m)) is not None and not is_fused(m)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reasons are collected above, per block
        convert(model)
    mods = dict(model.named_modules())
    fused = sum(1 for name in before if is_fused(mods[name]))
    reasons = {f"{type(mods[name]).__name__}: {before[name]}" for name in before
               if not is_fused(mods[name])}
    if not before:
        unknown = sorted({f"{type(m).__module__}.{type(m).__qualname__}"
                          for m in model.modules() if _BLOCK_NAME.search(type(m).__name__)})
        reasons = {f"{_UNKNOWN}: " + (", ".join(unknown) or "none found")}
    status = "none" if fused == 0 else ("full" if fused == len(before) else "partial")
    return {"status": status, "blocks": len(before), "fused": fused, "reasons": sorted(reasons)}


def census(names: Optional[list] = None) -> dict:
    """{model name: model_coverage} for ``names`` (default: the whole family)."""
    return {n: model_coverage(meta_model(n)) for n in (family() if names is None else names)}


def summary(table: dict) -> dict:
    """How many models are fully, partly and not fused."""
    counts = {"total": len(table), "full": 0, "partial": 0, "none": 0}
    for entry in table.values():
        counts[entry["status"]] += 1
    return counts


def _groups(reasons: list) -> str:
    """What stops a model, for README: its blocks' reasons split into their parts, with
    the conv/norm index left out (``bn2 is GroupNorm`` and ``bn3 is GroupNorm`` are one)."""
    parts = set()
    for reason in reasons:
        if reason.startswith(_UNKNOWN):
            parts.add("block type not served: " + ", ".join(
                c.rsplit(".", 1)[-1] for c in reason.split(": ", 1)[1].split(", ")))
            continue
        for p in reason.split(": ", 1)[1].split("; "):
            parts.add(re.sub(r"\b(conv|bn|norm|act)\d\b", r"\1N", p.split(" (")[0]))
    return "; ".join(sorted(parts)) or "—"


def readme_table(table: dict) -> str:
    """The Markdown coverage table, after a line of totals: one row per status and reason
    group, with its models."""
    rows: dict = {}
    for name, e in sorted(table.items()):
        rows.setdefault((e["status"], _groups(e["reasons"])), []).append(name)
    order = {"full": 0, "partial": 1, "none": 2}
    counts = summary(table)
    lines = [f"{counts['total']} models: {counts['full']} fused whole, {counts['partial']} in part, "
             f"{counts['none']} not at all.", "",
             "| fused | models | what stops the rest | names |", "|---|---|---|---|"]
    for (status, why), names in sorted(rows.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        lines.append(f"| {status} | {len(names)} | {why} | {', '.join(names)} |")
    return "\n".join(lines)


def load_table(path: Path = TABLE) -> dict:
    return json.loads(path.read_text())["models"]


def write_table(table: dict, path: Path = TABLE) -> None:
    import timm
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"timm": timm.__version__, "summary": summary(table), "models": table}
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusedres.coverage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"rewrite {TABLE}")
    ap.add_argument("--readme", action="store_true", help="print README's Markdown table")
    args = ap.parse_args(argv)
    table = census()
    print(json.dumps(summary(table)))
    if args.readme:
        print(readme_table(table))
    if args.write:
        write_table(table)
        print(f"wrote {TABLE}")
    elif TABLE.exists():
        committed = load_table()
        changed = sorted(n for n in set(table) | set(committed)
                         if table.get(n) != committed.get(n))
        print(f"{len(changed)} model(s) differ from {TABLE.name}: {', '.join(changed) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
