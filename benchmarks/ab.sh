#!/bin/bash
# A/B of two aiote builds on one machine (docs/benchmarks.md §5): per round
# bench_write.py (shm, 64 B - 1 MiB, throughput + latency) and bench_paged.py
# (shm, 1 KiB / 8 KiB pages), --runs 1 each, with one build then the other,
# the order flipped every round; at the end report.py --merge per build and
# report.py --compare.
#
#   BEFORE=/tmp/aiote-before BEFORE_REV=da9fe7d AFTER=/tmp/aiote-after AFTER_REV=0109451 \
#     ROUNDS=4 OUT=benchmarks/results/ab benchmarks/ab.sh
#
# BEFORE / AFTER: directories holding an aiote/ package with its native part
# built in place, e.g.  git archive REV | tar -x -C DIR && (cd DIR && python setup.py build_ext --inplace)
# PROVIDERS (default shm), ROUNDS (default 4), PREFIX (default ab), PY (default
# .venv/bin/python if there, else python3). Results: $OUT/$PREFIX-{write,paged}-{before,after}.json,
# the single runs in $OUT/$PREFIX-runs.tar, the log in $OUT/$PREFIX-log.txt.
set -u
cd "$(dirname "$0")/.." || exit 1
: "${BEFORE:?}" "${AFTER:?}" "${OUT:=benchmarks/results/ab}"
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
P=${PREFIX:-ab}
RUNS=$(mktemp -d)
mkdir -p "$OUT"
LOG=$OUT/$P-log.txt
{ lscpu | head -15; uname -r; nproc; uptime; } > "$LOG" 2>&1
env -u OUT sh benchmarks/raw/build.sh || exit 1
declare -A DIR=([before]=$BEFORE [after]=$AFTER) REV=([before]=${BEFORE_REV:-before} [after]=${AFTER_REV:-after})
for r in $(seq 1 "${ROUNDS:-4}"); do
  if [ $((r % 2)) = 1 ]; then order="before after"; else order="after before"; fi
  for v in $order; do
    X="env PYTHONPATH=${DIR[$v]}${PYTHONPATH:+:$PYTHONPATH} AIOTE_BENCH_REV=${REV[$v]} AIOTE_BENCH_RESULTS=$RUNS"
    echo "=== round $r $v $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$LOG"
    timeout 300 $X "$PY" benchmarks/bench_write.py --providers "${PROVIDERS:-shm}" --sizes 64,4K,64K,256K,1M \
      --runs 1 --no-plot --name "$P-write-$v-$r" >> "$LOG" 2>&1
    timeout 300 $X "$PY" benchmarks/bench_paged.py --providers "${PROVIDERS:-shm}" --pages 1K,8K --runs 1 \
      --no-plot --name "$P-paged-$v-$r" >> "$LOG" 2>&1
  done
done
for b in write paged; do
  for v in before after; do
    "$PY" benchmarks/report.py --merge "$OUT/$P-$b-$v.json" "$RUNS"/$P-$b-$v-*-2*.json || true
  done
  "$PY" benchmarks/report.py --compare "$OUT/$P-$b-before.json" "$OUT/$P-$b-after.json" \
    --labels "${REV[before]},${REV[after]}" | tee -a "$LOG"
done
(cd "$RUNS" && tar cf "$OUT/$P-runs.tar" ./*-2*.json)
echo "=== done $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$LOG"
