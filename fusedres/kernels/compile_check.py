"""Build every kernel exactly as Triton's JIT builds it at the ResNet batch-norm sites,
without a GPU, and print a static report, one row per launch.

    python -m fusedres.kernels.compile_check [--arch 90 --arch 80] [--batch 256] [--jobs 2]

How it stays faithful to what runs:
1. The launchers themselves run, on meta tensors shaped as each ResNet-18/50 BN site at
   batch 32 and 256 (bf16 and fp16 channels_last, fp32 NCHW), with a device of the
   target's SM count (config.META_SMS); Triton's ``JITFunction.run`` is replaced by a
   recorder, so each launch's grid, arguments and constexprs are the launchers' own.
2. Each recorded launch goes through the kernel's own binder and ``_pack_args``, the code
   the JIT runs at launch: 16-divisible integers and 16-aligned pointers get
   ``tt.divisibility=16``, integers equal to 1 become constants. (Stand-in CPU tensors
   carry the pointers' dtypes and alignment: every allocation of the caching allocator is
   aligned.) The result goes to ``triton.compile(ASTSource(fn, signature, constexprs,
   attrs))`` for sm_90a (H100) and sm_80 (A100); the attrs format differs between
   triton 3.6 and 3.8, and using the installed Triton's own code covers both.
3. From the build: registers and spills (``ptxas -v`` with Triton's flags), shared memory,
   the widths of the activation loads and stores in the PTX (every one is bn_math's
   load_tile / store_tile line, found by its ``.loc``), and whether the sample loop is
   pipelined (cp.async copies into a multi-buffer in the TTGIR: its depth is the number
   of tiles in flight, stages - 1).

Bytes in flight per SM = (bytes of every activation tile the loop loads per iteration, the
stand-ins for absent operands excluded, the packed ReLU bits included) x (programs
resident per SM, limited by registers, warps and shared memory) x (tiles in flight per
program: stages - 1, at most the samples a program walks; 1 if not pipelined). This is a
static estimate: it says nothing of achieved bandwidth, which only a GPU measures.
Must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple, Optional

# (regs per SM, max warps per SM, max programs per SM, shared memory per SM, per program)
LIMITS = {90: (65536, 64, 32, 228 * 1024, 227 * 1024), 80: (65536, 64, 32, 164 * 1024, 163 * 1024)}
SMS = {90: 132, 80: 108}
CHIP = {90: "H100", 80: "A100"}
TARGET_BYTES = 32 * 1024
# (name, storage dtype, channels_last): the held-to-target configurations and fp16
CONFIGS = (("bf16-cl", "bfloat16", True), ("fp16-cl", "float16", True),
           ("fp32-nchw", "float32", False))
HELD = ("bf16-cl", "fp32-nchw")      # the batch-256 launches the test holds to TARGET_BYTES
# Passes of a squeeze-excite / ECA gated block: built, checked for spills and access widths,
# and reported apart; not yet held to TARGET_BYTES (their per-sample stores and [N, C]
# loads cost registers; how much that costs on a GPU is for a GPU run to say).
GATE_PASSES = ("gate_stats", "gate_fwd", "gate_eval", "gate_bwd")
# Arguments that are activation tiles the loop loads (the packed bits are counted apart).
ACTIVATION_LOADS = ("x_ptr", "z_ptr", "dy_ptr", "skip_ptr", "zd_ptr", "dz_add_ptr")


class Site(NamedTuple):
    model: str
    name: str        # e.g. layer2.0.bn3
    C: int
    H: int
    role: str        # inner | identity | projection | downsample


def resnet_sites() -> list:
    """Every batch-norm site inside the residual blocks of torchvision's ResNet-18 and
    ResNet-50 at 224x224 (stride in the 3x3 conv, as torchvision v1.5)."""
    sites = []
    for li, (planes, blocks, stride, h_in) in enumerate(
            [(64, 2, 1, 56), (128, 2, 2, 56), (256, 2, 2, 28), (512, 2, 2, 14)], 1):
        for b in range(blocks):
            s = stride if b == 0 else 1
            h = h_in // s
            proj = b == 0 and li > 1
            sites.append(Site("resnet18", f"layer{li}.{b}.bn1", planes, h, "inner"))
            sites.append(Site("resnet18", f"layer{li}.{b}.bn2", planes, h,
                              "projection" if proj else "identity"))
            if proj:
                sites.append(Site("resnet18", f"layer{li}.{b}.downsample.1", planes, h,
                                  "downsample"))
    for li, (planes, blocks, stride, h_in) in enumerate(
            [(64, 3, 1, 56), (128, 4, 2, 56), (256, 6, 2, 28), (512, 3, 2, 14)], 1):
        for b in range(blocks):
            s = stride if b == 0 else 1
            h1 = h_in if b == 0 else h_in // stride
            h = h_in // s if b == 0 else h1
            sites.append(Site("resnet50", f"layer{li}.{b}.bn1", planes, h1, "inner"))
            sites.append(Site("resnet50", f"layer{li}.{b}.bn2", planes, h, "inner"))
            sites.append(Site("resnet50", f"layer{li}.{b}.bn3", 4 * planes, h,
                              "projection" if b == 0 else "identity"))
            if b == 0:
                sites.append(Site("resnet50", f"layer{li}.{b}.downsample.1", 4 * planes, h,
                                  "downsample"))
    return sites


# --------------------------------------------------------------------------------------
# 1. Record what the launchers launch
# --------------------------------------------------------------------------------------


class Launch(NamedTuple):
    kernel: str
    grid: tuple
    args: tuple
    kwargs: dict


def _record(fn_calls) -> list:
    """Run ``fn_calls()`` with every Triton launch recorded instead of run."""
    from triton.runtime.jit import JITFunction
    from .launch import constexpr_params
    out = []
    orig = JITFunction.run

    def run(self, *args, grid, warmup=False, **kwargs):
        # (bind_launch passes the constexprs by position, last: recorded by name here;
        # a launch that names them passes none of those by position)
        names = [n for n in constexpr_params(self.fn) if n not in kwargs]
        n = len(args) - len(names)
        kwargs = dict(zip(names, args[n:]), **kwargs)
        out.append(Launch(self.fn.__name__, (tuple(grid) + (1, 1))[:2], args[:n], kwargs))

    JITFunction.run = run
    try:
        fn_calls()
    finally:
        JITFunction.run = orig
    return out


def _site_launches(site: Site, N: int, dtype: str, cl: bool, sms: int) -> dict:
    """{pass name: [Launch]} of one site: its training forward (statistics, epilogue),
    backward, and eval forward, as the fused block makes them. At ResNet-50's bn3 sites
    (where SE-ResNet-50 and ECA-ResNet-50 gate the branch) also the gated block's launches
    (gate_api.md): statistics with POOL, the epilogue with an [N, C] factor, the eval
    pooling read, and the backward's per-sample reduction and du_add elementwise pass."""
    import torch

    from . import config
    from .backward import bn_act_bwd
    from .epilogue import bn_act_fwd
    from .stats import bn_stats
    dt = getattr(torch, dtype)
    fmt = torch.channels_last if cl else torch.contiguous_format
    shape = (N, site.C, site.H, site.H)

    def act():
        return torch.empty(shape, device="meta", dtype=dt).contiguous(memory_format=fmt)

    def vec():
        return torch.empty(site.C, device="meta", dtype=torch.float32)

    z, dy = act(), act()
    p = dict(weight=vec(), bias=vec(), running_mean=vec(), running_var=vec())
    nbt = torch.empty((), device="meta", dtype=torch.int64)
    config.META_SMS, saved = sms, config.META_SMS
    skip = act() if site.role in ("identity", "projection") else None
    skip_norm = site.role == "projection"
    write_mask = site.role != "inner"
    try:
        passes = {"stats": _record(lambda: bn_stats(z, p["weight"], p["bias"], p["running_mean"],
                                                    p["running_var"], nbt, 0.1, 1e-5))}
        if site.role == "downsample":  # its epilogue and backward are the projection site's
            return passes

        def fwd(train):
            s = (vec(), vec()) if train else (None, None)
            ss = (vec(), vec()) if train and skip_norm else (None, None)
            return bn_act_fwd(z, *s, p["weight"], p["bias"], p["running_mean"],
                              p["running_var"], 1e-5, skip, *ss, p["weight"], p["bias"],
                              p["running_mean"], p["running_var"], 1e-5, skip_norm, None,
                              True, write_mask and train)

        passes["fwd"] = _record(lambda: fwd(True))
        passes["eval"] = _record(lambda: fwd(False))
        mask = torch.empty(1, device="meta", dtype=torch.uint8) if write_mask else None
        mode = 0 if site.role == "inner" else (2 if skip_norm else 1)
        zd = act() if skip_norm else None
        passes["bwd"] = _record(lambda: bn_act_bwd(
            dy, z, vec(), vec(), vec(), vec(), mask, 2 if write_mask else 1, None, mode, zd,
            vec() if skip_norm else None, vec() if skip_norm else None,
            vec() if skip_norm else None, True, skip_norm, True, None))
        passes.update(_rows_launches(z, dy, zd, skip, skip_norm, mask, mode, write_mask))
        if site.model == "resnet50" and site.name.endswith("bn3"):
            passes.update(_gate_launches(z, dy, zd, skip, skip_norm, mask, mode, p, nbt, vec))
        return passes
    finally:
        config.META_SMS = saved


