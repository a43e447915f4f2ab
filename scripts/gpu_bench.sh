#!/usr/bin/env bash
# protfold bench on one H100 80GB: the commands behind benchmarks/NOTES.md ("Measured").
#
# Usage (from the repository root, PYTHONPATH set up, $OUT an empty folder):
#   scripts/gpu_bench.sh NAME [NAME ...]    run the named steps (each writes $OUT/NAME/)
#   scripts/gpu_bench.sh                    run every step in order (about an hour in all)
# Each step is sized for one device call of at most ~8 minutes; --time-limit / --budget-time stop a step
# early (what ran is still written; the rest is recorded as skipped or as a lower bound).
#
# Steps:
#   initial_256_384   af2, bf16, 128 rows / 1024 extra, crops 256,384, modes none,recompute,chunked,low
#   initial_512_768   the same at crops 512,768 (none skipped above 384: it cannot fit)
#   initial_1024_rc   the same at crop 1024, mode recompute
#   initial_1024_low  the same at crop 1024, mode low
#   finetune          crop 384, 512 rows / 5120 extra, modes recompute,low, bf16
#   budget_low        largest crop of mode low within 80GB at 128/1024 (probes from 1280 upwards)
#   evoformer         Evoformer stack alone (48 blocks), fp32 inputs, bf16 autocast, crops 256,384,512
#   inference_4096    one Evoformer block, no grad, bf16, 4096 residues, mode low
set -euo pipefail

OUT=${OUT:?set OUT to the output folder}
BENCH=(python3 -m protfold.bench.runner --model af2 --device cuda --precisions bf16)
INITIAL=(--rows 128 --extra-rows 1024 --steps 2 --warmup 1)

initial_256_384() {
  "${BENCH[@]}" "${INITIAL[@]}" --crops 256,384 --modes none,recompute,chunked,low \
    --skip-above none/fp32=384 --time-limit 420 --out "$OUT/initial_256_384"
}

initial_512_768() {
  "${BENCH[@]}" "${INITIAL[@]}" --crops 512,768 --modes none,recompute,chunked,low \
    --skip-above none=384 --skip-above chunked=512 --infer-steps 1 --time-limit 400 --out "$OUT/initial_512_768"
}

initial_1024_rc() {
  "${BENCH[@]}" "${INITIAL[@]}" --crops 1024 --modes recompute --infer-steps 1 --time-limit 300 \
    --out "$OUT/initial_1024_rc"
}

initial_1024_low() {
  "${BENCH[@]}" "${INITIAL[@]}" --crops 1024 --modes low --infer-steps 1 --time-limit 300 \
    --out "$OUT/initial_1024_low"
}

finetune() {
  "${BENCH[@]}" --rows 512 --extra-rows 5120 --steps 2 --warmup 1 --crops 384 --modes recompute,low \
    --time-limit 420 --out "$OUT/finetune"
}

budget_low() {
  # One training step per probe; probes from 1280 in steps of 128, then bisection to 32. If the time runs
  # out, max_crop is a lower bound: rerun with --crops set to the first crop not yet decided.
  "${BENCH[@]}" --rows 128 --extra-rows 1024 --modes low --crops 1280 --budget 80GB --budget-only \
    --budget-time 420 --out "$OUT/budget_low"
}

evoformer() {
  "${BENCH[@]}" --evoformer-only --rows 128 --steps 2 --warmup 1 --crops 256,384,512 --modes recompute,low \
    --time-limit 420 --out "$OUT/evoformer"
}

inference_4096() {
  "${BENCH[@]}" --inference-block --rows 128 --steps 2 --warmup 1 --crops 4096 --modes low \
    --out "$OUT/inference_4096"
}

ALL=(initial_256_384 initial_512_768 initial_1024_rc initial_1024_low finetune budget_low evoformer inference_4096)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv > "$OUT/gpu.txt" 2>/dev/null || true
for name in "${@:-${ALL[@]}}"; do
  if ! declare -F "$name" > /dev/null; then
    echo "gpu_bench.sh: unknown step '$name' (steps: ${ALL[*]})" >&2
    exit 2
  fi
  echo "== $name"
  "$name"
done
