#!/usr/bin/env bash
# Second device call (one H100 80GB): initial shapes at crop 256 per mode, `none` on its own (it runs out of
# memory), the lowest-memory Evoformer stack, and one Evoformer block at 4096 residues with adaptive chunks.
set -uo pipefail
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1
B=(python3 -m protfold.bench.runner --model af2 --device cuda --precisions bf16)
run() { name=$1; shift; "${B[@]}" "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1; echo "== $name rc=$?"; grep -E "^(#|[a-z]+ +(bf16|fp32))" "$OUT/$name.log" | cut -c1-190; grep -E "Error|error:" "$OUT/$name.log" | tail -3; }
run initial_256 --rows 128 --extra-rows 1024 --recycles 1 --steps 2 --warmup 1 --infer-steps 1 --crops 256 \
  --modes recompute,offload,low,chunked --time-limit 200
run evoformer_low --evoformer-only --rows 128 --steps 2 --warmup 1 --crops 256,512 --modes low --time-limit 60
run inference_4096 --inference-block --rows 128 --steps 1 --warmup 1 --crops 4096 --modes low --time-limit 90
run none_256 --rows 128 --extra-rows 1024 --recycles 1 --steps 1 --warmup 1 --infer-steps 1 --crops 256 \
  --modes none --time-limit 40
