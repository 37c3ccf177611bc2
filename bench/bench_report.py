"""bench/report.py on a small synthetic result set (pytest-benchmark JSON + JSON lines)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPORT = Path(__file__).with_name("report.py")
ENV = {"device": "cuda", "card": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0",
       "cudnn": "91400", "cuda": "13.0", "date": "2026-11-27T00:00:00+00:00",
       "profile": "gpu-quick", "copy_gbps": 3000.0}


def _entry(name, **info):
    extra = {**ENV, **info}
    return {"name": name, "fullname": f"bench/x.py::{name}", "group": None,
            "extra_info": extra, "stats": {"median": extra.get("median_ms", 1.0) / 1e3}}


def _block(provider, ms, **more):
    return _entry(f"test_block[b-{provider}]", kind="block", case="bneck_c256_56",
                  mode="train_step", dtype="bf16", layout="cl", batch=256, provider=provider,
                  median_ms=ms, images_per_s=256 / (ms * 1e-3), peak_mem_mb=1000.0,
                  check_rel_err=1e-3, check_ok=True, **more)


def test_report_tables(tmp_path):
    data = {"machine_info": {"fusedres": ENV}, "benchmarks": [
        _block("eager", 4.0), _block("compile", 3.0),
        _block("fused", 2.0, fused_bytes=3_000_000_000, fused_ms=1.25, fused_gbps=2400.0,
               floor_ms=1.0, floor_frac=0.8),
        _entry("test_kernel[k-triton]", kind="kernel", case="bn_act_fwd", op="bn_act_fwd",
               shape=[256, 64, 56, 56], dtype="bf16", layout="cl", batch=256,
               provider="triton", median_ms=0.1, bytes=270_000_000, gbps=2700.0,
               copy_frac=0.9, target_frac=0.85, meets_target=True),
        _entry("test_kernel[k-reference]", kind="kernel", case="bn_act_fwd", op="bn_act_fwd",
               shape=[256, 64, 56, 56], dtype="bf16", layout="cl", batch=256,
               provider="reference", median_ms=0.4, bytes=270_000_000, gbps=675.0,
               copy_frac=0.225, target_frac=None, meets_target=None),
    ]}
    (tmp_path / "r.json").write_text(json.dumps(data))
    lines = [json.dumps(_block("fused", 99.0)),                    # duplicate: JSON wins
             json.dumps(_block("fused_recompute", 2.5)),            # only here
             '{"name": "cut off by a tim']                          # a killed run's last line
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")

    out = subprocess.run([sys.executable, str(REPORT), str(tmp_path / "r.json"),
                          str(tmp_path / "p.jsonl"), str(tmp_path / "missing.json")],
                         capture_output=True, text=True, check=True).stdout
    assert "NVIDIA H100 80GB HBM3" in out and "2.11.0" in out and "3.6.0" in out
    assert "91400" in out and "2026-11-27" in out
    row = next(line for line in out.splitlines() if line.startswith("| block | bneck_c256_56"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # fused/eager 4/2, fused/compile 3/2, recompute/eager 4/2.5, no csrc_ref
    assert cells[-4:] == ["2.00x", "1.50x", "1.60x", "–"], cells
    assert "80%" in out and "2,400" in out
    kern = next(line for line in out.splitlines() if "| bn_act_fwd |" in line and "triton" in line)
    assert "90.0%" in kern and "yes" in kern and "4.00x" in kern
    assert "CPU figures" not in out


def test_report_empty(tmp_path):
    out = subprocess.run([sys.executable, str(REPORT), str(tmp_path / "none.json")],
                         capture_output=True, text=True, check=True).stdout
    assert "No results" in out
