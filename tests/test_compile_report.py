"""The compile check of what runs: the kernels built as Triton's JIT specialises them at
the ResNet-18/50 batch-norm sites, read back from PTX, TTGIR and ptxas (no GPU needed).

The full report builds in a subprocess: recording the launchers' launches and compiling
need real JIT functions, so TRITON_INTERPRET is unset there."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fusedres.kernels import compile_check as cc


def test_access_widths_parse_from_ptx():
    assert cc._access_bytes("ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];") == 16
    assert cc._access_bytes("ld.global.v2.b32 { %r1, %r2 }, [ %rd1 + 0 ];") == 8
    assert cc._access_bytes("ld.global.b16 { %rs1 }, [ %rd17 + 0 ];") == 2
    assert cc._access_bytes("st.global.v4.b16 [ %rd1 + 0 ], { %rs1, %rs2, %rs3, %rs4 };") == 8
    assert cc._access_bytes("cp.async.cg.shared.global [ %r53 + 0 ], [ %rd18 + 0 ], 0x10, %r54;") == 16
    assert cc._access_bytes("cp.async.ca.shared.global [ %r5 + 0 ], [ %rd8 + 0 ], 4, %r9;") == 4


def test_resident_programs_follow_the_sm_limits():
    # 79 registers -> 80 per thread -> 2560 per warp: 25 warps -> 3 programs of 8 warps
    assert cc.resident(79, 8, 12288, 90) == 3
    assert cc.resident(128, 8, 0, 90) == 2          # registers
    assert cc.resident(32, 8, 0, 90) == 8           # 64 warps per SM
    assert cc.resident(32, 8, 100 * 1024, 90) == 2  # shared memory: 228 KB on an H100
    assert cc.resident(32, 8, 100 * 1024, 80) == 1  # 164 KB on an A100
    assert cc.resident(32, 8, 200 * 1024, 80) == 0  # more than one program may have


def test_pipelining_depth_reads_the_multibuffer():
    ttgir = ("%x = ttg.local_alloc : () -> !ttg.memdesc<3x256x8xbf16, #shared, #smem, mutable>\n"
             "%y = ttg.async_copy_global_to_local %a, %b mask %m")
    assert cc.pipelining(ttgir) == 3
    assert cc.pipelining("scf.for %i = %c0 to %n step %c1") == 0


def test_sites_cover_both_resnets():
    sites = cc.resnet_sites()
    r18 = [s for s in sites if s.model == "resnet18"]
    r50 = [s for s in sites if s.model == "resnet50"]
    assert len(r18) == 8 * 2 + 3 and len(r50) == 16 * 3 + 4
    assert {(s.C, s.H) for s in r50 if s.name.endswith("bn3")} == {
        (256, 56), (512, 28), (1024, 14), (2048, 7)}
    assert ("resnet50", "layer2.0.bn1", 128, 56, "inner") in sites  # stride in the 3x3


def test_report_of_what_runs(tmp_path):
    """Every variant the launchers pick at every ResNet-18/50 site builds for sm_90a (all
    sites, batch 32 and 256, bf16/fp16 channels_last and fp32 NCHW) and sm_80 (the
    batch-256 bf16 channels_last subset, to keep CI time down) with no spill, every
    channels_last activation access is 8 bytes or wider, and every batch-256 launch in
    bf16 channels_last and fp32 NCHW keeps >= 32 KB of activation loads in flight per
    H100 SM (static estimate). A squeeze-excite / ECA gated block's launches at ResNet-50's
    bn3 sites build too, without spills (reported apart, not held to the 32 KB)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, "-m", "fusedres.kernels.compile_check", "--arch", "90",
                        "--arch", "80", "--subset-arch", "80", "--jobs", "2", "--summary-only",
                        "--json", str(out)], env=env, capture_output=True, text=True,
                       timeout=900)
    tail = "\n".join(r.stdout.splitlines()[-40:])
    assert r.returncode == 0, f"compile report failed:\n{tail}\n{r.stderr[-3000:]}"
    assert " 0 failures" in r.stdout
    rows = json.loads(out.read_text())
    # the report has teeth: it covers what the issue asks, and sees the specialisation
    held = [x for x in rows if x["arch"] == 90 and x["N"] == 256 and x["config"] in cc.HELD
            and x["tile_bytes"] and x["pass_"] not in cc.GATE_PASSES]
    assert {x["kernel"] for x in held} == {"_bn_stats_partial_kernel", "_bn_act_fwd_kernel",
                                           "_bn_act_bwd_reduce_kernel", "_bn_act_bwd_apply_kernel"}
    assert min(x["bytes_per_sm"] for x in held) >= cc.TARGET_BYTES
    assert all(x["depth"] >= 2 for x in held), "a held launch's loop is not pipelined"
    assert any(x["arch"] == 80 for x in rows)
    # straight.py's bindings (the statistics as [4, C] rows) are built and held likewise
    assert {"fwd_rows", "bwd_rows"} <= {x["pass_"] for x in held}
    # a gated (SE / ECA) site's launches are built too, every new flag among them
    gate = [x for x in rows if x["pass_"] in cc.GATE_PASSES]
    assert {x["pass_"] for x in gate} == set(cc.GATE_PASSES)
    assert {x["kernel"] for x in gate if x["pass_"] == "gate_bwd"} == {
        "_bn_act_bwd_reduce_kernel", "_bn_act_bwd_apply_kernel"}
    assert all(x["error"] is None and x["spill"] == 0 for x in gate)
    cl = [x for x in rows if x["config"].endswith("-cl") and x["access"].get("load_tile")]
    assert cl and all(min(x["access"]["load_tile"]) >= 8 for x in cl)
