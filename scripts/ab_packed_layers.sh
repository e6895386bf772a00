#!/bin/bash
# A/B of the packed kernels of two checkouts on a shared, noisy machine: both run
# scripts/packed_layer_speedups.py AT THE SAME TIME, each pinned to its own core (so both see the
# same background load), then again with the cores swapped. Compare the ratios, not the times.
#   scripts/ab_packed_layers.sh OLD_CHECKOUT NEW_CHECKOUT [REPEATS]
# Each checkout builds its own kernels at first use (about 90 s); PYTHON defaults to this
# checkout's .venv.
set -euo pipefail
old=$(cd "$1" && pwd); new=$(cd "$2" && pwd); reps=${3:-30}
python=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
script=$(cd "$(dirname "$0")" && pwd)/packed_layer_speedups.py
for dir in "$old" "$new"; do (cd "$dir" && "$python" "$script" 1 > /dev/null); done  # build first
for cores in "0 1" "1 0"; do
  set -- $cores
  (cd "$old" && taskset -c "$1" "$python" "$script" "$reps" | sed "s/^/OLD cpu$1 /") > "$old.ab.txt" &
  (cd "$new" && taskset -c "$2" "$python" "$script" "$reps" | sed "s/^/NEW cpu$2 /") > "$new.ab.txt" &
  wait
  cat "$old.ab.txt" "$new.ab.txt"
  rm -f "$old.ab.txt" "$new.ab.txt"
done
