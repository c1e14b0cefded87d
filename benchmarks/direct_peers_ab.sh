#!/bin/bash
cd "$(dirname "$0")/.."
S=64,4096,65536,1048576,16777216
for r in 1 2 3; do
  echo "== round $r $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  timeout 900 .venv/bin/python benchmarks/peers/run_peers.py --only aiote-shm,nixl-shm,raw-shm --sizes $S --runs 1 --no-doc --no-plot --name pdirect-r$r > /tmp/pdirect-r$r.log 2>&1; echo "direct+peers rc $? $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  AIOTE_DIRECT_SHM=0 timeout 900 .venv/bin/python benchmarks/peers/run_peers.py --only aiote-shm --sizes $S --runs 1 --no-doc --no-plot --name plibfabric-r$r > /tmp/plibfabric-r$r.log 2>&1; echo "libfabric rc $? $(date +%T)"
  AIOTE_DIRECT_MAX=67108864 timeout 900 .venv/bin/python benchmarks/peers/run_peers.py --only aiote-shm --sizes $S --runs 1 --no-doc --no-plot --name pbig-r$r > /tmp/pbig-r$r.log 2>&1; echo "direct_max 64M rc $? $(date +%T)"
done
echo DONE
