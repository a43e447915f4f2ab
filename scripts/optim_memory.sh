#!/usr/bin/env bash
# Peak memory and step time of the af2 training step with each optimizer-state kind (fp32, 8bit, cpu_offload) and
# EMA storage (fp32, bf16), alone and combined, with the lowest-memory and the fastest activation modes
# (issue 16, Must-show 1). Each bench call sweeps all six (state, EMA) pairs in one process: every mode runs under
# every pair, and a compiled mode compiles once per shape for all six (the optimizer and the EMA are outside its
# graphs).
# Usage: scripts/optim_memory.sh OUT_DIR [all|initial|finetune|table] [MODE]
#   initial (256/128/1024): one bench call, `low` and `compiled_flex`, 12 runs: about 8 minutes on one H200
#     (`low` about 30 s a run, `compiled_flex` about 20 s a run plus about 60 s to compile, torchao's first 8-bit
#     step about 60-100 s more); capped by --time-limit 500 (no run starts after it), so under 10 minutes.
#   finetune (384/512/5120): one bench call per activation mode. `compiled_flex` is the fastest; for the lowest
#     memory `long`, which at this shape peaks as low as `low` (6.46 GiB) at 19.8 s a step against `low`'s 90 s.
#     compiled_flex: about 100 s to compile, then six runs of one warm-up and one timed step at 5-8 s a step,
#     plus about 60 s for torchao's first 8-bit step: about 4.5 minutes (--time-limit 300: at most about 7).
#     long: six runs of two steps at about 20 s, plus about 60 s for torchao: about 6 minutes (--time-limit 400:
#     at most about 9). Both together take about 10.5 minutes: for 10-minute device calls give MODE
#     (compiled_flex or long) to run one of the two per call.
#   all (the default): initial, then finetune, about 18 minutes. table: only the table of what OUT_DIR holds (no GPU).
# Writes OUT_DIR/<shape>_<mode>/results.{json,csv} per bench call (one record per mode x state x EMA), then
# OUT_DIR/table.md and OUT_DIR/summary.json (of every */results.json under OUT_DIR).
set -uo pipefail
out=${1:?usage: scripts/optim_memory.sh OUT_DIR [all|initial|finetune|table] [MODE]}
part=${2:-all}
only=${3:-}
case $part in all|initial|finetune|table) ;; *) echo "optim_memory.sh: unknown part '$part' (all, initial, finetune, table)" >&2; exit 2;; esac
case $only in ''|compiled_flex|long) ;; *) echo "optim_memory.sh: unknown fine-tune mode '$only' (compiled_flex, long)" >&2; exit 2;; esac
if [ -n "$only" ] && [ "$part" != finetune ]; then
  echo "optim_memory.sh: MODE ('$only') applies to the finetune part only, not '$part'" >&2; exit 2
fi
mkdir -p "$out"
common=(--model af2 --device cuda --precisions bf16 --recycles 1 --steps 1 --warmup 1 --no-infer
        --optim.state fp32,8bit,cpu_offload --optim.ema_storage fp32,bf16)
run() {  # name time-limit modes shape-args...
  local name=$1 limit=$2 modes=$3; shift 3
  protfold bench "${common[@]}" "$@" --modes "$modes" --time-limit "$limit" --out "$out/$name" \
    || echo "bench failed: $name" >&2
}
if [ "$part" = all ] || [ "$part" = initial ]; then
  run initial_low_compiled_flex 500 low,compiled_flex --crops 256 --rows 128 --extra-rows 1024
fi
if [ "$part" = all ] || [ "$part" = finetune ]; then
  finetune=(--crops 384 --rows 512 --extra-rows 5120)
  [ -z "$only" ] || [ "$only" = compiled_flex ] && run finetune_compiled_flex 300 compiled_flex "${finetune[@]}"
  [ -z "$only" ] || [ "$only" = long ] && run finetune_long 400 long "${finetune[@]}"
fi
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for path in sorted(out.glob("*/results.json")):
    for r in json.loads(path.read_text()):
        rows.append({k: r.get(k) for k in ("crop", "rows", "extra_rows", "mode", "optim_state", "ema_storage",
                                           "status", "peak_bytes", "step_time_s", "card", "torch", "date")})
rows.sort(key=lambda r: (r["crop"], r["rows"], r["extra_rows"], r["mode"], r["peak_bytes"] or 1 << 62))
lines = ["| shape | mode | optim.state | ema_storage | peak GiB | step s |", "| --- | --- | --- | --- | --- | --- |"]
for r in rows:
    peak = f"{r['peak_bytes'] / 2**30:.2f}" if r["peak_bytes"] else r["status"]
    step = f"{r['step_time_s']:.2f}" if r["step_time_s"] else "-"
    lines.append(f"| {r['crop']}/{r['rows']}/{r['extra_rows']} | {r['mode']} | {r['optim_state']} | {r['ema_storage']} "
                 f"| {peak} | {step} |")
(out / "table.md").write_text("\n".join(lines) + "\n")
(out / "summary.json").write_text(json.dumps(rows, separators=(",", ":")) + "\n")
print("\n".join(lines))
PY
