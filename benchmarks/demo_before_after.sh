#!/usr/bin/env bash
# The demo, a fixed subset (1 epoch per run, 10,000 training images), on the code of git revision REV
# and on this checkout, alternated REV now REV now; prints each whole `cqkd demo` process's wall seconds.
#   bash benchmarks/demo_before_after.sh 0f10e42 [REPS]
set -euo pipefail
rev=${1:?usage: demo_before_after.sh REV [REPS]}; reps=${2:-2}
root=$(cd "$(dirname "$0")/.." && pwd); py="$root/.venv/bin/python"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/old" && git -C "$root" archive "$rev" src | tar -x -C "$tmp/old"
for rep in $(seq "$reps"); do
  for tree in "$rev" now; do
    if [ "$tree" = now ]; then src="$root/src"; else src="$tmp/old/src"; fi
    out="$tmp/demo-$tree-$rep"
    start=$(date +%s.%N)
    PYTHONPATH="$src" "$py" -m cqkd demo --epochs 1 --train-samples 10000 --quiet --out "$out" > "$out.log" 2>&1
    end=$(date +%s.%N)
    echo "$tree rep $rep: $(echo "$end - $start" | bc) s ($(uptime | sed 's/.*load average/load average/'))"
  done
done
