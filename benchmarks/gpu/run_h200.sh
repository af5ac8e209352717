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
#   6. loader: images/s of the streaming training loader (decode + augmentation) vs worker count on the
#      16 cores, JPEG decode on GPU vs PIL; needs mosaicml-streaming and the wheels listed in
#      benchmarks/gpu/README.md in .whl/ (carry it), else it is skipped and the rest still runs
#
# Run it through the device tool with timeout_s=600:  bash benchmarks/gpu/run_h200.sh
# SECTIONS="loader" (names as in the SECTIONS default below) runs only those sections. A section whose limit
# would take the script past BUDGET_S seconds (default 585) is skipped, named in status.txt.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
PY=${PY:-python3}
BENCH=benchmarks/model_throughput.py
mkdir -p "$OUT"
start=$(date +%s)
SECTIONS=${SECTIONS:-"check_cuda c02_eager c02_compiled c5_compiled c7_maxbatch profile loader"}
BUDGET_S=${BUDGET_S:-585}
wanted() { [[ " $SECTIONS " == *" $1 "* ]]; }
section() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  wanted "$name" || return 0
  if (( $(date +%s) - start + secs > BUDGET_S )); then
    echo "$name skipped: its ${secs}s limit would pass BUDGET_S=${BUDGET_S}s (run it alone: SECTIONS=$name)" \
      | tee -a "$OUT/status.txt"
    return 0
  fi
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
# The loader needs mosaicml-streaming, which that machine lacks: use it if already importable (the
# fetch-wheels install line ran), else install .whl/ into a directory of its own for this section only.
if wanted loader; then
  LPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
  if ! PYTHONPATH=$LPATH $PY -c "import streaming" 2>/dev/null && ls .whl/mosaicml_streaming-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-loader \
      .whl/*.whl > "$OUT/loader_install.log" 2>&1
    LPATH=/tmp/site-loader:$LPATH
  fi
  if PYTHONPATH=$LPATH $PY -c "import streaming" > "$OUT/loader_import.log" 2>&1; then
    PYTHONPATH=$LPATH section loader 150 $PY benchmarks/loader_throughput.py --images 2048 --batch 32 \
      --workers 1 4 8 16 --repeats 2 --pass-seconds 4 --project-cores 16 --gpu-decode --json "$OUT/loader.json"
  else
    echo "loader skipped: mosaicml-streaming not importable (fetch the wheels in benchmarks/gpu/README.md" \
      "into .whl and carry it; see loader_import.log)" | tee -a "$OUT/status.txt"
  fi
fi
cat "$OUT"/*.md > "$OUT/summary.md" 2>/dev/null
echo "done in $(( $(date +%s) - start ))s"
