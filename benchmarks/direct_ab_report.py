#!/usr/bin/env python
"""Summarise the direct-path A/B rounds of benchmarks/direct_ab.sh (bench_write and bench_paged,
AIOTE_DIRECT_SHM=1 vs 0, interleaved): median (min-max) over rounds, with ratios to raw C run in
the same invocation.

    .venv/bin/python benchmarks/direct_ab_report.py [PREFIX]      # default PREFIX: ab
"""

from __future__ import annotations

import glob
import json
import statistics
import sys
from pathlib import Path

RES = Path(__file__).resolve().parent / "results"


def load(pattern: str) -> list[dict]:
    return [json.loads(Path(f).read_text()) for f in sorted(glob.glob(str(RES / pattern)))
            if not f.endswith("-latest.json")]


def fmt(vals: list[float], scale: float = 1.0, nd: int = 2) -> str:
    if not vals:
        return "—"
    v = [x * scale for x in vals]
    return f"{statistics.median(v):.{nd}f} ({min(v):.{nd}f}–{max(v):.{nd}f})"


def main() -> int:
    pre = sys.argv[1] if len(sys.argv) > 1 else "ab"
    print("## bench_write shm, 32 in flight (tasks), ops/s in k; ratio = aiote / raw C DC=1 of the same run\n")
    print("| size | aiote direct k ops/s | aiote/raw (direct) | aiote libfabric k ops/s | aiote/raw (libfabric) "
          "| direct / libfabric | raw C DC=1 k ops/s (all runs) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    on, off = load(f"{pre}-write-on-r*-*.json"), load(f"{pre}-write-off-r*-*.json")
    sizes = [p["size"] for p in on[0]["bw"]["shm"]] if on else []
    lat = {}
    for size in sizes:
        def pts(runs, size=size):
            return [p for r in runs for p in r["bw"]["shm"] if p["size"] == size]
        a_on = [p["aiote"]["ops_per_s"]["median"] for p in pts(on)]
        a_off = [p["aiote"]["ops_per_s"]["median"] for p in pts(off)]
        r_on = [p["ratio"]["median"] for p in pts(on)]
        r_off = [p["ratio"]["median"] for p in pts(off)]
        raw = [p["raw_dc1"]["ops_per_s"]["median"] for p in pts(on) + pts(off)]
        ab = [x / y for x, y in zip(a_on, a_off)]
        print(f"| {size} | {fmt(a_on, 1e-3, 1)} | {fmt(r_on)} | {fmt(a_off, 1e-3, 1)} | {fmt(r_off)} | {fmt(ab)} "
              f"| {fmt(raw, 1e-3, 1)} |")
    for name, runs in (("direct", on), ("libfabric", off)):
        for key in ("aiote_adaptive", "aiote_busy", "raw_dc1", "floor"):
            vals = [r["lat"]["shm"][key]["p50_us"]["median"] for r in runs if key in r.get("lat", {}).get("shm", {})]
            v99 = [r["lat"]["shm"][key]["p99_us"]["median"] for r in runs if key in r.get("lat", {}).get("shm", {})]
            if vals:
                lat[(name, key)] = (vals, v99)
    print("\n## imm notification latency (bench_write ping-pong, 64 B), µs, median (min–max) over rounds\n")
    print("| config | p50 | p99 |")
    print("|---|---:|---:|")
    for (name, key), (p50, p99) in lat.items():
        print(f"| {name}: {key} | {fmt(p50, 1, 1)} | {fmt(p99, 1, 1)} |")
    print("\n## bench_paged shm (10,000 pages per call, 4 calls in flight), k pages/s; ratio = aiote / raw C DC=1\n")
    print("| page | mode | aiote write_paged k pages/s | aiote/raw | raw C DC=1 k pages/s |")
    print("|---|---|---:|---:|---:|")
    for mode, pat in (("direct (direct_max 64 MiB)", f"{pre}-paged-big-r*-*.json"),
                      ("default (256 KiB: calls of 10,000 pages go through libfabric)", f"{pre}-paged-on-r*-*.json"),
                      ("libfabric (direct off)", f"{pre}-paged-off-r*-*.json")):
        runs = load(pat)
        if not runs:
            continue
        for page in [p["page"] for p in runs[0]["paged"]["shm"]]:
            pts = [p for r in runs for p in r["paged"]["shm"] if p["page"] == page]
            a = [p["paged"]["pages_per_s"]["median"] for p in pts]
            rr = [p["paged_ratio"]["median"] for p in pts]
            raw = [p["raw_dc1"]["pages_per_s"]["median"] for p in pts]
            print(f"| {page} | {mode} | {fmt(a, 1e-3, 1)} | {fmt(rr)} | {fmt(raw, 1e-3, 1)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
