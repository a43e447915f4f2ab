#!/usr/bin/env bash
# Third device session (one machine with two H100 80GB, kind nvidia-h100-x2): issue 5's GPU training
# (`protfold fit` of af2 in bf16 on one GPU, then DDP on two) and issue 4's grid, spread over both GPUs.
#
# The work outlasts one device call (10 minutes), so `start` launches a driver in its own process session
# (it survives the call) and each later call runs `collect SECONDS`: wait up to SECONDS for the driver, then
# pack what exists so far into $OUT/session3.tgz (checkpoints left out). Calls must follow each other within
# the machine's idle time. Usage, from the repository root on the device machine:
#   scripts/gpu_session3.sh start SECONDS      copy the repo to /tmp/pf, start the driver, then collect
#   scripts/gpu_session3.sh collect SECONDS    wait, then pack
#   scripts/gpu_session3.sh run                the driver itself (what `start` launches)
# Bench jobs are taken from one queue by two workers, one per GPU, in the order below (most needed first);
# every job stops starting new runs at the driver's deadline (DEADLINE_S after the driver starts).
set -uo pipefail
R=/tmp/g3
DEADLINE_S=${DEADLINE_S:-1380}

pack() {
  mkdir -p "$OUT"
  tar -C "$R" --exclude='*.ckpt' --exclude='*.tmp' -czf "$OUT/session3.tgz" . 2>/dev/null
  tail -n 40 "$R/driver.log" 2>/dev/null
  cat "$R/jobs.log" 2>/dev/null
}

collect() {
  local until=$((SECONDS + $1))
  while [ "$SECONDS" -lt "$until" ] && [ ! -e "$R/done" ]; do sleep 5; done
  pack
}

bench_jobs() {
  local B="python3 -m protfold.bench.runner --model af2 --device cuda"
  local I="--rows 128 --extra-rows 1024"
  cat <<EOF
fit_one_gpu	FIT
initial_256	$B --precisions fp32,bf16 $I --recycles 1 --steps 2 --warmup 1 --infer-steps 1 --crops 256 --modes none,recompute,offload,chunked,low --skip-above offload/fp32=0 --skip-above chunked/fp32=0 --skip-above low/fp32=0
finetune	$B --precisions bf16 --rows 512 --extra-rows 5120 --recycles 1 --steps 1 --warmup 1 --infer-steps 1 --crops 384 --modes low,offload,recompute
budget_2048	$B --precisions bf16 $I --crops 2048 --modes low --budget 80GB --budget-only --budget-time 1
evoformer	$B --precisions bf16 --evoformer-only --rows 128 --steps 2 --warmup 1 --crops 256,384,512 --modes recompute,offload,low
inference_4096	$B --precisions bf16 --inference-block --rows 128 --steps 2 --warmup 1 --crops 4096 --modes low
grid_384	$B --precisions fp32,bf16 $I --steps 1 --warmup 1 --infer-steps 1 --crops 384 --modes none,recompute,chunked,low --skip-above none=256 --skip-above chunked/fp32=0 --skip-above low/fp32=0
grid_512	$B --precisions fp32,bf16 $I --steps 1 --warmup 1 --infer-steps 1 --crops 512 --modes none,recompute,chunked,low --skip-above none=256 --skip-above chunked/fp32=0 --skip-above low/fp32=0
grid_768_bf16	$B --precisions bf16 $I --steps 1 --warmup 1 --infer-steps 1 --crops 768 --modes low,recompute,chunked
grid_1024_bf16	$B --precisions bf16 $I --steps 1 --warmup 1 --infer-steps 1 --crops 1024 --modes low,recompute,chunked
grid_768_fp32	$B --precisions fp32 $I --steps 1 --warmup 1 --infer-steps 1 --crops 768 --modes recompute
grid_1024_fp32	$B --precisions fp32 $I --steps 1 --warmup 1 --infer-steps 1 --crops 1024 --modes recompute
EOF
}

fit() {  # fit NAME EXTRA_ARGS...: af2, bf16, crop 256 / 128 / 1024, 12 steps on the prepared samples
  local name=$1; shift
  timeout "${FIT_TIMEOUT:-420}" python3 -m protfold.cli fit -c configs/sample.yaml -c configs/gpu_af2.yaml "$@" \
    --trainer.enable_progress_bar false --trainer.max_steps 12 --trainer.val_check_interval 6 \
    --trainer.log_every_n_steps 1 --data.samples_per_epoch 24 --trainer.default_root_dir "$R/$name" \
    > "$R/$name.log" 2>&1
}

worker() {  # worker GPU: take jobs from the queue until it is empty or the deadline has passed
  local gpu=$1 line name cmd left
  while true; do
    line=$(flock "$R/queue.lock" bash -c 'head -n 1 "$0"; sed -i 1d "$0"' "$R/queue")
    [ -z "$line" ] && return
    name=${line%%	*}; cmd=${line#*	}
    left=$((START + DEADLINE_S - $(date +%s)))
    if [ "$left" -lt 60 ]; then echo "$name skipped: deadline" >> "$R/jobs.log"; continue; fi
    echo "$(date -u +%T) gpu$gpu start $name" >> "$R/jobs.log"
    if [ "$cmd" = FIT ]; then
      CUDA_VISIBLE_DEVICES=$gpu fit "$name"
    else
      CUDA_VISIBLE_DEVICES=$gpu timeout "$left" $cmd --time-limit $((left - 60)) --out "$R/$name" > "$R/$name.log" 2>&1
    fi
    echo "$(date -u +%T) gpu$gpu end $name rc=$?" >> "$R/jobs.log"
  done
}

run() {
  START=$(date +%s)
  export PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/gpu.txt" 2>&1
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" >> "$R/gpu.txt"
  echo "$(date -u +%T) prepare" >> "$R/jobs.log"
  python3 -m protfold.cli prepare data/samples --out cache/samples --msa-dir data/samples/msas --no-progress \
    > "$R/prepare.log" 2>&1
  echo "$(date -u +%T) start fit_ddp2" >> "$R/jobs.log"
  fit fit_ddp2 -c configs/trainer/ddp.yaml
  echo "$(date -u +%T) end fit_ddp2 rc=$?" >> "$R/jobs.log"
  bench_jobs > "$R/queue"
  touch "$R/queue.lock"
  worker 0 & worker 1 & wait
  touch "$R/done"
}

case ${1:-} in
  start)
    rm -rf /tmp/pf "$R" && mkdir -p "$R" && cp -a . /tmp/pf || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit 1
    (cd /tmp/pf && PYTHONPATH=/tmp/site:/tmp/pf setsid nohup bash scripts/gpu_session3.sh run \
      > "$R/driver.log" 2>&1 < /dev/null &)
    collect "${2:-540}" ;;
  collect) collect "${2:-540}" ;;
  run) export PYTHONPATH=${PYTHONPATH:-/tmp/site:$PWD}; run ;;
  *) echo "usage: $0 start|collect SECONDS|run" >&2; exit 2 ;;
esac
