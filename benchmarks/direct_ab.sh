#!/bin/bash
cd "$(dirname "$0")/.."
for r in 1 2 3; do
  echo "== round $r $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  if [ $((r % 2)) = 1 ]; then order="on off"; else order="off on"; fi
  for m in $order; do
    if [ $m = on ]; then e=1; else e=0; fi
    AIOTE_DIRECT_SHM=$e timeout 600 .venv/bin/python benchmarks/bench_write.py --providers shm --sizes 64,4K,64K,256K,1M,16M --runs 1 --no-plot --name ab-write-$m-r$r > /tmp/ab-write-$m-r$r.log 2>&1; echo "write $m rc $? $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    AIOTE_DIRECT_SHM=$e timeout 600 .venv/bin/python benchmarks/bench_paged.py --providers shm --pages 1K,8K --runs 1 --no-plot --name ab-paged-$m-r$r > /tmp/ab-paged-$m-r$r.log 2>&1; echo "paged $m rc $? $(date +%T)"
  done
  AIOTE_DIRECT_MAX=$((64<<20)) timeout 600 .venv/bin/python benchmarks/bench_paged.py --providers shm --pages 1K,8K --runs 1 --no-plot --name ab-paged-big-r$r > /tmp/ab-paged-big-r$r.log 2>&1; echo "paged big rc $? $(date +%T)"
done
echo DONE
