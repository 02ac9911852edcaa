#!/usr/bin/env bash
# Fuzz pyvmm's guest- and peer-facing surfaces with atheris (tests/fuzz/targets.py).
#   bash scripts/fuzz.sh [TARGET|all] [SECONDS]     (default: all targets, 60 s each)
# New corpus entries and any crash go to a folder under /tmp that is printed; the tree
# is not changed. Each target's last libFuzzer stats line is printed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh >/dev/null
target="${1:-all}"
seconds="${2:-60}"
if [ "$target" = all ]; then
    names=$(.venv/bin/python -c "from tests.fuzz.targets import TARGETS; print(' '.join(TARGETS))")
else
    names="$target"
fi
out="$(mktemp -d /tmp/pyvmm-fuzz.XXXXXX)"
echo "fuzz: output in $out"
rc=0
for t in $names; do
    if PYTHONHASHSEED=0 .venv/bin/python -m tests.fuzz.run "$t" --seconds "$seconds" \
            --out "$out/$t" >"$out/$t.log" 2>&1; then
        status=ok
    else
        status=FINDING
        rc=1
    fi
    stats=$(grep -E "^#[0-9]+.*(DONE|pulse|NEW)" "$out/$t.log" | tail -1 || true)
    runs=$(grep -E "stat::number_of_executed_units" "$out/$t.log" | awk '{print $2}' || true)
    echo "fuzz $t: ${runs:-?} runs, $status  ${stats}"
done
exit "$rc"
