#!/usr/bin/env bash
# GPU work queue for one device machine with one or more GPUs: jobs from a queue file (scripts/queues/*.tsv:
# NAME<TAB>COMMAND per line, most needed first) are taken by one worker per GPU. COMMAND is a bench command
# (its --out and --time-limit are added), FIT [ARGS] (`protfold fit` of af2 in bf16 on one GPU, with ARGS added,
# e.g. `FIT --model.memory compiled_flex`) or FIT_DDP (the same on every GPU, run before the workers
# start, alone on the machine).
#
# The work outlasts one device call (10 minutes), so `start` launches a driver in its own process session
# (it survives the call) and each later call runs `collect SECONDS`: wait up to SECONDS for the driver, then
# pack what exists so far into $OUT/results.tgz (checkpoints left out). Calls must follow each other within
# the machine's idle time. Usage, from the repository root on the device machine:
#   scripts/gpu_queue.sh start QUEUE SECONDS   copy the repo to /tmp/pf, start the driver on QUEUE, then collect
#                                              (SECONDS counts after the copy and install: leave the call room)
#   scripts/gpu_queue.sh collect SECONDS       wait, then pack
#   scripts/gpu_queue.sh run QUEUE             the driver itself (what `start` launches)
#   scripts/gpu_queue.sh pin GPU               the `taskset -c CPUS` prefix of GPU's worker (empty: unpinned)
# Every job stops starting new runs at the driver's deadline (DEADLINE_S after the driver starts).
# Session 3 ran `start scripts/queues/session3.tsv 540` (then `collect` twice) on two H200s; session 4
# `DEADLINE_S=1320 ... start scripts/queues/session4.tsv 530`, then `collect 560` and `collect 250`.
set -uo pipefail
R=${GPU_QUEUE_DIR:-/tmp/g3}  # where results, logs and the queue live on the device machine
DEADLINE_S=${DEADLINE_S:-1380}

pack() {
  mkdir -p "$OUT"
  tar -C "$R" --exclude='*.ckpt' --exclude='*.tmp' --exclude=./cache -czf "$OUT/results.tgz" . 2>/dev/null
  tail -n 40 "$R/driver.log" 2>/dev/null
  cat "$R/jobs.log" 2>/dev/null
}

collect() {
  local until=$((SECONDS + $1))
  while [ "$SECONDS" -lt "$until" ] && [ ! -e "$R/done" ]; do sleep 5; done
  pack
}

fit() {  # fit NAME EXTRA_ARGS...: af2, bf16, crop 256 / 128 / 1024, 12 steps on the prepared samples (ARGS may change that)
  local name=$1; shift
  # ARGS come last, so they can override these settings too (e.g. --trainer.max_steps 24)
  timeout "${FIT_TIMEOUT:-420}" ${PIN:-} python3 -m protfold.cli fit -c configs/sample.yaml -c configs/gpu_af2.yaml \
    --trainer.enable_progress_bar false --trainer.max_steps 12 --trainer.val_check_interval 6 \
    --trainer.log_every_n_steps 1 --data.samples_per_epoch 24 --data.cache_dir "$R/cache" \
    --trainer.default_root_dir "$R/$name" "$@" \
    > "$R/$name.log" 2>&1
}

pin() {  # pin GPU: a command prefix that keeps this GPU's worker on its own share of the CPU cores
  # (session 4's times varied up to 1.7x while the other GPU's job ran, e.g. inductor compiling on every core).
  # Shares are whole physical cores (hyperthread siblings together) from the CPUs this process may use; a share
  # that taskset refuses leaves the worker unpinned rather than failing its jobs.
  local list
  command -v taskset > /dev/null || return 0
  list=$(python3 - "$1" "$(nvidia-smi -L | wc -l)" <<'PY'
import os, sys
gpu, n_gpu = int(sys.argv[1]), int(sys.argv[2])
allowed = sorted(os.sched_getaffinity(0))
cores = {}
for cpu in allowed:
    try:
        with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as fh:
            key = fh.read().strip()
    except OSError:
        key = str(cpu)
    cores.setdefault(key, []).append(cpu)
groups = list(cores.values())
share = len(groups) // n_gpu
if share >= 2:
    print(",".join(str(c) for g in groups[gpu * share:(gpu + 1) * share] for c in g))
PY
)
  if [ -n "$list" ] && taskset -c "$list" true 2> /dev/null; then echo "taskset -c $list"; fi
}