def _rows_launches(z, dy, zd, skip, skip_norm, mask, mode, write_mask) -> dict:
    """The training epilogue and backward as straight.py binds them (the common blocks'
    cached plans): each BN's statistics passed as bn_stats's [4, C] rows (STATS_ROWS).
    The last BN's also with a drop-path factor [N]; an inner BN's also with dz_add, as a
    pre-activation block's first BN runs (its identity gradient added to dz)."""
    import torch

    from .backward import BoundBwd
    from .epilogue import BoundFwd
    N, C = z.shape[:2]
    # (the last BN's epilogue and backward take the factor; the others, dz_add)
    extra = ([None, torch.empty(N, device="meta", dtype=z.dtype)] if write_mask else
             [None, torch.empty_like(z)])

    def rows():
        return torch.empty((4, C), device="meta", dtype=torch.float32)

    def fwd():
        st, sd = rows(), (rows() if skip_norm else None)
        side = (sd, sd, None, None, None, None, 1e-5) if skip_norm else (None,) * 6 + (0.0,)
        for factor in extra if write_mask else [None]:
            BoundFwd(z, st, st, None, None, None, None, 1e-5, skip, *side, skip_norm, factor,
                     True, write_mask, True, stats_rows=True)(z, st, st, skip, sd, sd, factor)

    def bwd():
        st, sd = rows(), (rows() if skip_norm else None)
        for e in extra:
            factor, dz_add = (e, None) if write_mask else (None, e)
            BoundBwd(z, 2 if write_mask else 1, factor, mode, zd, True, skip_norm, True, dz_add,
                     stats_rows=True)(dy, z, st, st, st, st, mask, factor, zd, sd, sd, sd,
                                      dz_add)

    return {"fwd_rows": _record(fwd), "bwd_rows": _record(bwd)}


