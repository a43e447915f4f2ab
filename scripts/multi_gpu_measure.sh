#!/usr/bin/env bash
# Issue 18's measurements on one host with 2+ GPUs: DDP and sharded (FSDP2) training of the af2 preset.
#   bash scripts/multi_gpu_measure.sh scaling OUT [NGPUS...]   # step time, peak per GPU, throughput: 1 GPU, then
#                                                            # each NGPUS (default 2) with ddp and fsdp, initial
#                                                            # (crop 256, 128/1024) and fine-tune (384, 512/5120) shapes
#   bash scripts/multi_gpu_measure.sh maxcrop OUT [NGPUS]     # largest crop that trains: 1 GPU vs NGPUS with fsdp
#   bash scripts/multi_gpu_measure.sh resume OUT [NGPUS]      # 6 steps straight vs 3 + resume to 6 (fsdp), compared
# Every run is `protfold fit` started by scripts/torchrun_fit.sh; its perf.json (per-step seconds, peak CUDA memory
# of rank 0, samples/s, card, torch version, command, date) is copied to OUT/<run>/, and OUT/summary.tsv gets
# one line per run. Runs that fail (out of memory) leave their log in OUT/<run>/log.txt.
set -uo pipefail
MODE=${1:?scaling, maxcrop or resume}
OUT=${2:?output folder}
shift 2
mkdir -p "$OUT"
CACHE="$OUT/cache"  # the prepared samples live under OUT: nothing is written outside the folder named
[ -d "$CACHE" ] || protfold prepare data/samples --out "$CACHE" --msa_dir data/samples/msas --no_progress
BASE=(-c configs/sample.yaml -c configs/gpu_af2.yaml --data.cache_dir "$CACHE" --trainer.max_steps 8 --trainer.limit_val_batches 0
      --data.samples_per_epoch 64 --trainer.enable_progress_bar false)
INITIAL=(--data.crop_size 256 --data.max_msa_clusters 128 --data.max_extra_msa 1024)
FINETUNE=(--data.crop_size 384 --data.max_msa_clusters 512 --data.max_extra_msa 5120)

fit() {  # fit NAME NGPUS ARGS...: one run, its perf.json and a summary line
  local name=$1 ngpus=$2; shift 2
  local root="$OUT/$name"
  mkdir -p "$root"
  bash scripts/torchrun_fit.sh "$ngpus" "${BASE[@]}" --trainer.default_root_dir "$root/run" "$@" >"$root/log.txt" 2>&1
  local rc=$?
  local perf
  perf=$(ls -t "$root"/run/protfold/version_*/perf.json 2>/dev/null | head -1)
  [ -n "$perf" ] && cp "$perf" "$root/perf.json"
  python - "$name" "$ngpus" "$rc" "$root/perf.json" >>"$OUT/summary.tsv" <<'PY'
import json, sys
name, ngpus, rc, path = sys.argv[1:]
try:
    p = json.load(open(path))
    print(f"{name}\t{ngpus}\trc={rc}\t{p['median_step_s_after_first']:.3f} s\t{p['samples_per_s']:.3f} samples/s\t"
          f"{p['peak_gib_rank0']:.2f} GiB\t{p['device']}\t{p.get('torch')}")
except Exception as err:  # a failed run (out of memory): no perf.json
    print(f"{name}\t{ngpus}\trc={rc}\tno perf.json ({type(err).__name__})")
PY
  return $rc
}

case "$MODE" in
scaling)
  NS=("$@"); [ ${#NS[@]} -eq 0 ] && NS=(2)
  for shape in initial finetune; do
    declare -n SHAPE=${shape^^}
    fit "${shape}_1gpu" 1 "${SHAPE[@]}"
    for n in "${NS[@]}"; do
      fit "${shape}_ddp$n" "$n" "${SHAPE[@]}" -c configs/trainer/ddp.yaml
      fit "${shape}_fsdp$n" "$n" "${SHAPE[@]}" -c configs/trainer/fsdp.yaml
    done
  done ;;
maxcrop)
  # The shipped samples' longest chains are 650 and 637 residues (batches pad to the longest item, not to the
  # crop), so crops stop at 640 here; for longer ones pass --data.cache_dir/--data.split_file of longer chains
  # after NGPUS. The peak of each crop is the comparison where both fit.
  n=${1:-2}; shift || true
  echo '{"train": ["2xhe_A", "2d0f_A"], "validation": []}' >"$OUT/long_split.json"
  LONG=(--data.split_file "$OUT/long_split.json" --model.memory long --trainer.max_steps 3
        --data.max_msa_clusters 128 --data.max_extra_msa 1024)
  for crop in 256 384 512 640; do fit "crop${crop}_1gpu" 1 "${LONG[@]}" --data.crop_size "$crop" "$@" || break; done
  for crop in 256 384 512 640; do
    fit "crop${crop}_fsdp$n" "$n" "${LONG[@]}" --data.crop_size "$crop" -c configs/trainer/fsdp.yaml "$@" || break
  done ;;
resume)
  n=${1:-2}
  fit resume_straight "$n" "${INITIAL[@]}" -c configs/trainer/fsdp.yaml --trainer.max_steps 6
  fit resume_half "$n" "${INITIAL[@]}" -c configs/trainer/fsdp.yaml --trainer.max_steps 3
  half=$(ls "$OUT"/resume_half/run/protfold/version_0/checkpoints/last.ckpt)
  fit resume_half "$n" "${INITIAL[@]}" -c configs/trainer/fsdp.yaml --trainer.max_steps 6 --ckpt_path "$half"
  python - "$OUT" <<'PY' | tee "$OUT/resume.txt"
import glob, sys, torch
out = sys.argv[1]
def last(run):
    return torch.load(sorted(glob.glob(f"{out}/{run}/run/protfold/version_*/checkpoints/last.ckpt"))[-1],
                      map_location="cpu", weights_only=False)
a, b = last("resume_straight"), last("resume_half")
worst = max((a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max().item() for k in a["state_dict"])
ema = max((a["ema"]["shadow"][k] - b["ema"]["shadow"][k]).abs().max().item() for k in a["ema"]["shadow"])
print(f"steps {a['global_step']} vs {b['global_step']}: largest weight difference {worst:.3g}, EMA {ema:.3g}")
import csv
def losses(run):
    rows = []
    for path in sorted(glob.glob(f"{out}/{run}/run/protfold/version_*/metrics.csv")):
        rows += [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(open(path)) if r.get("train/loss")]
    return dict(rows)
la, lb = losses("resume_straight"), losses("resume_half")
print("train/loss by step (straight, stopped and resumed):")
for step in sorted(la):
    print(f"  {step}\t{la[step]:.6f}\t{lb.get(step, float('nan')):.6f}")
PY
  ;;
*) echo "unknown mode $MODE (scaling, maxcrop, resume)" >&2; exit 2 ;;
esac
