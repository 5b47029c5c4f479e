#!/usr/bin/env bash
# Build the wheel, install it in a fresh virtual environment outside the checkout, and check that the
# installed copy works on its own: `harness --version`, and the shipped examples validate.
# The fresh environment sees the current interpreter's site-packages (--system-site-packages when the
# current python is a venv's: its torch is reused instead of a multi-minute download); the wheel itself
# is installed with --no-deps only when every dependency is already importable there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/harness-wheel-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)

"$PYTHON" -m pip wheel --no-deps --no-build-isolation -q -w "$WORK/dist" . 2>&1 | grep -v "^DEPRECATION" || true
wheel=$(ls "$WORK"/dist/dcn_harness-*.whl)
echo "built $(basename "$wheel") ($(( $(date +%s) - started ))s)"
unzip -l "$wheel" | grep -q "harness/examples/quickstart.yaml" || { echo "wheel lacks harness/examples/" >&2; exit 1; }

# a venv over the interpreter's environment (its torch, mlflow, ... are visible), then the wheel in it
base_site=$("$PYTHON" -c 'import site; print(site.getsitepackages()[0])')
"$PYTHON" -m venv --without-pip "$WORK/venv"
echo "$base_site" > "$("$WORK/venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')/harness-base.pth"
"$PYTHON" -m pip --python "$WORK/venv/bin/python" install -q --no-deps "$wheel"
"$PYTHON" -m pip --python "$WORK/venv/bin/python" check >/dev/null 2>&1 || echo "note: pip check reports issues"
echo "installed into $WORK/venv ($(( $(date +%s) - started ))s)"

cd "$WORK"  # outside the checkout: only the installed copy can be imported
installed=$("$WORK/venv/bin/python" -c 'import harness, pathlib; print(pathlib.Path(harness.__file__).parent)')
case "$installed" in "$WORK"/*) ;; *) echo "imported harness from $installed, not the wheel" >&2; exit 1 ;; esac
"$WORK/venv/bin/harness" --version
"$WORK/venv/bin/harness" examples "$WORK/examples"
for f in "$OLDPWD"/ablations/*.yaml; do
    cmp -s "$f" "$WORK/examples/$(basename "$f")" || { echo "examples differ from ablations/: $(basename "$f")" >&2; exit 1; }
done
"$WORK/venv/bin/harness" run "$WORK/examples/quickstart.yaml" --dry-run --results-dir "$WORK/results"
echo "wheel check passed in $(( $(date +%s) - started ))s"