worker() {  # worker GPU: take jobs from the queue until it is empty or the deadline has passed
  local gpu=$1 line name cmd left pinned rc
  pinned=$(pin "$gpu")
  export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-4}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}  # CPU ops here are small: many threads per op only contend
  while true; do
    line=$(flock "$R/queue.lock" bash -c 'head -n 1 "$0"; sed -i 1d "$0"' "$R/queue")
    [ -z "$line" ] && return
    name=${line%%	*}; cmd=${line#*	}
    left=$((START + DEADLINE_S - $(date +%s)))
    if [ "$left" -lt 60 ]; then echo "$name skipped: deadline" >> "$R/jobs.log"; continue; fi
    echo "$(date -u +%T) gpu$gpu start $name ${pinned:-unpinned}" >> "$R/jobs.log"
    if [ "${cmd%% *}" = FIT ]; then  # FIT, or FIT followed by more `protfold fit` arguments
      # shellcheck disable=SC2086  # the arguments after FIT are meant to split into words
      CUDA_VISIBLE_DEVICES=$gpu PIN=$pinned FIT_TIMEOUT=$((left < ${FIT_TIMEOUT:-420} ? left : ${FIT_TIMEOUT:-420})) \
        fit "$name" ${cmd#FIT}
    elif [[ "$cmd" != *protfold.bench.runner* ]]; then  # any other command (e.g. the GPU tests) as it is
      CUDA_VISIBLE_DEVICES=$gpu timeout "$left" $pinned $cmd > "$R/$name.log" 2>&1
    else
      CUDA_VISIBLE_DEVICES=$gpu timeout "$left" $pinned $cmd --time-limit $((left - 60)) --out "$R/$name" \
        > "$R/$name.log" 2>&1
    fi
    rc=$?  # before any other expansion: "$(date ...)" resets $? (sessions 4-6 logged rc=0 for failed jobs)
    echo "$(date -u +%T) gpu$gpu end $name rc=$rc" >> "$R/jobs.log"
  done
}

run() {
  mkdir -p "$R"
  START=$(date +%s)
  export PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/gpu.txt" 2>&1
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" >> "$R/gpu.txt"
  echo "$(date -u +%T) prepare" >> "$R/jobs.log"
  # the prepared samples go with the results, never into the checkout
  python3 -m protfold.cli prepare data/samples --out "$R/cache" --msa_dir data/samples/msas --no_progress \
    > "$R/prepare.log" 2>&1
  local ddp
  ddp=$(grep -P '\tFIT_DDP$' "$1" | cut -f1 || true)
  for name in $ddp; do
    echo "$(date -u +%T) start $name" >> "$R/jobs.log"
    fit "$name" -c configs/trainer/ddp.yaml --trainer.devices "$(nvidia-smi -L | wc -l)"
    rc=$?
    echo "$(date -u +%T) end $name rc=$rc" >> "$R/jobs.log"
  done
  grep -v -P '\tFIT_DDP$' "$1" | grep -v '^#' | grep -v '^\s*$' > "$R/queue"
  touch "$R/queue.lock"
  local gpu
  for gpu in $(seq 0 $(($(nvidia-smi -L | wc -l) - 1))); do worker "$gpu" & done
  wait
  touch "$R/done"
}

case ${1:-} in
  start)
    [ -f "${2:-}" ] || { echo "no queue file '${2:-}'" >&2; exit 2; }
    if [ -d "$R" ] && [ ! -e "$R/done" ] && pgrep -f "gpu_queue.sh run" > /dev/null; then
      echo "a driver is still running (results in $R): use collect" >&2; exit 2
    fi
    rm -rf /tmp/pf "$R" && mkdir -p "$R" && cp -a . /tmp/pf || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit 1
    (cd /tmp/pf && PYTHONPATH=/tmp/site:/tmp/pf setsid nohup bash scripts/gpu_queue.sh run "$2" \
      > "$R/driver.log" 2>&1 < /dev/null &)
    collect "${3:-540}" ;;
  collect) collect "${2:-540}" ;;
  run) export PYTHONPATH=${PYTHONPATH:-/tmp/site:$PWD}; run "$2" ;;
  pin) [[ "${2:-0}" =~ ^[0-9]+$ ]] || { echo "pin: a GPU index (0, 1, ...) is wanted, got '$2'" >&2; exit 2; }
       pin "${2:-0}" ;;  # the CPU pinning prefix a worker for GPU $2 would use (empty: unpinned)
  *) echo "usage: $0 start QUEUE SECONDS | collect SECONDS | run QUEUE | pin GPU" >&2; exit 2 ;;
esac
