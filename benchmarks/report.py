#!/usr/bin/env python
"""Markdown tables from a bench_write / bench_paged results file (for docs/benchmarks.md).

.venv/bin/python benchmarks/report.py benchmarks/results/write-latest.json
.venv/bin/python benchmarks/report.py benchmarks/results/paged-latest.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def _r(s: dict[str, Any], digits: int = 2) -> str:
    return C.fmt_med(s, 1.0, digits)


def bw(d: dict[str, Any]) -> None:
    for prov, rows in d.get("bw", {}).items():
        print(f"\n**{prov}** — GB/s, median (min–max) of {len(rows[0]['aiote']['gbps']['values'])} runs\n")
        print("| size | raw DC=1 | aiote | aiote/raw | best/best | raw DC=1 ops/s | aiote ops/s | raw DC=0 |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            flag = " ⚠" if r.get("disturbed") else ""
            best = f"{r['best_ratio']:.2f}" if r.get("best_ratio") else "-"
            print(
                f"| {C.fmt_size(r['size'])} | {_r(r['raw_dc1']['gbps'])} | {_r(r['aiote']['gbps'])} | "
                f"**{_r(r['ratio'])}**{flag} | {best} | {C.fmt_rate(r['raw_dc1']['ops_per_s']['median'])} | "
                f"{C.fmt_rate(r['aiote']['ops_per_s']['median'])} | {_r(r['raw_dc0']['gbps'])} |"
            )


def lat(d: dict[str, Any]) -> None:
    labels = {
        "raw_dc0": "raw C `fi_bench lat`, DC=0",
        "raw_dc1": "raw C `fi_bench lat`, DC=1",
        "aiote_busy": "aiote, polling=busy",
        "aiote_adaptive": "aiote, polling=adaptive",
        "asyncio_floor": "no aiote: asyncio pipe ping-pong",
    }
    for prov, L in d.get("lat", {}).items():
        size = C.fmt_size(L["size"])
        print(f"\n**{prov}** — one-way µs (RTT/2), {size} writes, median (min–max) of runs\n")
        print("| config | p50 | p99 |")
        print("|---|---:|---:|")
        for k, label in labels.items():
            if k in L:
                print(f"| {label} | {_r(L[k]['p50_us'])} | {_r(L[k]['p99_us'])} |")


def paged(d: dict[str, Any]) -> None:
    for prov, rows in d.get("paged", {}).items():
        nruns = len(rows[0]["paged"]["pages_per_s"]["values"])
        print(f"\n**{prov}** — pages/s, median (min–max) of {nruns} runs\n")
        print(
            "| page | raw DC=1 | write_paged | paged/raw | best/best | single write() loop | single/raw | "
            "write_paged GB/s | raw DC=0 |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            flag = " ⚠" if r.get("disturbed") else ""
            best = f"{r['best_ratio']:.2f}" if r.get("best_ratio") else "-"
            print(
                f"| {C.fmt_size(r['page'])} | {C.fmt_k(r['raw_dc1']['pages_per_s'])} | "
                f"{C.fmt_k(r['paged']['pages_per_s'])} | **{_r(r['paged_ratio'])}**{flag} | {best} | "
                f"{C.fmt_k(r['single']['pages_per_s'])} | {_r(r['single_ratio'])} | "
                f"{_r(r['paged']['gbps'])} | "
                f"{C.fmt_k(r['raw_dc0']['pages_per_s'])} |"
            )


def main() -> int:
    for path in sys.argv[1:]:
        d = json.loads(Path(path).read_text())
        m = d.get("machine", {})
        print(
            f"\n<!-- {path}: {m.get('date')} nproc={m.get('nproc')} load {m.get('loadavg_start')} → "
            f"{m.get('loadavg_end')}, git {m.get('git')}, native {m.get('native_so_sha256')} -->"
        )
        bw(d)
        lat(d)
        paged(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
