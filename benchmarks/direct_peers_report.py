#!/usr/bin/env python
"""Summarise benchmarks/direct_peers_ab.sh: the peers driver's aiote-shm with the direct path
(default and AIOTE_DIRECT_MAX=64 MiB) and through libfabric (AIOTE_DIRECT_SHM=0), beside raw C
libfabric shm and NIXL/UCX shm of the same rounds.  Median (min-max) over rounds.

    .venv/bin/python benchmarks/direct_peers_report.py
"""

from __future__ import annotations

import glob
import json
import statistics
import sys
from pathlib import Path

RES = Path(__file__).resolve().parent / "results"
CONFIGS = (("aiote direct", "pdirect", "aiote-shm"), ("aiote direct, direct_max 64 MiB", "pbig", "aiote-shm"),
           ("aiote via libfabric", "plibfabric", "aiote-shm"), ("raw C libfabric", "pdirect", "raw-shm"),
           ("NIXL/UCX", "pdirect", "nixl-shm"))


def points(prefix: str, key: str) -> list[dict]:
    out = []
    for f in sorted(glob.glob(str(RES / f"{prefix}-r*-2*.json"))):
        d = json.loads(Path(f).read_text())
        for run in d["runs"].get(key, []):
            out += run.get("results") or []
    return out


def fmt(v: list[float], scale: float, nd: int) -> str:
    if not v:
        return "—"
    v = [x * scale for x in v]
    return f"{statistics.median(v):.{nd}f} ({min(v):.{nd}f}–{max(v):.{nd}f})"


def main() -> int:
    data = {name: points(pre, key) for name, pre, key in CONFIGS}
    sizes = sorted({p["size"] for pts in data.values() for p in pts})
    for title, mode, field, scale, nd in (("pipelined (batches of 32 / 32 in flight), k ops/s", "pipe", "ops_per_s",
                                           1e-3, 1),
                                          ("pipelined, GB/s", "pipe", "gbps", 1, 2),
                                          ("one at a time, p50 µs", "one", "lat_us_p50", 1, 1)):
        print(f"\n**{title}**\n")
        print("| size | " + " | ".join(n for n, _, _ in CONFIGS) + " |")
        print("|---:|" + "---:|" * len(CONFIGS))
        for s in sizes:
            cells = [fmt([p[field] for p in data[n] if p["size"] == s and p["mode"] == mode and p[field] is not None],
                         scale, nd) for n, _, _ in CONFIGS]
            print(f"| {s} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
