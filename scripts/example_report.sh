#!/usr/bin/env bash
# Re-generate reports/examples/: the quickstart trained from scratch into a temporary store, analysed
# (`harness eval`: robustness curves), and its HTML and Markdown reports; plus the README's picture of
# the page's top (docs/quickstart-report.png, headless chromium when installed).
# Usage (from the repository root, the venv active): bash scripts/example_report.sh
set -euo pipefail
cd "$(dirname "$0")/.."
HARNESS=${HARNESS:-harness}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STORE=(--tracking-uri "sqlite:///$WORK/mlflow.db")
mkdir -p reports/examples
$HARNESS run ablations/quickstart.yaml "${STORE[@]}" --results-dir "$WORK/results"
$HARNESS eval quickstart "${STORE[@]}" --results-dir "$WORK/results" --only robustness
$HARNESS report quickstart "${STORE[@]}" --out reports/examples/quickstart.html
$HARNESS report quickstart "${STORE[@]}" --format md --out reports/examples/quickstart.md
if command -v chromium >/dev/null 2>&1; then
    chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,1400 \
        --screenshot=docs/quickstart-report.png "file://$PWD/reports/examples/quickstart.html" 2>/dev/null
fi
ls -l reports/examples docs/quickstart-report.png 2>/dev/null || true
