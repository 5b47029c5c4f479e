#!/usr/bin/env bash
# The whole harness on a GPU machine without network: install what it lacks from .whl/ (built by
# scripts/build_wheelhouse.sh, carried with the tree), then the CUDA parity tests, `harness run` of
# ablations/gpu_e2e.yaml (3 variants × 2 seeds, 128 px, bf16 autocast, channels_last, profiled),
# `harness eval` and `harness report` on its store, and a summary of the figures docs/benchmarks.md
# records (images/s and the ratio to standard, peak GPU memory, deformable share, epoch time, a full
# train2017 epoch at that rate). Everything lands in $OUT (default results/gpu_e2e).
#
# GPU_E2E_DRY=1 runs the same steps on the CPU at a toy size, one seed and one analysis part (no install,
# no parity): the check that the script itself works, used by the tests.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu_e2e}
PY=${PYTHON:-python3}
DRY=${GPU_E2E_DRY:-0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT/log.txt
: > "$LOG"
step() { echo "== $(date -u +%T) $*" | tee -a "$LOG"; }
status=0
run() { "$@" >> "$LOG" 2>&1 || { echo "failed ($?): $*" | tee -a "$LOG"; status=1; }; }

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    SIZE=(--set data.image_size=32 --set data.synthetic.n_train=48 --set data.synthetic.n_val=16
          --set train.epochs=1 --set train.batch_size=16 --set model.width=0.25 --set profile.wait=0
          --set profile.warmup=0 --set profile.active=1 --set "grid.seed=[0]")
    PARTS=(--only offsets)
else
    DEVICE=cuda
    SIZE=()
    PARTS=()
    if compgen -G ".whl/*.whl" > /dev/null; then
        step install from .whl
        mapfile -t REQS < <($PY -c 'import tomllib; print("\n".join(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] if not d.startswith(("torch", "torchvision"))))')
        # what the machine has stays; only what it lacks comes from the wheelhouse
        if ! $PY -m pip install -q --no-index --find-links .whl "${REQS[@]}" >> "$LOG" 2>&1; then
            echo "resolved install failed; installing the wheelhouse without dependencies" | tee -a "$LOG"
            $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >> "$LOG" 2>&1
            export PYTHONPATH=$PYTHONPATH:/tmp/site
        fi
    fi
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; } >> "$LOG" 2>&1
fi
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"
$PY -m harness --version >> "$LOG" 2>&1 || true

STORE="sqlite:///$OUT/mlflow.db"
COMMON=(--tracking-uri "$STORE" --results-dir "$OUT/results")
if [ "$DRY" != 1 ]; then
    step parity
    run timeout "${PARITY_S:-180}" $PY -m pytest -q -p no:cacheprovider tests/ops -k cuda
fi
step harness run
run $PY -m harness run ablations/gpu_e2e.yaml --device "$DEVICE" "${COMMON[@]}" "${SIZE[@]}"
step harness eval
run $PY -m harness eval gpu_e2e --device "$DEVICE" "${COMMON[@]}" "${PARTS[@]}"
step harness report
run $PY -m harness report gpu_e2e --tracking-uri "$STORE" --out "$OUT/report.html"
run $PY -m harness report gpu_e2e --tracking-uri "$STORE" --format md --out "$OUT/report.md"
step summary
$PY - "$STORE" "$OUT/summary.json" <<'PY' 2>&1 | tee -a "$LOG" || status=1
import json, statistics, sys
import mlflow
from harness.tracking import names

TRAIN2017 = 118_287
mlflow.set_tracking_uri(sys.argv[1])
runs = mlflow.search_runs(experiment_names=["gpu_e2e"], filter_string="attributes.status = 'FINISHED'")
if runs.empty:
    sys.exit("no finished runs")
runs = runs[runs[f"tags.{names.ROLE}"] == names.CHILD]
rows = {}
for variant, group in runs.groupby(f"tags.{names.VARIANT}"):
    def median(metric):
        column = f"metrics.{metric}"
        values = group[column].dropna().tolist() if column in group else []
        return statistics.median(values) if values else None
    rows[variant] = {
        "runs": len(group), "images_per_s": median(names.MEAN_TRAIN_IMAGES_PER_S),
        "epoch_s": median(names.MEAN_EPOCH_TIME), "peak_cuda_mb": median(names.PEAK_CUDA_MB),
        "deform_share": median(names.PROFILE_DEFORM_SHARE), "final_val_map": median(names.final_of(names.VAL_MAP)),
    }
standard = rows.get("standard", {}).get("images_per_s")
for variant, row in rows.items():
    rate = row["images_per_s"]
    row["vs_standard"] = rate / standard if rate and standard else None
    row["train2017_epoch_min"] = TRAIN2017 / rate / 60 if rate else None
    print(variant, json.dumps(row))
json.dump(rows, open(sys.argv[2], "w"), indent=1)
PY
step "done (status $status)"
exit $status