def _gate_launches(z, dy, zd, skip, skip_norm, mask, mode, p, nbt, vec) -> dict:
    """The launches a squeeze-excite / ECA gated block adds or changes at one site."""
    import torch

    from .backward import bn_act_bwd_apply, bn_act_bwd_reduce
    from .epilogue import bn_act_fwd
    from .stats import bn_pool, bn_stats_pool
    N, C = z.shape[:2]
    gate = torch.empty((N, C), device="meta", dtype=torch.float32)
    ss = (vec(), vec()) if skip_norm else (None, None)
    sd = (vec(), vec()) if skip_norm else (None, None)

    def gated_fwd(train):
        s = (vec(), vec()) if train else (None, None)
        return bn_act_fwd(z, *s, p["weight"], p["bias"], p["running_mean"], p["running_var"],
                          1e-5, skip, *(ss if train else (None, None)), p["weight"], p["bias"],
                          p["running_mean"], p["running_var"], 1e-5, skip_norm, gate, True,
                          train)

    def gated_bwd():
        head = (dy, z, vec(), vec(), vec(), vec(), mask, 2, None, mode, zd, *sd)
        bn_act_bwd_reduce(*head, True)
        bn_act_bwd_apply(*head[:8], gate, *head[9:], vec() if skip_norm else None, True,
                         skip_norm, None, vec().expand(4 if skip_norm else 2, C).contiguous(),
                         gate)

    return {"gate_stats": _record(lambda: bn_stats_pool(
                z, p["weight"], p["bias"], p["running_mean"], p["running_var"], nbt, 0.1,
                1e-5)),
            "gate_fwd": _record(lambda: gated_fwd(True)),
            "gate_eval": _record(lambda: (bn_pool(z), gated_fwd(False))),
            "gate_bwd": _record(gated_bwd)}


