#!/usr/bin/env bash
# One prepared GPU check for the fast-DCN issue: CUDA parity with torchvision, `harness bench ops|model`
# in fp32 and bf16, then scripts/gpu_probe.py (column-chunk sweep, larger shapes, kernel breakdown,
# the network at GPU-sized batches). Run from the repository root on a machine with a GPU; output
# goes to $OUT (default results/gpu_check): 8 files, the last lines of log.txt are the summary.
#
# On the lent device machine (Python 3.12, torch preinstalled, no internet) the packages it lacks
# (pydantic and its three dependencies) travel as wheels in .whl/ (see the device tool's README).
set -uo pipefail
OUT=${OUT:-results/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
LOG=$OUT/log.txt
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
  nproc; } 2>&1 | tee "$LOG"
step() { echo "== $*" | tee -a "$LOG"; }
step parity
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_ops.py -k cuda 2>&1 | tail -15 > "$OUT/parity.txt"
cat "$OUT/parity.txt" >> "$LOG"; tail -2 "$OUT/parity.txt"
IMPLS="--impl conv2d --impl per_tap --impl shared --impl modulated --impl torchvision"
step ops fp32
timeout 150 $PY -m harness bench ops --device cuda $IMPLS --memory --reps 20 --json > "$OUT/ops_fp32.json" 2>> "$LOG"
step ops bf16
timeout 150 $PY -m harness bench ops --device cuda $IMPLS --amp bf16 --memory --reps 20 --json > "$OUT/ops_bf16.json" 2>> "$LOG"
step model fp32
timeout 60 $PY -m harness bench model --device cuda --json > "$OUT/model_fp32.json" 2>> "$LOG"
step model bf16
timeout 60 $PY -m harness bench model --device cuda --amp bf16 --channels-last --json > "$OUT/model_bf16.json" 2>> "$LOG"
step probe
timeout 200 $PY scripts/gpu_probe.py 2>&1 | tee -a "$LOG"
step summary
$PY - "$OUT" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ("ops_fp32", "ops_bf16"):
    try:
        rows = json.loads((out / f"{name}.json").read_text())["rows"]
    except Exception as error:  # noqa: BLE001
        print(name, "missing:", error); continue
    by = {}
    for r in rows:
        by.setdefault(r["shape"], {})[r["impl"]] = r
    for shape, cells in by.items():
        tv = cells["torchvision"]["ms"]
        print(f"{name} {shape:22s} " + " ".join(f"{k} {v['ms']:.3f}ms/{v['peak_mb'] or 0:.0f}MiB" for k, v in cells.items())
              + f" | tv/per_tap {tv / cells['per_tap']['ms']:.2f} tv/shared {tv / cells['shared']['ms']:.2f}")
for name in ("model_fp32", "model_bf16"):
    try:
        rows = json.loads((out / f"{name}.json").read_text())["rows"]
        print(name, ", ".join(f"{r['placement']} {r['images_per_s']:.0f}/s ({r['relative_to_standard']:.2f}x)" for r in rows))
    except Exception as error:  # noqa: BLE001
        print(name, "missing:", error)
PY
