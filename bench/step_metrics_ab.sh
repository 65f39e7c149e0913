#!/usr/bin/env bash
# Do two builds train the same? Runs `train --steps N` (outcome GRPO, then --use-cal)
# with each binary on the embedded benchmark and compares every logged step metric
# except timings (perf/*, oracle/latency_ms). Used to show that a refactor (the
# algorithm seam) left GRPO and CAL-GRPO exactly where they were.
#
#   bash bench/step_metrics_ab.sh OLD_BINARY NEW_BINARY [STEPS] [EXTRA FLAGS...]
#
# An old binary: `git worktree add /tmp/old <commit> && cargo build --release -p cal-cli`
# there (with its own target folder). Both share the cached tiny warm start.
set -euo pipefail
old=$1 new=$2 steps=${3:-3}
shift $(( $# < 3 ? $# : 3 ))
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for arm in grpo cal; do
  flags=()
  [ "$arm" = cal ] && flags=(--use-cal)
  for b in old new; do
    bin=${!b}
    "$bin" train --steps "$steps" "${flags[@]}" "$@" --output-dir "$work/$b-$arm" > "$work/$b-$arm.log" 2>&1 \
      || { echo "$b $arm failed:"; tail -5 "$work/$b-$arm.log"; exit 1; }
  done
done
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
def rows(d):
    return [json.loads(l) for l in open(f"{work}/{d}/metrics.jsonl")]
timing = lambda k: k.startswith("perf/") or k == "oracle/latency_ms"
print("| arm | rows | values compared | differ |")
print("|---|---|---|---|")
bad = 0
for arm in ["grpo", "cal"]:
    a, b = rows(f"old-{arm}"), rows(f"new-{arm}")
    n = d = 0
    for x, y in zip(a, b):
        for k in sorted(set(x) | set(y)):
            if timing(k):
                continue
            n += 1
            if x.get(k) != y.get(k):
                d += 1
                print(f"  {arm} step {x.get('step')}: {k} {x.get(k)} -> {y.get(k)}", file=sys.stderr)
    d += abs(len(a) - len(b))
    bad += d
    print(f"| {arm} | {len(a)} / {len(b)} | {n} | {d} |")
sys.exit(1 if bad else 0)
PY