# --------------------------------------------------------------------------------------
# 2. Specialise as the JIT does
# --------------------------------------------------------------------------------------


def _kernel(name: str):
    from . import backward, epilogue, stats
    for mod in (stats, epilogue, backward):
        if hasattr(mod, name):
            return getattr(mod, name)
    raise KeyError(name)


@functools.lru_cache(maxsize=None)
def _binder(name: str, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = _jit(name)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    return fn, backend, create_function_from_signature(fn.signature, fn.params, backend)


def _jit(name: str):
    from triton.runtime.jit import JITFunction
    fn = _kernel(name)
    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)  # under TRITON_INTERPRET


_STANDINS: dict = {}


def _standin(t):
    """A CPU tensor with t's dtype and t's pointer alignment mod 16."""
    import torch
    off = (t.storage_offset() * t.element_size()) % 16
    key = (t.dtype, off)
    if key not in _STANDINS:
        base = torch.empty(64, dtype=torch.uint8)
        start = (-base.data_ptr()) % 16 + off
        _STANDINS[key] = base[start:start + 16].view(t.dtype)
    return _STANDINS[key]


def specialise(launch: Launch, arch: int) -> dict:
    """(signature, constexprs, attrs, options) exactly as the JIT computes them."""
    import torch
    fn, backend, binder = _binder(launch.kernel, arch)
    args = tuple(_standin(a) if isinstance(a, torch.Tensor) else a for a in launch.args)
    kwargs = dict(launch.kwargs)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    opt = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg", "num_ctas") if k in kwargs}
    return dict(kernel=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs,
                options=opt, arch=arch)


def _key(spec: dict) -> str:
    return hashlib.sha1(repr((spec["kernel"], sorted(spec["signature"].items()),
                              sorted((str(k), str(v)) for k, v in spec["constexprs"].items()),
                              sorted((str(k), str(v)) for k, v in spec["attrs"].items()),
                              sorted(spec["options"].items()), spec["arch"])).encode()).hexdigest()


# --------------------------------------------------------------------------------------
# 3. Build and read the build
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _tile_lines() -> dict:
    """bn_math.py line numbers of the activation load and store, and of the packed bits'."""
    import inspect

    from . import bn_math
    lines = {}
    for fname, what in (("load_tile", "tl.load("), ("store_tile", "tl.store("),
                        ("unpack_bits", "tl.load("), ("store_bits", "tl.store(")):
        fn = getattr(bn_math, fname)
        src, start = inspect.getsourcelines(getattr(fn, "fn", fn))
        lines[fname] = {start + i for i, ln in enumerate(src) if what in ln}
    return lines


_WIDTH = re.compile(r"\.v(\d+)")
_BITS = re.compile(r"\.[bfsu](8|16|32|64)\b")


