#!/usr/bin/env bash
# Speed on one GPU in one call (about 8 minutes on an H200), everything written to OUT (argument 1):
#   (c1) `protfold fit` with the default GPU config (configs/gpu_af2.yaml) on the shipped samples, FIT_STEPS steps,
#        from an empty compile cache (WORK/compile_cache; WORK=/tmp/speed_gpu_work unless set): per-step times,
#        compiles and compile seconds, peak (OUT/fit1/.../perf.json; checkpoints stay in WORK);
#   (a)  `protfold bench` at AF2's initial shapes (af2, crop 256, 128 clusters, 1024 extra rows, one recycle, bf16)
#        for the default GPU mode (gpu_af2.yaml's model.memory, `compiled_flex`) and `offload` (uncompiled), each
#        also with cuEquivariance's triangle kernels where they import (bench/results.json), and the default mode
#        with 8-bit Adam moments and a bf16 EMA (bench_lean/results.json); the bench
#        shares the fit's compile cache, so its compiled modes spend their warm-up loading, not compiling;
#   (b)  OpenFold's step at the same shapes (../shared/bench/openfold, carried as .bench/openfold_bench/ next to
#        OpenFold's package in .bench/openfold/), or, where it is missing, ../shared/docs/OPENFOLD_BASELINE.md's
#        figure, labelled so (openfold.json);
#   (c2) the same fit again, REFIT_STEPS steps, from the cache the first one filled (fit2/.../perf.json).
# Then one table and OUT/summary.json. Wheels the image lacks go in .whl/ (installed from there, offline).
#   bash benchmarks/speed_gpu.sh OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/speed_gpu.sh OUT}
FIT_STEPS=${FIT_STEPS:-48}
REFIT_STEPS=${REFIT_STEPS:-8}
BENCH_STEPS=${BENCH_STEPS:-6}
WORK=${WORK:-/tmp/speed_gpu_work}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stamp() { echo "$(date -u +%FT%TZ) $*"; }
# a fit's run folder without its checkpoints (an af2 checkpoint with optimizer state is over 1 GB)
keep() { mkdir -p "$OUT/$1"; tar -C "$WORK/$1" --exclude=checkpoints -cf - . | tar -C "$OUT/$1" -xf -; }

