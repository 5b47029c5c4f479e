#!/usr/bin/env bash
# One prepared GPU check (issues: fast DCN, scale-out): CUDA parity, op and model speed in fp32 and
# bf16, and a short conv_vs_deform ablation on coco-mini with images/s per variant. Run from the
# repository root on a machine with a GPU; everything it writes goes to $OUT (default results/gpu_check).
#
# On the lent device machine (no internet there): copy coco-mini into an ignored folder of the repo
# and carry it, and carry the project's wheels if its packages are missing there, e.g.
#   echo /gpu_data/ >> .git/info/exclude && cp -r ../shared/coco-mini gpu_data/
#   COCO=gpu_data/coco-mini bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-results/gpu_check}
COCO=${COCO:-../shared/coco-mini}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{ nvidia-smi; python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"; } \
    > "$OUT/device.txt" 2>&1
python -m pytest -q tests/test_ops.py -k cuda 2>&1 | tail -5 > "$OUT/parity.txt"
harness bench ops --device cuda --memory --reps 20 --json > "$OUT/ops_fp32.json"
harness bench ops --device cuda --amp bf16 --reps 20 --json > "$OUT/ops_bf16.json"
harness bench model --device cuda --json > "$OUT/model_fp32.json"
harness bench model --device cuda --amp bf16 --channels-last --json > "$OUT/model_bf16.json"
harness run ablations/conv_vs_deform.yaml --data-root "$COCO" --device cuda --no-profile \
    --set train.epochs=2 --set grid.seed=[0] \
    --tracking-uri "sqlite:///$OUT/mlflow.db" --results-dir "$OUT/results" > "$OUT/ablation.txt" 2>&1
harness report conv_vs_deform --tracking-uri "sqlite:///$OUT/mlflow.db" --format csv --out "$OUT/conv_vs_deform.csv"
cat "$OUT/parity.txt"; tail -12 "$OUT/ablation.txt"
