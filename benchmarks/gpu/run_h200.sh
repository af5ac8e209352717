#!/usr/bin/env bash
# Issue 8's GPU measurements in one command, on the lent H200, from the repository root:
#
#     bash benchmarks/gpu/run_h200.sh
#
# Self-contained: needs only python3 with torch (CUDA) and timm, both on that machine; this
# repository's coatnet/ is imported from the checkout. Every section is bounded by `timeout`, so the
# whole script stays under ~9.5 minutes (one device command may run 10); results go to $OUT as JSON and
# markdown, plus a log per section. A section that fails or times out leaves the others' results.
#
#   0. CUDA equality checks of the optimised paths (SDPA vs eager, compile vs eager, cache, layout)
#   1. coatnet_0 / coatnet_2, 224, batch 256, bf16: this project (eager) vs timm (eager), same run
#   2. the same with this project compiled (torch.compile), timm eager (timm's compiled model fails)
#   3. coatnet_5, 224, batch 64, bf16, compiled: utilisation against 790 TFLOP/s, timm alongside
#   4. coatnet_7, 224: largest micro-batch that trains with activation checkpointing, and its images/s
#   5. torch.profiler of a coatnet_0 step (top CUDA kernels) and A/B of the model-side options
#
# Run it through the device tool with timeout_s=600:  bash benchmarks/gpu/run_h200.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
PY=${PY:-python3}
BENCH=benchmarks/model_throughput.py
mkdir -p "$OUT"
start=$(date +%s)
section() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s, t=$(( $(date +%s) - start ))s)"
  timeout --kill-after=10 "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc" | tee -a "$OUT/status.txt"
  tail -n 25 "$OUT/$name.log"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch, timm; print(torch.__version__, timm.__version__)"; } > "$OUT/env.txt" 2>&1

section check_cuda 90 $PY benchmarks/gpu/check_cuda.py
section c02_eager 100 $PY $BENCH --models coatnet_0 coatnet_2 --batch 256 --peak 790 --steps 15 --warmup 3 \
  --json "$OUT/c02_eager.json" --md "$OUT/c02_eager.md"
section c02_compiled 150 $PY $BENCH --models coatnet_0 coatnet_2 --batch 256 --peak 790 --steps 15 --warmup 3 \
  --compile ours --json "$OUT/c02_compiled.json" --md "$OUT/c02_compiled.md"
section c5_compiled 80 $PY $BENCH --models coatnet_5 --batch 64 --peak 790 --steps 10 --warmup 3 \
  --compile ours --json "$OUT/c5.json" --md "$OUT/c5.md"
section c7_maxbatch 90 $PY $BENCH --models coatnet_7 --max-batch --grad-ckpt --batch 64 --steps 3 --warmup 1 \
  --max-batch-limit 1024 --peak 790 --json "$OUT/c7.json" --md "$OUT/c7.md"
section profile 45 $PY benchmarks/gpu/profile_step.py --model coatnet_0 --batch 128 --reps 5 --out "$OUT/profile"
cat "$OUT"/*.md > "$OUT/summary.md" 2>/dev/null
echo "done in $(( $(date +%s) - start ))s"
