"""Build every kernel variant the launchers can pick for real GPUs, without a GPU.

    python -m fusedres.kernels.compile_check [--arch 80 --arch 90]

compiles each kernel for every tile of config.GPU_TILES, every storage dtype and every
pointer-dtype combination launch.py produces, to PTX and a cubin, and reads registers and
spills from ``ptxas -v``. This catches what the interpreter cannot: constexpr misuse,
codegen type errors, shared-memory overflow, spills. Must run without TRITON_INTERPRET.
Flags are run-time scalars in the kernels, so these are all the variants there are
(Triton's launch-time specialisation of integer arguments aside).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

STORAGE = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32", "fp64": "fp64"}


def _kernels():
    from .backward import (_bn_act_bwd_apply_kernel, _bn_act_bwd_reduce_kernel,
                           _sum_partials_kernel)
    from .epilogue import _bn_act_fwd_kernel
    from .stats import _bn_stats_finalize_kernel, _bn_stats_partial_kernel
    return dict(stats_partial=_bn_stats_partial_kernel, stats_finalize=_bn_stats_finalize_kernel,
                fwd=_bn_act_fwd_kernel, bwd_reduce=_bn_act_bwd_reduce_kernel,
                sum_partials=_sum_partials_kernel, bwd_apply=_bn_act_bwd_apply_kernel)


def variants():
    """(name, kernel key, pointer dtypes by argument, constexprs, num_warps) for every variant."""
    import triton.language as tl

    from .config import NUM_WARPS, finalize_config, gpu_tiles
    out = []
    for s in STORAGE:
        t = "fp64" if s == "fp64" else "fp32"  # statistics dtype
        acc = tl.float64 if s == "fp64" else tl.float32
        act = {a: f"*{s}" for a in ("x_ptr", "z_ptr", "y_ptr", "skip_ptr", "factor_ptr", "dy_ptr",
                                     "zd_ptr", "dz_add_ptr", "dz_ptr", "dskip_ptr")}
        stat = {a: f"*{t}" for a in ("part_mean_ptr", "part_m2_ptr", "part_count_ptr", "mean_ptr",
                                      "rstd_ptr", "scale_ptr", "shift_ptr", "skip_scale_ptr",
                                      "skip_shift_ptr", "mean_d_ptr", "rstd_d_ptr", "scale_d_ptr",
                                      "part_ptr", "sums_ptr", "out_ptr", "moments_ptr")}
        ptrs = {**act, **stat, "mask_ptr": "*u8", "nbt_ptr": "*i64"}
        for cl, bc, bhw in gpu_tiles(s == "fp64", stats=True):
            tile = dict(CHANNELS_LAST=cl, BLOCK_C=bc, BLOCK_HW=bhw, ACC_DTYPE=acc)
            tag = f"{s}-{'cl' if cl else 'nchw'}-{bc}x{bhw}"
            out.append((f"stats_partial-{tag}", "stats_partial", ptrs, tile, NUM_WARPS))
        for cl, bc, bhw in gpu_tiles(s == "fp64"):
            tile = dict(CHANNELS_LAST=cl, BLOCK_C=bc, BLOCK_HW=bhw, ACC_DTYPE=acc)
            tag = f"{s}-{'cl' if cl else 'nchw'}-{bc}x{bhw}"
            for skip in (0, 1, 2):
                out.append((f"fwd-skip{skip}-{tag}", "fwd", ptrs, {**tile, "SKIP": skip}, NUM_WARPS))
            for bits in (False, True):
                for skip_bn in (False, True):
                    out.append((f"bwd_reduce-bits{int(bits)}-skipbn{int(skip_bn)}-{tag}", "bwd_reduce",
                                ptrs, {**tile, "FROM_BITS": bits, "SKIP_BN": skip_bn}, NUM_WARPS))
                for skip in (0, 1, 2):
                    out.append((f"bwd_apply-bits{int(bits)}-skip{skip}-{tag}", "bwd_apply", ptrs,
                                {**tile, "FROM_BITS": bits, "SKIP": skip}, NUM_WARPS))
        block_p, block_c = finalize_config(1 << 12, 1 << 12)
        fin = dict(BLOCK_P=block_p, BLOCK_C=block_c, ACC_DTYPE=acc)
        for param in sorted({t, s}):  # BN parameters in fp32, or in the storage dtype
            p = {**ptrs, **{a: f"*{param}" for a in ("weight_ptr", "bias_ptr", "running_mean_ptr",
                                                     "running_var_ptr")}}
            out.append((f"stats_finalize-{s}-params_{param}", "stats_finalize", p, fin, NUM_WARPS))
        if s in ("fp32", "fp64"):
            out.append((f"sum_partials-{t}", "sum_partials", ptrs, fin, NUM_WARPS))
    return out


def _signature(fn, ptrs: dict, constexprs: dict) -> dict:
    sig = {}
    floats = {"momentum", "momentum_lo", "eps", "inv_count"}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = ptrs[p.name]
        elif p.name in floats:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return sig


def compile_one(args) -> dict:
    """Compile one variant for one arch; returns registers, spill bytes and any error."""
    name, key, ptrs, constexprs, num_warps, arch = args
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from .config import MAX_REGISTERS
    fn = _kernels()[key]
    if not isinstance(fn, JITFunction):  # under TRITON_INTERPRET=1: an InterpretedFunction
        fn = JITFunction(fn.fn)
    res = dict(name=name, arch=arch, regs=None, spill_stores=None, spill_loads=None, error=None)
    try:
        src = ASTSource(fn=fn, signature=_signature(fn, ptrs, constexprs), constexprs=constexprs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps,
                                                                         "maxnreg": MAX_REGISTERS})
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
        with tempfile.TemporaryDirectory() as d:
            ptx = os.path.join(d, "k.ptx")
            with open(ptx, "w") as f:
                f.write(k.asm["ptx"])
            # the flags Triton's own make_cubin passes (triton/backends/nvidia/compiler.py)
            r = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}",
                                ptx, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
        if r.returncode != 0:
            res["error"] = r.stderr[-2000:]
            return res
        m = re.search(r"Used (\d+) registers", r.stderr)
        res["regs"] = int(m.group(1)) if m else None
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
        res["spill_stores"], res["spill_loads"] = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    except Exception as e:  # noqa: BLE001 - reported per variant
        res["error"] = f"{type(e).__name__}: {e}"[-2000:]
    return res


def run(archs=(80, 90), jobs: int | None = None) -> list:
    jobs = jobs or max(1, os.cpu_count() or 1)
    work = [(*v, a) for a in archs for v in variants()]
    if jobs == 1:
        return [compile_one(w) for w in work]
    with ProcessPoolExecutor(jobs) as ex:
        return list(ex.map(compile_one, work))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability x10 (80, 90)")
    ap.add_argument("--jobs", type=int, default=None)
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: compilation needs real JIT functions", file=sys.stderr)
        return 2
    results = run(tuple(a.arch or (80, 90)), a.jobs)
    bad = 0
    for r in results:
        ok = r["error"] is None and r["spill_stores"] == 0 and r["spill_loads"] == 0
        bad += not ok
        status = "ok" if ok else ("ERROR" if r["error"] else "SPILLS")
        print(f"sm_{r['arch']} {r['name']:40s} regs={r['regs']} spills={r['spill_stores']}/"
              f"{r['spill_loads']} {status}")
        if r["error"]:
            print(r["error"])
    print(f"{len(results) - bad} ok, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