stamp "environment"
if [ -d .whl ]; then python3 -m pip install -q --no-index --find-links .whl --no-deps .whl/*.whl 2>&1 | tail -3; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 - <<'EOF' | tee -a "$OUT/gpu.txt"
import torch, lightning
try:
    import cuequivariance_torch, cuequivariance_ops_torch  # noqa: F401
    cue = cuequivariance_torch.__version__
except Exception as err:  # noqa: BLE001
    cue = f"not importable ({type(err).__name__}: {err})"
print("torch", torch.__version__, "lightning", lightning.__version__, "cuequivariance", cue)
EOF

# OpenFold's CUDA extension builds on the CPU while the first fit runs on the GPU
OF=""
if [ -d .bench/openfold ] && [ -f .bench/openfold_bench/of_step.py ]; then
  OF=.bench/openfold_bench
  (PYTHONPATH=$PWD/.bench:$PYTHONPATH timeout 150 python3 $OF/build_attn_core.py .bench "$WORK/ext" \
     > "$OUT/openfold_build.log" 2>&1) &
  BUILD=$!
fi

stamp "prepare the shipped samples"
python3 -m protfold.cli prepare data/samples --out "$WORK/cache" --msa_dir data/samples/msas --no_progress | tail -1

FIT=(python3 -m protfold.cli fit -c configs/sample.yaml -c configs/gpu_af2.yaml --data.cache_dir "$WORK/cache"
     --trainer.limit_val_batches 0 --trainer.enable_progress_bar false --compile_cache "$WORK/compile_cache")
stamp "(c1) fit, $FIT_STEPS steps, empty compile cache"
rm -rf "$WORK/compile_cache" "$WORK/fit1" "$WORK/fit2" "$OUT/fit1" "$OUT/fit2"
timeout 300 "${FIT[@]}" --trainer.max_steps "$FIT_STEPS" --data.samples_per_epoch "$FIT_STEPS" \
  --trainer.default_root_dir "$WORK/fit1" > "$OUT/fit1.log" 2>&1 || { echo "fit1 failed:" >&2; tail -5 "$OUT/fit1.log" >&2; }
keep fit1
grep -E "compiled .* graph|Error|error" "$OUT/fit1.log" | tail -3

stamp "(a) bench at initial shapes"
# the default GPU mode is gpu_af2.yaml's model.memory group; each mode also with triangle_kernel: cueq
python3 - "$WORK/modes" <<'EOF'
import sys
from pathlib import Path

import yaml

from protfold.config import memory_preset_path

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
default = yaml.safe_load(Path("configs/gpu_af2.yaml").read_text())["model"]["memory"]
if isinstance(default, str):  # a preset by name
    default = yaml.safe_load(memory_preset_path(default).read_text())
offload = yaml.safe_load(memory_preset_path("offload").read_text())
for name, fields in (("gpu_default", default), ("offload", offload)):
    (out / f"{name}.yaml").write_text(yaml.safe_dump(fields))
    (out / f"{name}_cueq.yaml").write_text(yaml.safe_dump({**fields, "triangle_kernel": "cueq"}))
EOF
MODES=$WORK/modes/gpu_default.yaml,$WORK/modes/offload.yaml
# the cueq variants only where cuEquivariance imports (otherwise they would time the plain path twice)
if python3 -c "import cuequivariance_torch, cuequivariance_ops_torch" 2>/dev/null; then
  MODES=$MODES,$WORK/modes/gpu_default_cueq.yaml,$WORK/modes/offload_cueq.yaml
fi
# the fit's compile cache: compiling is not what the bench measures (its warm-up step absorbs it)
TORCHINDUCTOR_CACHE_DIR=$WORK/compile_cache timeout 300 python3 -m protfold.cli bench --model af2 --device cuda \
  --precisions bf16 --crops 256 --rows 128 --extra-rows 1024 --recycles 1 --steps "$BENCH_STEPS" --warmup 1 \
  --no-infer --time-limit 200 --modes "$MODES" --out "$OUT/bench" > "$OUT/bench.log" 2>&1 \
  || { echo "bench failed:" >&2; tail -5 "$OUT/bench.log" >&2; }
# the default mode again with the leanest optimizer state and EMA (8-bit Adam moments, bf16 EMA)
TORCHINDUCTOR_CACHE_DIR=$WORK/compile_cache timeout 200 python3 -m protfold.cli bench --model af2 --device cuda \
  --precisions bf16 --crops 256 --rows 128 --extra-rows 1024 --recycles 1 --steps "$BENCH_STEPS" --warmup 1 \
  --no-infer --time-limit 150 --modes "$WORK/modes/gpu_default.yaml" --optim.state 8bit --optim.ema_storage bf16 \
  --out "$OUT/bench_lean" > "$OUT/bench_lean.log" 2>&1 \
  || { echo "bench (8-bit Adam, bf16 EMA) failed:" >&2; tail -5 "$OUT/bench_lean.log" >&2; }

stamp "(b) OpenFold's step at the same shapes"
if [ -n "$OF" ]; then
  wait "$BUILD"
  PYTHONPATH=$PWD/.bench:$PYTHONPATH timeout 120 python3 $OF/of_step.py --device cuda --ext-dir "$WORK/ext" \
    --warmup 2 --steps 10 --out "$OUT/openfold.json" > "$OUT/openfold.log" 2>&1 \
    || { echo "OpenFold's step failed:" >&2; tail -5 "$OUT/openfold.log" >&2; }
else
  echo "no .bench/openfold: OpenFold's figure from ../shared/docs/OPENFOLD_BASELINE.md (not this run)" >&2
fi

stamp "(c2) fit again, $REFIT_STEPS steps, from the same compile cache"
timeout 150 "${FIT[@]}" --trainer.max_steps "$REFIT_STEPS" --data.samples_per_epoch "$REFIT_STEPS" \
  --trainer.default_root_dir "$WORK/fit2" > "$OUT/fit2.log" 2>&1 || { echo "fit2 failed:" >&2; tail -5 "$OUT/fit2.log" >&2; }
keep fit2
grep -E "compiled .* graph|Error|error" "$OUT/fit2.log" | tail -3

stamp "summary"
python3 benchmarks/speed_summary.py "$OUT"
stamp "done"
