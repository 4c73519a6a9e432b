#!/usr/bin/env bash
# One prepared command for the day a GPU is lent (slots of ~15 minutes): finishes in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # results in runs/gpu_check/ (OUT=... to change)
#
# 1. pytest -m gpu on real CuPy (TTFM_CUPY_STANDIN=0: the stand-in is not used)     <= 110 s
# 2. step time of each objective (teacher, ITVM, LFMD, ECD) on the small and cifar10
#    presets at batch 128 against PyTorch eager fp32/tf32, TFLOP/s, fraction of peak,
#    the CuPy pool's peak bytes beside the stand-in's figure (benchmarks/gpu_check.py)  <= 180 s
# 3. fashion-mnist: a teacher for 55 s, then ITVM distillation from it for 55 s
#    (stopped by SIGINT, which saves a checkpoint; killed 20 s later if still busy;
#    needs the dataset in the data root)                                              <= 2 x 75 s
# Everything lands in $OUT/gpu_check_all.json and $OUT/gpu_check.md.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export TTFM_CUPY_STANDIN=0 PYTHONUNBUFFERED=1          # (every command below names --device gpu itself)
START=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1
# the stand-in's memory figures are CPU work: computed in the background meanwhile
( TTFM_CUPY_STANDIN=1 timeout 100 python -c "
import sys, json; sys.path[:0] = ['tests/cupy_standin', 'tests']
import test_gpu_memory as m
print(json.dumps({k: m.extrapolate(k, 'cifar10', 128)['at_batch'] for k in ('teacher', 'itvm', 'lfmd', 'ecd')}))
" > "$OUT/standin_bytes.json" 2> "$OUT/standin_bytes.log" ) &
STANDIN_PID=$!

echo "== 1. pytest -m gpu (real CuPy)"
timeout 110 python -m pytest -q -m gpu tests/ -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1
echo $? > "$OUT/pytest_gpu.rc"
tail -3 "$OUT/pytest_gpu.log"

echo "== 2. step times and memory"
wait $STANDIN_PID
timeout 180 python benchmarks/gpu_check.py --out "$OUT" --batch 128 --warmup 1 --iters 3 \
    --standin-json "$OUT/standin_bytes.json" > "$OUT/gpu_check.log" 2>&1
echo $? > "$OUT/gpu_check.rc"
tail -12 "$OUT/gpu_check.log"

echo "== 3. fashion-mnist teacher + ITVM, 55 s each"
rm -rf "$OUT/fm_teacher" "$OUT/fm_itvm"
timeout -s INT -k 20 55 python cli.py train --data fashion-mnist --device gpu --steps 100000 --log-every 20 \
    --ckpt-every 200 --sample-every 0 --out "$OUT/fm_teacher" > "$OUT/fm_teacher.log" 2>&1
echo $? > "$OUT/fm_teacher.rc"
timeout -s INT -k 20 55 python cli.py distill --data fashion-mnist --teacher "$OUT/fm_teacher" --loss itvm --device gpu \
    --steps 100000 --log-every 20 --ckpt-every 200 --sample-every 0 --out "$OUT/fm_itvm" > "$OUT/fm_itvm.log" 2>&1
echo $? > "$OUT/fm_itvm.rc"

python - "$OUT" "$START" <<'EOF'
import json, os, sys, time
out, start = sys.argv[1], int(sys.argv[2])
read = lambda name: open(os.path.join(out, name)).read() if os.path.exists(os.path.join(out, name)) else ""
rec = {"nvidia_smi": read("nvidia-smi.csv").strip(),
       "pytest_gpu": {"rc": read("pytest_gpu.rc").strip(), "summary": read("pytest_gpu.log").strip().splitlines()[-1:]},
       "gpu_check_rc": read("gpu_check.rc").strip()}
if read("gpu_check.json"):
    rec["steps"] = json.loads(read("gpu_check.json"))
for run in ("fm_teacher", "fm_itvm"):
    lines = [json.loads(l) for l in read(f"{run}/metrics.jsonl").splitlines() if l.strip()]
    rec[run] = {"rc": read(f"{run}.rc").strip(), "metrics_lines": len(lines), "first": lines[:1], "last": lines[-1:],
                "log_tail": read(f"{run}.log").strip().splitlines()[-3:]}
rec["wall_s"] = time.time() - start
json.dump(rec, open(os.path.join(out, "gpu_check_all.json"), "w"), indent=1)
with open(os.path.join(out, "gpu_check.md"), "a") as f:
    f.write(f"\npytest -m gpu: rc {rec['pytest_gpu']['rc']}, {rec['pytest_gpu']['summary']}\n")
    for run in ("fm_teacher", "fm_itvm"):
        last = rec[run]["last"][0] if rec[run]["last"] else {}
        f.write(f"{run}: {rec[run]['metrics_lines']} metrics lines, last {json.dumps(last)}\n")
    f.write(f"wall time {rec['wall_s']:.0f} s\n")
print(open(os.path.join(out, "gpu_check.md")).read())
EOF
