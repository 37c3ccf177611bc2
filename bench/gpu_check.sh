#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR: on a CUDA machine, the GPU tests and a benchmark subset, with
# the card's name and the versions, in under 8 minutes on an H100. Uses whatever `python3`
# is on PATH (or $PYTHON); needs torch, triton, pytest, pytest-benchmark, torchvision, and
# no network. Every number in the table is measured in this run.
#
# Steps, in order, each under `timeout` and a shared deadline (FUSEDRES_GPU_CHECK_BUDGET,
# seconds, default 450: the 8 minutes less a margin; FUSEDRES_GPU_CHECK_SKIP_TESTS=1 leaves
# the tests out). A step that fails or times out prints
# a FAILED line and the script goes on; a step with too little time left is skipped (FAILED).
#   1. env: nvidia-smi, versions                                  -> env.txt
#   2. GPU tests: pytest -m gpu, kernels first        cap 190 s   -> tests.log
#   3. csrc_ref build (torch.utils.cpp_extension)     cap 120 s   -> env.txt
#   4. kernel benchmarks (gpu-quick)                  cap  60 s   -> bench-kernels.json
#   5. ResNet-50 benchmarks (gpu-quick)               cap 120 s   -> bench-models.json
#   6. profile (CUDA only): where a ResNet-50 step's GPU time goes, by category, for eager,
#      torch.compile and fused, train step and inference, batch 64 and 256; and a fused
#      train step's host time against its GPU time at batch 32/64/256
#      (bench/profile_resnet.py)                      cap 120 s   -> appended to table.md
#   7. block benchmarks (gpu-quick)                   cap 200 s   -> bench-blocks.json
#   8. only if >= 90 s are left: torch.compile of the ResNet-50 train step (cap 150 s)
#   9. report                                                    -> table.md (printed last)
# Benchmark logs go to bench.log; every result is also appended to partial.jsonl as it is
# measured, so a step cut off by its timeout still reports what it finished.
# Measured on an H100 (torch 2.11, triton 3.6; tests skipped): env 18 s, csrc_ref build
# 42 s, kernels 36 s, models 65 s, blocks 71 s: 232 s, which leaves the tests 190 s and a margin.
#
# The gpu-quick profile (see bench/bench_*.py): kernels at bf16 channels_last batch 256;
# blocks at batch 256 bf16 channels_last with every provider (torch.compile for eval and
# the train step only), plus fp32 NCHW for one block (eager, fused); ResNet-50 at batch 256,
# amp and bf16, eager and fused, and torch.compile for amp inference (its train step only
# in step 7, when time is left: compiling it takes a minute or two).
# Models run before blocks because the blocks' compile cases (last) are the most expendable.
#
# Without CUDA the GPU tests are skipped (CI runs the CPU and interpreter tests) and the
# benchmarks run in their CPU profile (tiny shapes, reference and csrc_ref backends,
# labelled CPU figures): the script still exercises its whole pipeline.

set -u -o pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUDGET=${FUSEDRES_GPU_CHECK_BUDGET:-450}
RESERVE=20                                   # kept for the report at the end
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
rm -f "$OUT"/{env.txt,tests.log,bench.log,partial.jsonl,bench-kernels.json,bench-models.json,bench-blocks.json,table.md}

START=$SECONDS
FAILED=()
SUMMARY=()

