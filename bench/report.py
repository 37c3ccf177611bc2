"""Markdown tables from fusedres benchmark results.

    python bench/report.py results.json [more.json partial.jsonl ...] > table.md

Reads pytest-benchmark JSON (``pytest bench --benchmark-json results.json``) and the
JSON-lines file the suite appends to when FUSEDRES_BENCH_JSONL is set (what a run cut off
by a timeout still measured); a result seen twice counts once, the first file winning.
Every number comes from the results' ``extra_info`` (device-timed medians). Ratios are
throughput ratios, eager time / fused time: above 1 the fused blocks are faster; folded/X
is X time / folded time (fold_for_inference, inference only; compile_freezing is
torch.compile with torch._inductor.config.freezing = True, Inductor's conv-BN folding).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

SPEED_PROVIDERS = ("eager", "compile", "fused", "fused_recompute", "csrc_ref")
# Inference-only or `python -m fusedres bench`-only providers: a column (and a ratio) when
# present.
EXTRA_PROVIDERS = ("fused_compile", "folded", "compile_freezing")
# The folded-inference table: folded, then what it is compared with.
FOLDED_COLUMNS = ("folded", "eager", "compile", "compile_freezing", "fused")
KERNEL_PROVIDERS = ("triton", "csrc_ref", "reference")
ENV_KEYS = (("card", "card"), ("device", "device"), ("torch", "torch"), ("triton", "triton"),
            ("cudnn", "cuDNN"), ("cuda", "CUDA"), ("python", "Python"), ("date", "date"),
            ("profile", "profile"), ("fusedres_commit", "fusedres commit"),
            ("cudnn_benchmark", "cudnn.benchmark"), ("copy_gbps", "copy bandwidth (GB/s, read+write)"))


def load(paths) -> tuple[list, list]:
    """(entries, machine infos) from pytest-benchmark JSON and JSON-lines files."""
    entries, machines, seen = [], [], set()

    def add(entry):
        key = entry.get("fullname") or entry.get("name")
        if key in seen or not entry.get("extra_info", {}).get("kind"):
            return
        seen.add(key)
        entries.append(entry)

    for path in paths:
        p = Path(path)
        if not p.exists() or p.stat().st_size == 0:
            continue
        text = p.read_text()
        if p.suffix == ".jsonl":
            for line in text.splitlines():
                line = line.strip()
                if line:
                    try:
                        add(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line cut off by a killed run
            continue
        data = json.loads(text)
        if data.get("machine_info", {}).get("fusedres"):
            machines.append(data["machine_info"]["fusedres"])
        for b in data.get("benchmarks", []):
            add(b)
    return entries, machines


def _fmt(v, digits=2, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float):
        if 0 < abs(v) < 1:
            return f"{v:.3g}{unit}"
        if abs(v) >= 1000:
            return f"{v:,.0f}{unit}"
        if abs(v) >= 100:
            return f"{v:.0f}{unit}"
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def _ratio(num, den):
    if not num or not den:
        return "–"
    return f"{num / den:.2f}x"


def _table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def header(entries, machines) -> str:
    infos = machines + [e["extra_info"] for e in entries]
    lines = ["# fusedres benchmarks", ""]
    for key, label in ENV_KEYS:
        vals = list(OrderedDict.fromkeys(str(i[key]) for i in infos if i.get(key) is not None))
        if vals:
            lines.append(f"- {label}: {', '.join(vals)}")
    if any(i.get("device") == "cpu" for i in infos):
        lines += ["", "**CPU figures**: tiny shapes through the reference and csrc_ref backends, "
                  "a test of the harness, not a performance result."]
    timing = ("host-timed rounds (perf_counter)" if all(i.get("device") == "cpu" for i in infos)
              else "device-timed rounds (CUDA events, L2 flushed before each)")
    lines += ["", f"Times are medians of {timing}, after warm-up rounds that take compilation "
              "and autotuning out. Ratios are throughput ratios, other time / fused time: "
              "above 1 the fused blocks are faster."]
    return "\n".join(lines)


def speed_tables(entries) -> str:
    cases = OrderedDict()
    for e in entries:
        x = e["extra_info"]
        if x["kind"] not in ("block", "model"):
            continue
        key = (x["kind"], x["case"], x["mode"], x["dtype"], x["layout"], x["batch"])
        cases.setdefault(key, {})[x["provider"]] = x
    if not cases:
        return ""
    speed, memory, folded = [], [], []
    extra = [p for p in EXTRA_PROVIDERS if any(p in by for by in cases.values())]
    providers = SPEED_PROVIDERS + tuple(extra)
    for (kind, case, mode, dtype, layout, batch), by in cases.items():
        t = {p: by[p].get("median_ms") for p in by}
        ips = [_fmt(by[p].get("images_per_s"), 1) if p in by else "–" for p in providers]
        speed.append([kind, case, mode, dtype, layout, batch, *ips,
                      _ratio(t.get("eager"), t.get("fused")),
                      _ratio(t.get("compile"), t.get("fused")),
                      _ratio(t.get("eager"), t.get("fused_recompute")),
                      _ratio(t.get("eager"), t.get("csrc_ref")),
                      # fused + compile against compile; the others against eager
                      *[_ratio(t.get("compile" if p == "fused_compile" else "eager"), t.get(p))
                        for p in extra]])
        if "folded" in t:
            folded.append([kind, case, mode, dtype, layout, batch,
                           *[_fmt(by[p].get("images_per_s"), 1) if p in by else "–"
                             for p in FOLDED_COLUMNS],
                           *[_ratio(t.get(p), t["folded"]) for p in FOLDED_COLUMNS[1:]]])
        mem = [_fmt(by[p].get("peak_mem_mb"), 0) if p in by else "–" for p in providers]
        f = by.get("fused", {})
        bad = [p for p in by if by[p].get("check_ok") is False]
        check = ("MISMATCH: " + ", ".join(bad)) if bad else "ok"
        notes = [f"{p}: {by[p]['fused_note']}" for p in by if by[p].get("fused_note")]
        check += "".join(f"; {n}" for n in notes)
        errs = [by[p].get("check_rel_err") for p in by if by[p].get("check_rel_err") is not None]
        memory.append([kind, case, mode, dtype, layout, batch, *mem,
                       _fmt(f.get("fused_ms"), 3),
                       _fmt(f["fused_bytes"] / 1e6, 1) if f.get("fused_bytes") else "–",
                       _fmt(f.get("fused_gbps"), 0),
                       _fmt(100 * f["floor_frac"], 0, "%") if f.get("floor_frac") else "–",
                       f"{check} (max {max(errs):.1e})" if errs else check])
    head = ["kind", "case", "mode", "dtype", "layout", "N"]
    extra_ratios = {"fused_compile": "fused_compile/compile", "folded": "folded/eager",
                    "compile_freezing": "compile_freezing/eager"}
    a = _table(head + [f"{p} img/s" for p in providers]
               + ["fused/eager", "fused/compile", "recompute/eager", "csrc_ref/eager"]
               + [extra_ratios[p] for p in extra], speed)
    b = _table(head + [f"peak MB {p}" for p in providers]
               + ["fused kernels ms", "fused MB moved", "fused GB/s", "floor/fused time",
                  "check vs eager (max rel err)"], memory)
    c = ("## Inference with folded batch norms\n\nfolded/X = X time / folded time "
         "(fusedres.fold_for_inference; compile_freezing: torch.compile with "
         "torch._inductor.config.freezing = True).\n\n"
         + _table(head + [f"{p} img/s" for p in FOLDED_COLUMNS]
                  + [f"folded/{p}" for p in FOLDED_COLUMNS[1:]], folded) + "\n\n"
         if folded else "")
    return ("## Blocks and models: throughput\n\n" + a + "\n\n" + c +
            "## Memory, and the fused kernels against the byte floor\n\n"
            "Peak memory is torch.cuda.max_memory_allocated over one step (model, inputs and "
            "optimizer state included). Fused kernels: the time of the Triton kernels in one "
            "step (profiler), the bytes the design says they must move, and floor time "
            "(bytes / copy bandwidth) over their time.\n\n" + b)


def kernel_table(entries) -> str:
    rows = OrderedDict()
    for e in entries:
        x = e["extra_info"]
        if x["kind"] == "kernel":
            key = (x["case"], "x".join(map(str, x["shape"])), x["dtype"], x["layout"])
            rows.setdefault(key, {})[x["provider"]] = x
    if not rows:
        return ""
    out = []
    for (case, shape, dtype, layout), by in rows.items():
        ref = by.get("reference", {}).get("median_ms")
        for p in KERNEL_PROVIDERS + tuple(q for q in by if q not in KERNEL_PROVIDERS):
            if p not in by:
                continue
            x = by[p]
            target = x.get("target_frac")
            ok = x.get("meets_target")
            out.append([case, shape, dtype, layout, p, _fmt(x["median_ms"] * 1e3, 1),
                        _fmt(x["bytes"] / 1e6, 1), _fmt(x["gbps"], 1),
                        _fmt(100 * x["copy_frac"], 1, "%"),
                        _fmt(100 * target, 0, "%") if target else "–",
                        "–" if ok is None else ("yes" if ok else "NO"),
                        _ratio(ref, x["median_ms"]) if p != "reference" else "–"])
    return ("## Kernels: achieved bandwidth\n\nGB/s = bytes the kernel must move / median time; "
            "% copy = that over the copy bandwidth measured in the same run.\n\n"
            + _table(["kernel", "shape", "dtype", "layout", "provider", "median µs", "MB moved",
                      "GB/s", "% copy", "target", "meets", "speed-up vs reference"], out))


def render(paths) -> str:
    entries, machines = load(paths)
    if not entries:
        return "# fusedres benchmarks\n\nNo results found in: " + ", ".join(map(str, paths)) + "\n"
    parts = [header(entries, machines), speed_tables(entries), kernel_table(entries)]
    return "\n\n".join(p for p in parts if p) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="pytest-benchmark JSON or FUSEDRES_BENCH_JSONL files")
    args = ap.parse_args(argv)
    sys.stdout.write(render(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
