#!/usr/bin/env bash
# Issue 5's GPU check: the af2 preset trains a few steps in bf16 through `protfold fit` on one GPU, then with
# DDP on two GPUs (run on a 2-GPU machine). Writes logs under $OUT. Needs biopython and jsonargparse wheels
# on the device (see the device README) for `protfold prepare` and LightningCLI.
set -euo pipefail
OUT=${OUT:?set OUT}
python3 -m protfold.cli prepare data/samples --out cache/samples --msa_dir data/samples/msas --no_progress
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
python3 -m protfold.cli fit -c configs/sample.yaml -c configs/gpu_af2.yaml --trainer.enable_progress_bar false \
  --trainer.default_root_dir "$OUT/one_gpu" 2>&1 | tee "$OUT/one_gpu.log" | tail -20
if [ "$n" -ge 2 ]; then
  python3 -m protfold.cli fit -c configs/sample.yaml -c configs/gpu_af2.yaml -c configs/trainer/ddp.yaml \
    --trainer.enable_progress_bar false --trainer.default_root_dir "$OUT/ddp2" 2>&1 | tee "$OUT/ddp2.log" | tail -20
fi
