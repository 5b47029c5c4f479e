#!/usr/bin/env bash
# Build .whl/: the wheels `harness run` needs on a GPU machine without network that already has the
# scientific stack (torch, torchvision, numpy, pandas, scipy, matplotlib, pillow, scikit-learn,
# pyarrow, as the lent GPU images do). The project's dependencies are resolved for that machine's
# Python (default 3.12) and platform; the stack it has and TensorBoard's (not used by `harness run`)
# are left out and the rest is downloaded, so the folder stays under the device tool's 64 MiB carry limit. Usage: scripts/build_wheelhouse.sh [PYVER]
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
DEST=.whl
PIP=${PIP:-.venv/bin/pip}
TARGET=(--only-binary=:all: --python-version "$PYVER" --implementation cp
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
HAVE='^(torch|torchvision|numpy|pandas|scipy|matplotlib|pillow|scikit-learn|pyarrow|triton|sympy|networkx|mpmath|fonttools|kiwisolver|contourpy|cycler|pyparsing|joblib|threadpoolctl|filelock|fsspec|setuptools|nvidia-.*|cuda-.*|torch-tb-profiler|tensorboard.*|grpcio|absl-py|markdown)$'
REPORT=$(mktemp)
trap 'rm -f "$REPORT"' EXIT
mapfile -t REQS < <(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
"$PIP" install --quiet --dry-run --ignore-installed --target /tmp/wheelhouse-resolve "${TARGET[@]}" \
    --report "$REPORT" "${REQS[@]}"
mapfile -t PINS < <(python3 - "$REPORT" "$HAVE" <<'PY'
import json, re, sys
have = re.compile(sys.argv[2])
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"].lower(), item["metadata"]["version"]
    if not have.match(name):
        print(f"{name}=={version}")
PY
)
mkdir -p "$DEST"
"$PIP" download --quiet --no-deps --dest "$DEST" "${TARGET[@]}" "${PINS[@]}"
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
