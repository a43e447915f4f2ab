#!/usr/bin/env bash
# The main job on a fresh machine: install protfold (CPU torch), prepare the shipped samples, train the
# `small` preset on them (configs/sample.yaml), validate, then predict a validation protein.
# Extra arguments go to `protfold fit` (e.g. --trainer.max_steps 40).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" 2>/dev/null || python3 -m pip install -q "torch>=2.6,<2.15"
python3 -m pip install -q -e . -c constraints.txt
protfold prepare data/samples --out cache/samples --msa_dir data/samples/msas
protfold fit -c configs/sample.yaml "$@"
run=$(ls -td runs/sample/protfold/version_* | head -n 1)
protfold validate -c configs/sample.yaml --ckpt_path "$run/checkpoints/last.ckpt" --trainer.logger false
protfold predict --ckpt_path "$run/checkpoints/last.ckpt" --input data/predict/3u8v_A.fasta \
  --msa_dir data/samples/msas --out predictions --overwrite
echo "training log: $run/metrics.csv, curves: $run/curves.png"
echo "predicted structure: predictions/3u8v_A/3u8v_A.pdb (pLDDT x 100 in the B-factor column)"
