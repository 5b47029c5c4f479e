#!/usr/bin/env bash
# One prepared GPU check of the deformable op: CUDA parity with torchvision (every CUDA path: the
# default C++ autograd op, its Python version and the opt-in Triton kernels), then `harness bench ops`
# in fp32 and bf16 (the docs table, cases interleaved), then scripts/gpu_probe.py (the paths in
# PROBE_PATHS interleaved, larger shapes, memory, kernel counts and GPU time, the Triton block sizes
# when "triton" is one of them, the network). Run from the repository root on a machine with a GPU;
# output goes to $OUT (default results/gpu_check). PARITY_S and PROBE_S bound the two long steps;
# PROBE_QUICK=1 runs fewer rounds and settings (for a short time budget).
#
# On a GPU machine without internet that has torch and triton, the pure-Python packages it lacks
# (pydantic and its dependencies) are installed from wheels in .whl/ when that folder is there.
set -uo pipefail
OUT=${OUT:-results/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site || echo "installing .whl/ failed: harness bench (the CLI) will not import"
fi
LOG=$OUT/log.txt
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, torchvision, triton; print(torch.__version__, torchvision.__version__, triton.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
  nproc; } 2>&1 | tee "$LOG"
step() { echo "== $(date -u +%T) $*" | tee -a "$LOG"; }
step parity
timeout ${PARITY_S:-150} $PY -m pytest -q -p no:cacheprovider tests/ops -k cuda 2>&1 | tail -25 > "$OUT/parity.txt"
cat "$OUT/parity.txt" >> "$LOG"; tail -2 "$OUT/parity.txt"
# the CLI before the probe: `harness bench` is the source of the documented figures, so it runs first
for amp in none bf16; do
    step bench ops $amp
    timeout 90 $PY -m harness bench ops --device cuda --amp $amp --impl conv2d --impl per_tap --impl shared \
        --impl modulated --impl torchvision --memory --reps 20 --json > "$OUT/ops_$amp.json" 2>> "$LOG"
    $PY - "$OUT/ops_$amp.json" <<'SUMMARY' 2>&1 | tee -a "$LOG"
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
tv = {r["shape"]: r["ms"] for r in rows if r["impl"] == "torchvision"}
for r in rows:
    if r["impl"] in ("per_tap", "shared"):  # torchvision here is unmodulated
        print(f"{r['shape']:>20} {r['impl']:>10} {r['ms']:7.3f} ms  torchvision / ours {tv[r['shape']] / r['ms']:.2f}")
SUMMARY
done
step probe
timeout ${PROBE_S:-270} $PY scripts/gpu_probe.py 2>&1 | tee -a "$LOG"
step done