# run_step NAME CAP LOG CMD...: CMD under timeout min(CAP, time left), output appended to LOG.
# OPTIONAL=1: a step that only runs if time is left, and whose skip is no failure.
run_step() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$(( BUDGET - (SECONDS - START) - RESERVE ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < ${MIN_STEP:-15} )); then
        if [ "${OPTIONAL:-0}" = 1 ]; then
            echo "SKIPPED: $name: ${left}s of the ${BUDGET}s budget left"
            SUMMARY+=("$name: skipped (budget)")
            return 0
        fi
        echo "FAILED: $name: skipped, ${left}s of the ${BUDGET}s budget left"
        FAILED+=("$name"); SUMMARY+=("$name: skipped (budget)")
        return 1
    fi
    echo "== $name (limit ${limit}s, $(( SECONDS - START ))s elapsed) =="
    echo "== $name: $*" >>"$log"
    local t0=$SECONDS rc
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    local took=$(( SECONDS - t0 ))
    if (( rc == 124 || rc == 137 )); then
        echo "FAILED: $name: timed out after ${took}s (limit ${limit}s); log: $log"
        FAILED+=("$name"); SUMMARY+=("$name: TIMEOUT after ${took}s")
    elif (( rc != 0 )); then
        echo "FAILED: $name: exit code $rc after ${took}s; log: $log"
        tail -n 25 "$log" | sed 's/^/    /'
        FAILED+=("$name"); SUMMARY+=("$name: exit $rc after ${took}s")
    else
        echo "ok: $name (${took}s)"
        SUMMARY+=("$name: ok ${took}s")
    fi
    return $rc
}

# 1. Environment -------------------------------------------------------------------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
            --format=csv || echo "nvidia-smi query failed"
        timeout 20 nvidia-smi || true
    else
        echo "nvidia-smi: not found"
    fi
    timeout 60 "$PY" - <<'EOF' || echo "FAILED: python environment check"
import platform, torch
print("python", platform.python_version(), platform.executable if hasattr(platform, "executable") else "")
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
for mod in ("torchvision", "timm", "pytest", "pytest_benchmark"):
    try:
        m = __import__(mod); print(mod, getattr(m, "__version__", "?"))
    except Exception as e:
        print(mod, "missing:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.multi_processor_count} SMs", f"{p.total_memory / 2**30:.1f} GiB",
          f"L2 {getattr(p, 'L2_cache_size', 0) / 1e6:.0f} MB", f"sm_{p.major}{p.minor}")
else:
    print("device: no CUDA device")
EOF
} 2>&1 | tee "$OUT/env.txt"

if timeout 60 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    HAS_CUDA=1
    unset TRITON_INTERPRET                   # the real kernels, not the interpreter
else
    HAS_CUDA=0
    echo "NOTE: no CUDA device: GPU tests skipped, benchmarks run their CPU profile (harness check)"
fi

# 2. GPU tests ---------------------------------------------------------------------------
if [ "${FUSEDRES_GPU_CHECK_SKIP_TESTS:-0}" != 0 ]; then
    echo "SKIPPED: gpu-tests: FUSEDRES_GPU_CHECK_SKIP_TESTS is set"; SUMMARY+=("gpu-tests: skipped (asked)")
elif (( HAS_CUDA )) && [ -d tests ]; then
    # Only the CUDA cases (CI runs the rest on CPUs), the kernels' own first so that a cap
    # cut-off costs the least; no -x: one GPU visit should show every failure it can.
    run_step "gpu-tests" 190 "$OUT/tests.log" "$PY" -m pytest -m gpu -q -rfE --maxfail=25 \
        -p no:cacheprovider --durations=10 tests/test_kernels.py tests/test_block.py \
        tests/test_distributed.py tests/test_compile.py tests/test_convert.py \
        tests/test_csrc_ref.py
    grep -E '^(FAILED|ERROR)|[0-9]+ (passed|failed|error)' "$OUT/tests.log" | tail -n 30 | sed 's/^/    /'
elif (( HAS_CUDA )); then
    echo "SKIPPED: gpu-tests: no tests/ directory"; SUMMARY+=("gpu-tests: no tests/")
else
    echo "SKIPPED: gpu-tests: no CUDA device (the CPU and interpreter tests run in CI)"
    SUMMARY+=("gpu-tests: skipped (no CUDA)")
fi

# 3. csrc_ref build: once, bounded, so the benchmarks never build it under their own timeout.
if [ -f fusedres/csrc.py ] || [ -d fusedres/csrc ]; then
    if ! run_step "csrc_ref-build" 120 "$OUT/env.txt" "$PY" -c '