def _access_bytes(instr: str) -> int:
    if instr.startswith("cp.async"):
        m = re.search(r",\s*(0x[0-9a-f]+|\d+)\s*(,|;)", instr)
        return int(m.group(1), 0) if m else 0
    head = instr.split()[0]
    v = _WIDTH.search(head)
    b = _BITS.search(head)
    return (int(v.group(1)) if v else 1) * (int(b.group(1)) // 8 if b else 0)


def ptx_accesses(ptx: str) -> dict:
    """Bytes per access of each global load/store whose source line is a tile line."""
    lines = _tile_lines()
    files = dict(re.findall(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, re.M))
    out = {k: set() for k in lines}
    cur = None
    for ln in ptx.splitlines():
        s = ln.strip()
        if s.startswith(".loc"):
            m = re.match(r"\.loc\s+(\d+)\s+(\d+)", s)
            cur = (files.get(m.group(1), ""), int(m.group(2))) if m else None
            continue
        s = re.sub(r"^@!?%\w+\s+", "", s)
        if not s.startswith(("ld.global", "st.global", "cp.async.")):
            continue
        if s.startswith("cp.async.") and not ("shared.global" in s):
            continue
        if cur is None or not cur[0].endswith("bn_math.py"):
            continue
        for k, ls in lines.items():
            if cur[1] in ls:
                out[k].add(_access_bytes(s))
    return {k: sorted(v) for k, v in out.items()}


def pipelining(ttgir: str) -> int:
    """Tiles in flight per loaded tensor in the sample loop: the depth of the multi-buffer
    the async copies fill (stages - 1); 0 without cp.async."""
    if "async_copy_global_to_local" not in ttgir:
        return 0
    depths = [int(d) for d in
              re.findall(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x", ttgir)]
    return max(depths) if depths else 1


def compile_one(spec: dict) -> dict:
    """Compile one specialised variant for one arch: registers, spills, shared memory, the
    activation access widths, the pipelining depth, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    res = dict(key=_key(spec), kernel=spec["kernel"], arch=spec["arch"], regs=None, spill=None,
               shared=None, depth=0, access={}, error=None)
    try:
        src = ASTSource(fn=_jit(spec["kernel"]), signature=spec["signature"],
                        constexprs=spec["constexprs"], attrs=spec["attrs"])
        k = triton.compile(src, target=GPUTarget("cuda", spec["arch"], 32), options=spec["options"])
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        gpu = "sm_90a" if spec["arch"] == 90 else f"sm_{spec['arch']}"
        with tempfile.TemporaryDirectory() as d:
            ptx = os.path.join(d, "k.ptx")
            with open(ptx, "w") as f:
                f.write(k.asm["ptx"])
            # the flags Triton's own make_cubin passes (triton/backends/nvidia/compiler.py)
            r = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2",
                                f"--gpu-name={gpu}", ptx, "-o", os.path.join(d, "k.cubin")],
                               capture_output=True, text=True)
        if r.returncode != 0:
            res["error"] = r.stderr[-2000:]
            return res
        m = re.search(r"Used (\d+) registers", r.stderr)
        res["regs"] = int(m.group(1)) if m else None
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
        res["spill"] = int(m.group(1)) + int(m.group(2)) if m else 0
        res["shared"] = int(k.metadata.shared)
        res["depth"] = pipelining(k.asm["ttgir"])
        res["access"] = ptx_accesses(k.asm["ptx"])
    except Exception as e:  # noqa: BLE001 - reported per variant
        res["error"] = f"{type(e).__name__}: {e}"[-2000:]
    return res


def resident(regs: int, warps: int, shared: int, arch: int) -> int:
    """Programs resident per SM: registers (allocated per warp in units of 256), warps,
    the program limit and shared memory (1 KB reserved per program)."""
    reg_file, max_warps, max_progs, smem, smem_prog = LIMITS[arch]
    if shared > smem_prog:
        return 0
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (reg_file // per_warp) // warps
    by_smem = smem // (shared + 1024) if shared else max_progs
    return max(0, min(by_regs, max_warps // warps, max_progs, by_smem))


def _tile_bytes(launch: Launch) -> int:
    """Bytes of activation tiles the sample loop loads per iteration: every activation
    argument that is not a stand-in (a tensor already counted, or a one-element scratch),
    and the packed ReLU bits where the kernel reads them."""
    import torch
    kw = launch.kwargs
    fn = _jit(launch.kernel)
    names = [p.name for p in fn.params]
    args = dict(zip(names, launch.args))
    if "BLOCK_HW" not in kw:  # a per-channel kernel: no activation tile
        return 0
    tile = kw["BLOCK_C"] * kw["BLOCK_HW"]
    seen, total = [], 0
    for a in ACTIVATION_LOADS:
        t = args.get(a)
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or any(t is s for s in seen):
            continue
        if a == "skip_ptr" and kw.get("SKIP", 0) == 0:
            continue
        if a == "zd_ptr" and not (kw.get("SKIP_BN") or kw.get("SKIP", 0) == 2):
            continue
        if a == "dz_add_ptr" and not kw.get("HAS_DZ_ADD"):
            continue
        seen.append(t)
        total += tile * t.element_size()
    if kw.get("FROM_BITS"):
        total += tile // 8
    return total


def report(batches=(32, 256), archs=(90, 80), configs=CONFIGS, jobs: int = 2,
           subset_archs: tuple = ()) -> list:
    """One row per (site, batch, config, pass, launch, arch). ``subset_archs``: archs built
    only for the batch-256 bf16 channels_last launches (a CI-time budget)."""
    rows, work = [], {}
    unique: dict = {}  # sites that launch the same: (C, H, role) -> names
    for site in resnet_sites():
        unique.setdefault((site.C, site.H, site.role), []).append(site)
    for same in unique.values():
        site = same[0]
        for N in batches:
            for cname, dtype, cl in configs:
                for arch in archs:
                    if arch in subset_archs and (N != 256 or cname != "bf16-cl"):
                        continue
                    for pname, launches in _site_launches(site, N, dtype, cl, SMS[arch]).items():
                        for la in launches:
                            spec = specialise(la, arch)
                            key = _key(spec)
                            work.setdefault(key, spec)
                            kw = la.kwargs
                            params = [p.name for p in _jit(la.kernel).params]
                            n_pp = la.args[params.index("N_PER_PROG")] if "N_PER_PROG" in params else 1
                            rows.append(dict(model=site.model, site=site.name, C=site.C, H=site.H,
                                             same=len(same),
                                             N=N, config=cname, pass_=pname, kernel=la.kernel,
                                             arch=arch, key=key, grid=la.grid,
                                             tile=(kw["BLOCK_C"], kw.get("BLOCK_HW", kw.get("BLOCK_P", 1))),
                                             warps=kw["num_warps"], n_per_prog=n_pp,
                                             tile_bytes=_tile_bytes(la)))
    specs = list(work.values())
    if jobs <= 1:
        built = [compile_one(s) for s in specs]
    else:
        with ProcessPoolExecutor(jobs) as ex:
            built = list(ex.map(compile_one, specs, chunksize=1))
    by_key = {b["key"]: b for b in built}
    for r in rows:
        b = by_key[r["key"]]
        r.update(regs=b["regs"], spill=b["spill"], shared=b["shared"], error=b["error"],
                 access=b["access"], depth=b["depth"])
        if b["error"] is None:
            r["resident"] = resident(b["regs"], r["warps"], b["shared"], r["arch"])
            in_flight = min(b["depth"], r["n_per_prog"]) if b["depth"] else 1
            r["in_flight"] = in_flight
            r["bytes_per_sm"] = r["tile_bytes"] * r["resident"] * in_flight
        else:
            r["resident"] = r["in_flight"] = r["bytes_per_sm"] = 0
    return rows


def _widths(r) -> tuple:
    loads = r["access"].get("load_tile", [])
    stores = r["access"].get("store_tile", [])
    return (min(loads) if loads else None, max(loads) if loads else None,
            min(stores) if stores else None, max(stores) if stores else None)


def failures(rows) -> list:
    """What the test fails on: a variant that does not build, a spill, a held batch-256
    launch under TARGET_BYTES per H100 SM, a channels_last activation access under 8 B."""
    bad = []
    for r in rows:
        what = f"sm_{r['arch']} {r['model']} {r['site']} N={r['N']} {r['config']} {r['pass_']} {r['kernel']}"
        if r["error"]:
            bad.append(f"{what}: does not build: {r['error'][:300]}")
            continue
        if r["spill"]:
            bad.append(f"{what}: spills {r['spill']} bytes")
        if (r["arch"] == 90 and r["N"] == 256 and r["config"] in HELD and r["tile_bytes"]
                and r["pass_"] not in GATE_PASSES and r["bytes_per_sm"] < TARGET_BYTES):
            bad.append(f"{what}: {r['bytes_per_sm'] / 1024:.1f} KB in flight per H100 SM "
                       f"(< {TARGET_BYTES // 1024})")
        lo_l, _, lo_s, _ = _widths(r)
        if r["config"].endswith("-cl") and ((lo_l is not None and lo_l < 8)
                                            or (lo_s is not None and lo_s < 8)):
            bad.append(f"{what}: activation access of {min(x for x in (lo_l, lo_s) if x)} B")
    return bad


def summary(rows) -> list:
    """Per (arch, batch, config, kernel): min / median KB in flight per SM, registers, spills;
    a gated block's launches apart (their kernel name marked "+gate")."""
    groups: dict = {}
    for r in rows:
        if r["tile_bytes"]:
            kern = r["kernel"] + ("+gate" if r["pass_"] in GATE_PASSES else "")
            groups.setdefault((r["arch"], r["N"], r["config"], kern), []).append(r)
    out = []
    for (arch, N, cfg, kern), rs in sorted(groups.items()):
        kb = [r["bytes_per_sm"] / 1024 for r in rs]
        regs = [r["regs"] or 0 for r in rs]
        lo = [w for r in rs for w in (_widths(r)[0], _widths(r)[2]) if w]
        out.append(dict(chip=CHIP[arch], N=N, config=cfg, kernel=kern, launches=len(rs),
                        kb_min=min(kb), kb_median=statistics.median(kb), regs_max=max(regs),
                        spills=sum(r["spill"] or 0 for r in rs),
                        narrowest=min(lo) if lo else None,
                        pipelined=all(r["depth"] for r in rs)))
    return out


def print_report(rows, file=sys.stdout, full=True):
    if full:
        print(f"{'chip':5} {'site':26} {'N':>3} {'config':9} {'pass':10} {'kernel':26} {'tile':>8} "
              f"{'grid':>11} {'n/p':>3} {'regs':>4} {'sp':>2} {'smem':>6} {'res':>3} {'pipe':>4} "
              f"{'ld B':>7} {'st B':>7} {'KB/SM':>6}", file=file)
        for r in rows:
            lo_l, hi_l, lo_s, hi_s = _widths(r)
            where = f"{r['model'][6:]} {r['site']}" + (f" +{r['same'] - 1}" if r["same"] > 1 else "")
            print(f"{CHIP[r['arch']]:5} {where:26} {r['N']:>3} "
                  f"{r['config']:9} {r['pass_']:10} {r['kernel'][1:27]:26} "
                  f"{'%dx%d' % r['tile']:>8} {'%dx%d' % r['grid']:>11} {r['n_per_prog']:>3} "
                  f"{str(r['regs']):>4} {str(r['spill']):>2} {str(r['shared']):>6} "
                  f"{r['resident']:>3} {r['depth']:>4} {f'{lo_l}-{hi_l}':>7} {f'{lo_s}-{hi_s}':>7} "
                  f"{r['bytes_per_sm'] / 1024:>6.1f}" + (" ERROR" if r["error"] else ""), file=file)
    print("\nSummary (static estimate from the builds, not a measurement): KB of activation "
          "loads in flight per SM", file=file)
    print(f"{'chip':5} {'N':>3} {'config':9} {'kernel':33} {'launches':>8} {'min':>6} "
          f"{'median':>6} {'regs':>4} {'spills':>6} {'min B/access':>12} {'pipelined':>9}", file=file)
    for s in summary(rows):
        print(f"{s['chip']:5} {s['N']:>3} {s['config']:9} {s['kernel']:33} {s['launches']:>8} "
              f"{s['kb_min']:>6.1f} {s['kb_median']:>6.1f} {s['regs_max']:>4} {s['spills']:>6} "
              f"{str(s['narrowest']):>12} {str(s['pipelined']):>9}", file=file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability x10 (90, 80)")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (32, 256)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--subset-arch", type=int, action="append", default=[],
                    help="build this arch only for the batch-256 bf16 channels_last launches")
    ap.add_argument("--config", action="append", choices=[c[0] for c in CONFIGS],
                    help="storage configurations (all three by default)")
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--json", help="write every row to this file")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: compilation needs real JIT functions", file=sys.stderr)
        return 2
    configs = tuple(c for c in CONFIGS if not a.config or c[0] in a.config)
    rows = report(tuple(a.batch or (32, 256)), tuple(a.arch or (90, 80)), configs, jobs=a.jobs,
                  subset_archs=tuple(a.subset_arch))
    print_report(rows, full=not a.summary_only)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "key"} for r in rows], f, indent=1,
                      default=str)
    bad = failures(rows)
    for b in bad:
        print("FAIL", b)
    n_variants = len({(r["key"]) for r in rows})
    print(f"{len(rows)} launches, {n_variants} distinct builds, {len(bad)} failures")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
