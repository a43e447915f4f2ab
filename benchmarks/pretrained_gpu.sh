#!/usr/bin/env bash
# The path from AlphaFold2 parameters on a GPU, full size: a randomly initialised `af2_ptm` model is written
# in AlphaFold2's .npz layout (as a stand-in for params_model_3_ptm.npz, which cannot be downloaded here),
# `protfold convert` turns it into a checkpoint, `protfold predict` runs on the GPU from it (PDB, mmCIF,
# confidence JSON with PAE and pTM, both PNGs; time and peak CUDA memory), and `protfold fit -c
# configs/finetune_af2.yaml` fine-tunes from it for a few steps in bf16 (perf.json: step time, peak memory;
# metrics.csv: train/pae). Everything goes to OUT (default /tmp/pretrained_gpu); nothing into the checkout
# but the prepared samples' cache in WORK.
#   bash benchmarks/pretrained_gpu.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pretrained_gpu}
WORK=${WORK:-/tmp/pretrained_gpu_work}
STEPS=${1:-4}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
stamp() { echo "$(date -u +%FT%TZ) $*"; }

stamp "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" \
  | tee -a "$OUT/gpu.txt"

stamp "prepare the shipped samples"
python3 -m protfold.cli prepare data/samples --out "$WORK/cache" --msa_dir data/samples/msas --no_progress

stamp "write a randomly initialised af2_ptm model in AlphaFold2's .npz layout"
python3 - "$WORK/params_model_random_ptm.npz" <<'EOF'
import sys

import numpy as np
import torch

from protfold.config import model_preset
from protfold.model.alphafold import AlphaFold
from protfold.weights import export_af2

torch.manual_seed(0)
cfg = model_preset("af2_ptm")
arrays = export_af2(AlphaFold(cfg=cfg).state_dict(), cfg)
np.savez(sys.argv[1], **arrays)
print(f"{len(arrays)} arrays, {sum(a.size for a in arrays.values()):,} numbers")
EOF

stamp "convert"
/usr/bin/time -f "convert: %e s, peak RSS %M KiB" python3 -m protfold.cli convert \
  "$WORK/params_model_random_ptm.npz" --out "$WORK/af2_ptm.ckpt" --overwrite 2>&1 | tee "$OUT/convert.txt"

stamp "predict on the GPU"
python3 - "$WORK/af2_ptm.ckpt" "$OUT/predict" <<'EOF' | tee "$OUT/predict.txt"
import json
import sys
import time

import torch

from protfold.cli import main

start = time.perf_counter()
code = main(["predict", "--ckpt_path", sys.argv[1], "--input", "data/predict/3u8v_A.fasta",
             "--msa_dir", "data/samples/msas", "--out", sys.argv[2], "--device", "cuda", "--overwrite"])
record = {"exit": code, "wall_s": round(time.perf_counter() - start, 2),
          "peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
          "card": torch.cuda.get_device_name(), "torch": torch.__version__,
          "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
confidence = json.load(open(f"{sys.argv[2]}/3u8v_A/3u8v_A_confidence.json"))
record.update(n_res=len(confidence["plddt"]), ptm=confidence["ptm"],
              pae_shape=[len(confidence["predicted_aligned_error"]), len(confidence["predicted_aligned_error"][0])])
print(json.dumps(record))
sys.exit(code)
EOF
ls -l "$OUT/predict/3u8v_A" | tee -a "$OUT/predict.txt"

stamp "fine-tune with configs/finetune_af2.yaml for $STEPS steps"
python3 -m protfold.cli fit -c configs/sample.yaml -c configs/finetune_af2.yaml \
  --model.init_from "$WORK/af2_ptm.ckpt" --data.cache_dir "$WORK/cache" --trainer.max_steps "$STEPS" \
  --trainer.limit_val_batches 0 --trainer.log_every_n_steps 1 --trainer.enable_progress_bar false \
  --trainer.default_root_dir "$WORK/finetune" --data.num_workers 4 2>&1 | tee "$OUT/finetune.log"
run=$(ls -td "$WORK"/finetune/protfold/version_* | head -n 1)
cp "$run/perf.json" "$run/metrics.csv" "$OUT/"
stamp "done"
