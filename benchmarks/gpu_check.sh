#!/usr/bin/env bash
# GPU smoke check: one epoch each of KD, a DistPro search, an Auto-KD trial and MetaDistiller on
# CUDA (FMNIST-5k protocol), bf16 for KD as well; prints img/s and peak GPU memory per run.
# Exits non-zero on the first failure. Meant for a machine with an NVIDIA GPU and a CUDA build of
# torch; expected well under 5 minutes there. Not run on the 2-core CPU development machine.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR [OVERRIDES...]]     (default runs/gpu_check)
#
# A dry run of the script's plumbing on a CPU, on a tiny subset (what was run on the dev machine):
#   DEVICE=cpu bash benchmarks/gpu_check.sh /tmp/gpu_check data.train_per_class=5 data.test_limit=50
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
OUT=${1:-runs/gpu_check}
shift || true
mkdir -p "$OUT"

if [ "$DEVICE" = cuda ]; then
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: torch sees no GPU")'
  "$PY" -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
fi

COMMON=(train.epochs=1 "train.device=$DEVICE" train.progress=false "output_dir=$OUT" "$@")

check() {  # check NAME CONFIG [OVERRIDES...]: one run, then its img/s and peak memory from metrics.jsonl
  local name=$1 config=$2
  shift 2
  echo "== $name: kdtune run $config $*"
  local start=$SECONDS
  "$PY" -m kdtune.cli run "$config" "${COMMON[@]}" "name=$name" "$@" | tail -n 2
  local dir
  dir=$(ls -td "$OUT/$name"-s0-* | head -n 1)
  "$PY" - "$dir" "$((SECONDS - start))" <<'PYEOF'
import json, sys
from pathlib import Path

run, wall = Path(sys.argv[1]), sys.argv[2]
rows = [json.loads(line) for p in sorted(run.rglob("metrics.jsonl")) for line in p.read_text().splitlines() if line]
if not rows:
    sys.exit(f"{run}: no epoch finished")
speed = max(r["img_per_s"] for r in rows)
peak = max(r.get("gpu_peak_mb", float("nan")) for r in rows)
print(f"   {run.name}: {speed:.0f} img/s, peak GPU memory {peak:.0f} MB, {wall} s wall (incl. start-up)")
PYEOF
}

check gpu_kd configs/fmnist/kd.yaml
check gpu_kd_bf16 configs/fmnist/kd.yaml train.precision=bf16
check gpu_distpro configs/fmnist/distpro_search.yaml "distpro.export=$OUT/distpro_process.json"
check gpu_autokd configs/fmnist/autokd_search.yaml autokd.trials=1
check gpu_md configs/fmnist/selfdistill.yaml selfdistill.method=md selfdistill.meta_every=1
echo "gpu_check: all runs finished"