import time, torch
from fusedres import csrc
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
t = time.time(); csrc.load(dev); print(f"csrc_ref loaded on {dev} in {time.time() - t:.0f}s")'; then
        export FUSEDRES_BENCH_SKIP_CSRC=1
    fi
else
    echo "SKIPPED: csrc_ref-build: fusedres/csrc.py not present (csrc_ref provider skipped)"
    export FUSEDRES_BENCH_SKIP_CSRC=1
    SUMMARY+=("csrc_ref-build: not present")
fi

# 4-6. Benchmarks ------------------------------------------------------------------------
export FUSEDRES_BENCH_PROFILE=gpu-quick FUSEDRES_BENCH_JSONL="$OUT/partial.jsonl"
touch "$OUT/bench.log"
bench() {  # bench NAME CAP FILE [pytest args]: JSON to bench-NAME.json unless NAME is optional
    local name=$1 cap=$2 file=$3
    shift 3
    local from=$(( $(wc -l <"$OUT/bench.log") + 1 ))
    local json=(--benchmark-json "$OUT/bench-$name.json")
    [ "${OPTIONAL:-0}" = 1 ] && json=()    # at most 8 files in OUTDIR: partial.jsonl has it
    run_step "bench-$name" "$cap" "$OUT/bench.log" "$PY" -m pytest "bench/$file" -q \
        -p no:cacheprovider -rfEsx --durations=5 "${json[@]}" "$@"
    tail -n "+$from" "$OUT/bench.log" | grep -E '^(FAILED|ERROR|SKIPPED|XFAIL)|[0-9]+ (passed|failed|error)' \
        | cut -c1-220 | tail -n 8 | sed 's/^/    /'
}
bench kernels 60 bench_kernels.py
bench models 120 bench_models.py
# The profile's tables go to a file outside OUTDIR (at most 8 files there) and are appended
# to table.md after the report; the script stops starting cases near its own budget.
PROFILE_MD=$(mktemp)
if (( HAS_CUDA )); then
    run_step "profile" 120 "$PROFILE_MD" "$PY" bench/profile_resnet.py --budget 100
else
    echo "SKIPPED: profile: no CUDA device (GPU time by category needs a GPU)"
    SUMMARY+=("profile: skipped (no CUDA)")
fi
bench blocks 200 bench_blocks.py
# Only with time to spare (typically when the tests were quick): torch.compile of the whole
# ResNet-50 train step, forward and backward graphs, a minute or two of compiling.
if (( HAS_CUDA )); then
    FUSEDRES_BENCH_COMPILE_TRAIN=1 OPTIONAL=1 MIN_STEP=90 \
        bench compile-train 150 bench_models.py -k "train_step and compile"
fi

# 9. Report ------------------------------------------------------------------------------
REPORT_IN=()
for f in "$OUT"/bench-kernels.json "$OUT"/bench-models.json "$OUT"/bench-blocks.json "$OUT"/partial.jsonl; do
    [ -s "$f" ] && REPORT_IN+=("$f")
done
if (( ${#REPORT_IN[@]} )); then
    timeout 60 "$PY" bench/report.py "${REPORT_IN[@]}" >"$OUT/table.md" 2>>"$OUT/bench.log" \
        || { echo "FAILED: report"; FAILED+=("report"); }
else
    echo "FAILED: report: no benchmark results"; FAILED+=("report")
    echo "# fusedres benchmarks: no results" >"$OUT/table.md"
fi

if [ -s "$PROFILE_MD" ]; then
    { echo; grep -v '^== ' "$PROFILE_MD"; } >>"$OUT/table.md"
fi
rm -f "$PROFILE_MD"

echo
echo "== summary ($(( SECONDS - START ))s in all; files in $OUT: $(ls "$OUT" | tr '\n' ' '))"
for s in "${SUMMARY[@]}"; do echo "  $s"; done
if (( ${#FAILED[@]} )); then echo "FAILED steps: ${FAILED[*]}"; else echo "all steps ok"; fi
echo
cat "$OUT/table.md"
(( ${#FAILED[@]} == 0 ))
