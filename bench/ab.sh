#!/usr/bin/env bash
# Same-run A/B of two commits: `bench/ab.sh BASE [PAIRS] [BENCH_ARGS...]`
#
# Runs `python -m bench BENCH_ARGS --repeat 1 --noise-budget 0` PAIRS times (default 3) on a
# checkout of BASE and on this working tree, alternating, so a drift of the machine's speed
# hits both alike. Results go to bench/results/tmp/ab/{base,head}-N/; the table rows of each
# run are printed side by side. Example:
#   bench/ab.sh 277d3ba 3 --scenarios overhead --torch-threads 1
set -euo pipefail
base=${1:?usage: bench/ab.sh BASE [PAIRS] [BENCH_ARGS...]}
pairs=${2:-3}
[[ "$pairs" =~ ^[0-9]+$ ]] || { echo "PAIRS must be a number, not $pairs" >&2; exit 2; }
shift $(( $# >= 2 ? 2 : 1 ))
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
out=$root/bench/results/tmp/ab
worktree=$(mktemp -d -t embedworker-ab-XXXXXX)
trap 'git -C "$root" worktree remove --force "$worktree" >/dev/null 2>&1 || true' EXIT
git -C "$root" worktree add --detach -q "$worktree" "$base"
rm -rf "$out"
mkdir -p "$out"
for i in $(seq 1 "$pairs"); do
  for side in base head; do
    dir=$root; [ "$side" = base ] && dir=$worktree
    # From the checkout's own directory: `python -m` puts it first on sys.path, ahead of the editable install.
    (cd "$dir" && "$python" -m bench "$@" --repeat 1 --noise-budget 0 --out "$out/$side-$i" > "$out/$side-$i.log" 2>&1) \
      || echo "$side $i: failed, see $out/$side-$i.log"
    { sed -n 's/^| \(.*\) | \(.*\) | .* | .* |$/\1: \2/p' "$out/$side-$i/README-table.md" | grep -v '^measurement' | sed "s/^/$side $i  /"; } || true
  done
done
