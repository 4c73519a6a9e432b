#!/usr/bin/env bash
# One prepared command for the day a GPU is lent (one call of at most 10 minutes; only $OUT comes back).
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh        # default OUT: runs/gpu_check
#   GPU_CHECK_DRY=1 OUT=/tmp/x bash benchmarks/gpu_check.sh   # the same script on the CuPy stand-in (CI)
#
# Needs only what the GPU machine has: python3 with cupy, numpy, torch (CUDA), pytest
# (pytest-xdist used when importable), the tree as copied (not installed); no dataset, no network.
# Ends within ~7.5 minutes including NVRTC compilation. Stages, each with its own time limit;
# a stage that fails or times out is recorded (rc, seconds, log tail) and the next one runs:
#
#   device   nvidia-smi and CuPy's device properties                                      <= 30 s
#   memory   (CPU, in the background from the start) the CuPy stand-in's bytes per step
#            of the cifar10 preset at batch 128, extrapolated (tests/test_gpu_memory.py)  <= 200 s
#   warmup   compile every kernels/*.cu for float32 and float64 (CuPy's disk cache)      <= 75 s
#   pytest   pytest -m gpu on real CuPy (-n 4 with pytest-xdist), junit XML              <= 150 s
#   steps    benchmarks/gpu_check.py steps: per objective, fp32 and TF32: our step time,
#            counted GEMM FLOPs, share of peak, predicted (docs/performance.md's model),
#            pool bytes; PyTorch eager fwd / fwd+bwd of the same network               <= 190 s
#
# $OUT gets exactly three files: summary.json (every stage's result or its error),
# summary.md (the tables), rest.tar.gz (logs, junit XML, raw JSON). The fashion-mnist
# run of earlier versions is gone: the GPU machine has no dataset and no network.
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-runs/gpu_check}
DRY=${GPU_CHECK_DRY:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if [ "$DRY" = "1" ]; then
    # the CuPy stand-in (tests/cupy_standin, kernels run by tests/gpu_emulator) plays the GPU
    export TTFM_CUPY_STANDIN=1 PYTHONPATH="$PWD/tests/cupy_standin${PYTHONPATH:+:$PYTHONPATH}"
    PRESET=tiny RES=8 BATCH=2 WARMUP=0 ITERS=1 TORCH_DEVICE=cpu STEPS_BUDGET=60
    PYTEST_ARGS="tests/test_cuda_kernels.py -k pool_cupy_matches"
    T_DEVICE=30 T_MEMORY=60 T_WARMUP=60 T_PYTEST=60 T_STEPS=90
else
    export TTFM_CUPY_STANDIN=0
    PRESET=cifar10 RES=32 BATCH=128 WARMUP=1 ITERS=2 TORCH_DEVICE=cuda STEPS_BUDGET=160
    PYTEST_ARGS="tests/"
    T_DEVICE=30 T_MEMORY=200 T_WARMUP=75 T_PYTEST=150 T_STEPS=190
fi

# run_stage NAME SECONDS CMD...: the command's output in $WORK/NAME.log, its rc and time in stage_NAME.json
run_stage() {
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    echo "== $name (<= ${limit} s)"
    timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    local note=""
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && note=", \"error\": \"timed out after $limit s\""
    echo "{\"rc\": $rc, \"wall_s\": $(( $(date +%s) - t0 ))$note}" > "$WORK/stage_$name.json"
    tail -n 3 "$WORK/$name.log"
    summarize                          # after every stage: a run cut off later still leaves its summary
}

summarize() {
    "$PY" benchmarks/gpu_check.py summarize --work "$WORK" --out "$OUT" --start "$START" \
        $([ "$DRY" = "1" ] && echo --dry) > "$WORK/summarize.log" 2>&1 || echo "summarize failed: $(tail -n 5 "$WORK/summarize.log")"
}

# memory: CPU only, started first so that it overlaps the GPU stages
MEM_PRESET=$([ "$DRY" = "1" ] && echo tiny || echo cifar10)
( t0=$(date +%s)
  TTFM_CUPY_STANDIN=1 PYTHONPATH="$PWD/tests/cupy_standin:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" \
  timeout -k 10 "$T_MEMORY" "$PY" -c "
import json, sys
import test_gpu_memory as m
kinds = ('teacher', 'itvm', 'lfmd', 'ecd', 'meanflow')
print(json.dumps({k: m.extrapolate(k, '$MEM_PRESET', $BATCH) for k in kinds}))
" > "$WORK/memory.out" 2> "$WORK/memory.log"
  rc=$?
  tail -n 1 "$WORK/memory.out" > "$WORK/memory.json"
  echo "{\"rc\": $rc, \"wall_s\": $(( $(date +%s) - t0 ))}" > "$WORK/stage_memory.json" ) &
MEM_PID=$!

# device: what the driver and CuPy say (nvidia-smi is absent in the dry run: recorded, not fatal)
run_stage device "$T_DEVICE" "$PY" -c "
import json, subprocess
info = {}
try:
    info['nvidia_smi'] = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version,clocks.max.sm',
                                         '--format=csv'], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as exc:
    info['nvidia_smi'] = 'error: ' + repr(exc)
import cupy
p = cupy.cuda.runtime.getDeviceProperties(0)
info['name'] = p['name'].decode() if isinstance(p['name'], bytes) else str(p['name'])
info['total_memory_bytes'] = int(p.get('totalGlobalMem', 0))
info['cupy'] = cupy.__version__
info['cuda_runtime'] = cupy.cuda.runtime.runtimeGetVersion()
json.dump(info, open('$WORK/device.json', 'w'), indent=1)
print(info['name'])
"

# warmup: NVRTC compiles each kernel once; CuPy's disk cache serves every later process
run_stage warmup "$T_WARMUP" "$PY" benchmarks/gpu_check.py warmup

# pytest -m gpu: in parallel workers where pytest-xdist is importable, else one process
XDIST=""
if [ "$DRY" != "1" ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 4"; fi
# shellcheck disable=SC2086
run_stage pytest "$T_PYTEST" "$PY" -m pytest -q -rfE --tb=short -m gpu $PYTEST_ARGS $XDIST -p no:cacheprovider \
    --junitxml="$WORK/pytest_junit.xml" -o junit_family=xunit1

# steps: ours vs PyTorch eager, fp32 and TF32
run_stage steps "$T_STEPS" "$PY" benchmarks/gpu_check.py steps --out "$WORK/steps" --preset "$PRESET" \
    --batch "$BATCH" --resolution "$RES" --warmup "$WARMUP" --iters "$ITERS" --torch-device "$TORCH_DEVICE" --budget-s "$STEPS_BUDGET"

wait "$MEM_PID"
summarize
cat "$OUT/summary.md" 2>/dev/null
# everything else in one tarball (the three files are all that $OUT holds)
tar -czf "$OUT/rest.tar.gz" -C "$WORK" . 2>/dev/null
rm -rf "$WORK"
echo "gpu_check: $(( $(date +%s) - START )) s, results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
