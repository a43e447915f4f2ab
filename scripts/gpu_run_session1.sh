#!/usr/bin/env bash
# The GPU measurements behind benchmarks/RESULTS.md (one device call, ~8 minutes on one H100 80GB).
# Run from the repository root with $OUT set; each bench writes $OUT/<name>/results.{json,csv} + plot.
set -uo pipefail
OUT=${OUT:?set OUT}
export PYTHONUNBUFFERED=1
B=(python3 -m protfold.bench.runner --model af2 --device cuda --precisions bf16)
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt"
timeout 60 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tail -4 | tee "$OUT/pytest_gpu.txt"
# AF2 initial-training shapes, one recycle (one no-grad pass + the grad pass), as OpenFold was measured
"${B[@]}" --rows 128 --extra-rows 1024 --recycles 1 --steps 2 --warmup 1 --infer-steps 1 --crops 256 \
  --modes none,recompute,offload,chunked,low --time-limit 140 --out "$OUT/initial_256"
"${B[@]}" --rows 128 --extra-rows 1024 --recycles 1 --steps 1 --warmup 1 --infer-steps 1 --crops 512 \
  --modes offload,low --time-limit 90 --out "$OUT/initial_512"
# fine-tuning shapes
"${B[@]}" --rows 512 --extra-rows 5120 --recycles 1 --steps 1 --warmup 1 --no-infer --crops 384 \
  --modes low --time-limit 70 --out "$OUT/finetune_384"
# the 48-block Evoformer alone (OpenFold's H200 table), fp32 inputs, bf16 autocast
"${B[@]}" --evoformer-only --rows 128 --steps 2 --warmup 1 --crops 256,384,512 --modes offload \
  --time-limit 70 --out "$OUT/evoformer"
# one Evoformer block, no grad, 4096 residues
"${B[@]}" --inference-block --rows 128 --steps 1 --warmup 1 --crops 4096 --modes low --time-limit 40 \
  --out "$OUT/inference_4096"
