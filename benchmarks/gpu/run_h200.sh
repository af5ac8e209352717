#!/usr/bin/env bash
# Issues 8 and 13's GPU measurements in one command, on the lent H200, from the repository root:
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
#   1b. c02_trainer: the same models with the pipeline trainer's DeepSpeed step (ZeRO-2, bf16, its AdamW,
#      uint8 input normalised on the GPU) beside the bare step and timm; needs deepspeed from .whl/
#   6. loader: images/s per core of the streaming training loader before/after the uint8 change vs worker
#      count on the 16 cores, JPEG decode on GPU vs PIL (speed, pixels); needs mosaicml-streaming
#
# Wheels: whatever .whl/ holds (carry it; ../shared/device/fetch-wheels.sh, plus the streaming wheels listed in
# benchmarks/gpu/README.md) is installed once into /tmp/site, which is on EVERY section's path: anything that
# imports pipeline needs pydantic (pipeline.train.config). Without deepspeed / streaming the sections that need
# them are skipped with a line in status.txt and the rest still runs.
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
SECTIONS=${SECTIONS:-"check_cuda c02_eager c02_trainer c02_compiled c5_compiled c7_maxbatch profile loader"}
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
# The carried wheels, once, into a directory of their own: the sections without them keep the machine's packages.
WPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/wheels_install.log" 2>&1 && WPATH=/tmp/site:$WPATH
fi
export PYTHONPATH=$WPATH  # every section: pipeline.train.config imports pydantic
importable() { PYTHONPATH=$WPATH $PY -c "import $1" > "$OUT/import_$1.log" 2>&1; }

section check_cuda 90 $PY benchmarks/gpu/check_cuda.py
section c02_eager 100 $PY $BENCH --models coatnet_0 coatnet_2 --batch 256 --peak 790 --steps 15 --warmup 3 \
  --json "$OUT/c02_eager.json" --md "$OUT/c02_eager.md"
if wanted c02_trainer; then
  if importable deepspeed; then
    section c02_trainer 200 $PY $BENCH --models coatnet_0 coatnet_2 --batch 256 --peak 790 \
      --steps 15 --warmup 3 --trainer --json "$OUT/c02_trainer.json" --md "$OUT/c02_trainer.md"
  else
    echo "c02_trainer skipped: deepspeed not importable (run ../shared/device/fetch-wheels.sh, carry .whl;" \
      "see import_deepspeed.log)" | tee -a "$OUT/status.txt"
  fi
fi
section c02_compiled 150 $PY $BENCH --models coatnet_0 coatnet_2 --batch 256 --peak 790 --steps 15 --warmup 3 \
  --compile ours --json "$OUT/c02_compiled.json" --md "$OUT/c02_compiled.md"
section c5_compiled 80 $PY $BENCH --models coatnet_5 --batch 64 --peak 790 --steps 10 --warmup 3 \
  --compile ours --json "$OUT/c5.json" --md "$OUT/c5.md"
section c7_maxbatch 90 $PY $BENCH --models coatnet_7 --max-batch --grad-ckpt --batch 64 --steps 3 --warmup 1 \
  --max-batch-limit 1024 --peak 790 --json "$OUT/c7.json" --md "$OUT/c7.md"
section profile 45 $PY benchmarks/gpu/profile_step.py --model coatnet_0 --batch 128 --reps 5 --out "$OUT/profile"
if wanted loader; then
  if importable streaming; then
    # 24 passes (2 recipes x 2 paths x 3 worker counts x 2 repeats) of about 3.5 s, and making the corpus.
    section loader 200 $PY benchmarks/loader_throughput.py --images 2048 --batch 32 \
      --workers 1 8 16 --repeats 2 --pass-seconds 3 --project-cores 16 --gpu-decode --json "$OUT/loader.json"
  else
    echo "loader skipped: mosaicml-streaming not importable (fetch the wheels in benchmarks/gpu/README.md" \
      "into .whl and carry it; see import_streaming.log)" | tee -a "$OUT/status.txt"
  fi
fi
cat "$OUT"/*.md > "$OUT/summary.md" 2>/dev/null
echo "done in $(( $(date +%s) - start ))s"
