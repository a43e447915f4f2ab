#!/usr/bin/env bash
# Peak memory and step time of the af2 training step with each optimizer-state kind and EMA storage, alone and
# with the lowest-memory (`low`) and fastest (`compiled_flex`) activation modes (issue 16, Must-show 1).
# Usage: scripts/optim_memory.sh OUT_DIR [all|initial|finetune|table]
#   initial: 5 bench calls (about 9 minutes on one H200, each compiles), finetune: 3 (about 5 minutes), table: only
#   the table of what OUT_DIR holds (no GPU). Each bench call is capped by --time-limit.
# Writes OUT_DIR/<shape>_<state>_<ema>/results.{json,csv} per call, then OUT_DIR/table.md and OUT_DIR/summary.json.
set -uo pipefail
out=${1:?usage: scripts/optim_memory.sh OUT_DIR [all|initial|finetune|table]}
part=${2:-all}
case $part in all|initial|finetune|table) ;; *) echo "optim_memory.sh: unknown part '$part' (all, initial, finetune, table)" >&2; exit 2;; esac
mkdir -p "$out"
common=(--model af2 --device cuda --precisions bf16 --recycles 1 --steps 1 --warmup 1 --no-infer)
run() {  # shape state ema modes shape-args...
  local shape=$1 state=$2 ema=$3 modes=$4; shift 4
  protfold bench "${common[@]}" "$@" --modes "$modes" --optim.state "$state" --optim.ema_storage "$ema" \
    --time-limit 150 --out "$out/${shape}_${state}_${ema}" || echo "bench failed: $shape $state $ema" >&2
}
initial=(--crops 256 --rows 128 --extra-rows 1024)
finetune=(--crops 384 --rows 512 --extra-rows 5120)
if [ "$part" = all ] || [ "$part" = initial ]; then
  for v in fp32:fp32 8bit:fp32 cpu_offload:fp32 fp32:bf16 8bit:bf16; do
    run initial "${v%:*}" "${v#*:}" low,compiled_flex "${initial[@]}"
  done
fi
if [ "$part" = all ] || [ "$part" = finetune ]; then
  for v in fp32:fp32 8bit:bf16 cpu_offload:bf16; do
    run finetune "${v%:*}" "${v#*:}" compiled_flex "${finetune[@]}"
  done
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
rows.sort(key=lambda r: (r["crop"], r["mode"], r["peak_bytes"] or 1 << 62))
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
