#!/usr/bin/env bash
# Mutation testing of the code where a silent error changes results: harness/metrics.py and
# harness/report/stats.py, against the tests that cover them (tests/test_metrics.py,
# tests/report/test_stats.py). The configuration is [tool.mutmut] in pyproject.toml; mutmut >= 3.8 comes
# with the dev extras (pip install -e '.[dev]'). Not part of the default test run.
#
#   scripts/mutation.sh                    # mutate, run the tests against every mutant, list the survivors
#   scripts/mutation.sh --max-children 4   # extra arguments go to `mutmut run`
#
# mutmut works in the current directory (it writes mutants/ there), so this runs it in a snapshot of
# harness/, tests/ and pyproject.toml under $MUTATION_DIR (default: $TMPDIR/dcn-harness-mutation), which
# keeps the working tree clean and lets mutmut reuse its results for unchanged code on the next run.
# It prints each surviving mutant's diff; `cd $MUTATION_DIR && mutmut browse` explores them interactively.
# Exit status: 0 when every mutant is killed, 1 when some survive (or time out), 2 when mutmut fails.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${MUTATION_DIR:-${TMPDIR:-/tmp}/dcn-harness-mutation}"
mkdir -p "$work"
rm -rf "$work/harness" "$work/tests"
cp -a "$root/harness" "$root/tests" "$root/pyproject.toml" "$work/"
find "$work/harness" "$work/tests" -name __pycache__ -prune -exec rm -rf {} +

cd "$work"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
start=$SECONDS
mutmut run "$@" || exit 2
echo "mutmut run took $((SECONDS - start)) s (in $work)"

# `mutmut results` lists every mutant not killed (survived, timeout, suspicious, no tests, ...)
survivors="$(mutmut results | sed -n 's/^ *\([^ :]*\): .*$/\1/p')"
if [ -z "$survivors" ]; then
    echo "every mutant was killed"
    exit 0
fi
echo "mutants not killed ($(echo "$survivors" | wc -l)):"
mutmut results
for name in $survivors; do
    echo
    mutmut show "$name"
done
exit 1
