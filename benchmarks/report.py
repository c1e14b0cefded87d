#!/usr/bin/env python
"""Markdown tables from bench_write / bench_paged / bench_nics results files (for docs/benchmarks.md).

.venv/bin/python benchmarks/report.py benchmarks/results/write-latest.json
.venv/bin/python benchmarks/report.py benchmarks/results/paged-latest.json
.venv/bin/python benchmarks/report.py benchmarks/results/nics-latest.json
# several runs=1 files of one configuration (e.g. alternating two builds) -> one file:
.venv/bin/python benchmarks/report.py --merge OUT.json IN1.json IN2.json ...
# side by side (e.g. before / after a library change), each with its own raw baseline:
.venv/bin/python benchmarks/report.py --compare OLD.json NEW.json [...] --labels old,new[,...]
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
        "aiote_spin": "aiote, adaptive + loop_spin_us",
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


def nics(d: dict[str, Any]) -> None:
    for prov, rows in d.get("nics", {}).items():
        nruns = len(rows[0]["aiote"]["gbps"]["values"])
        print(f"\n**{prov}** — GB/s, median (min–max) of {nruns} runs; ×k=1: median of per-run ratios\n")
        print(
            "| size | k | raw 1 thread | ×k=1 | raw k threads | ×k=1 | aiote | ×k=1 | aiote/raw 1 thr | "
            "aiote worker busy, initiator / target (sys) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            flag = " ⚠" if r.get("disturbed") else ""
            wb = r["aiote_worker_busy"]

            def sc(impl: str, r: dict[str, Any] = r) -> str:
                m = r[impl]["scale"]
                if m["median"] is None or r["k"] == 1:
                    return ""
                return f"**{_r(m)}**" if r["k"] == 2 else _r(m)

            print(
                f"| {C.fmt_size(r['size'])} | {r['k']} | {_r(r['raw1']['gbps'])} | {sc('raw1')} | "
                f"{_r(r['rawk']['gbps']) if r['k'] > 1 else '(same)'} | {sc('rawk')} | "
                f"{_r(r['aiote']['gbps'])} | {sc('aiote')} | {_r(r['aiote_vs_raw1'])}{flag} | "
                f"{wb['initiator']['median']:.0%} ({wb['initiator_sys']['median']:.0%}) / "
                f"{wb['target']['median']:.0%} ({wb['target_sys']['median']:.0%}) |"
            )


def compare(paths: list[str], labels: list[str]) -> None:
    """Side-by-side: aiote/raw ratios (each file against its own raw runs) and aiote rates."""
    ds = [json.loads(Path(p).read_text()) for p in paths]
    hdr = " | ".join(labels)
    for prov in ds[-1].get("bw", {}):
        rows = {i: {r["size"]: r for r in d.get("bw", {}).get(prov, [])} for i, d in enumerate(ds)}
        print(f"\n**{prov}** single writes — aiote/raw DC=1 (median of per-run ratios) and aiote ops/s: {hdr}\n")
        print(
            "| size | "
            + " | ".join(f"aiote/raw {x}" for x in labels)
            + " | "
            + " | ".join(f"aiote ops/s {x}" for x in labels)
            + " | "
            + " | ".join(f"raw ops/s {x}" for x in labels)
            + " |"
        )
        print("|---:|" + "---:|" * (3 * len(ds)))
        for size in [r["size"] for r in ds[-1]["bw"][prov]]:
            cells = []
            for key in ("ratio", "aiote", "raw_dc1"):
                for i in range(len(ds)):
                    r = rows[i].get(size)
                    if r is None:
                        cells.append("–")
                    elif key == "ratio":
                        cells.append(_r(r["ratio"]) + (" ⚠" if r.get("disturbed") else ""))
                    else:
                        cells.append(C.fmt_rate(r[key]["ops_per_s"]["median"]))
            print(f"| {C.fmt_size(size)} | " + " | ".join(cells) + " |")
    for prov in ds[-1].get("lat", {}):
        print(f"\n**{prov}** imm latency, one-way µs p50 / p99 (median of runs): {hdr}\n")
        print(
            "| config | "
            + " | ".join(f"p50 {x}" for x in labels)
            + " | "
            + " | ".join(f"p99 {x}" for x in labels)
            + " |"
        )
        print("|---|" + "---:|" * (2 * len(ds)))
        for k in ("raw_dc1", "aiote_busy", "aiote_adaptive", "aiote_spin", "asyncio_floor"):
            cells = []
            for m in ("p50_us", "p99_us"):
                for d in ds:
                    L = d.get("lat", {}).get(prov)
                    cells.append(_r(L[k][m]) if L and k in L else "–")
            print(f"| {k} | " + " | ".join(cells) + " |")
    for prov in ds[-1].get("paged", {}):
        rows = {i: {r["page"]: r for r in d.get("paged", {}).get(prov, [])} for i, d in enumerate(ds)}
        print(f"\n**{prov}** paged — write_paged/raw DC=1 and write_paged pages/s: {hdr}\n")
        print(
            "| page | "
            + " | ".join(f"paged/raw {x}" for x in labels)
            + " | "
            + " | ".join(f"write_paged {x}" for x in labels)
            + " | "
            + " | ".join(f"single write() {x}" for x in labels)
            + " |"
        )
        print("|---:|" + "---:|" * (3 * len(ds)))
        for page in [r["page"] for r in ds[-1]["paged"][prov]]:
            cells = []
            for key in ("paged_ratio", "paged", "single"):
                for i in range(len(ds)):
                    r = rows[i].get(page)
                    if r is None:
                        cells.append("–")
                    elif key == "paged_ratio":
                        cells.append(_r(r[key]) + (" ⚠" if r.get("disturbed") else ""))
                    else:
                        cells.append(C.fmt_k(r[key]["pages_per_s"]))
            print(f"| {C.fmt_size(page)} | " + " | ".join(cells) + " |")


def _is_summary(x: Any) -> bool:
    return isinstance(x, dict) and {"median", "min", "max", "values"} <= set(x)


def _cat(a: Any, b: Any) -> None:
    """Append b's per-run values to a's summaries, in place (same structure)."""
    if _is_summary(a) and _is_summary(b):
        a["values"] = list(a["values"]) + list(b["values"])
    elif isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            if k in b:
                _cat(a[k], b[k])
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for x, y in zip(a, b):
            _cat(x, y)


def _resum(x: Any) -> Any:
    if _is_summary(x):
        return C.summary(x["values"])
    if isinstance(x, dict):
        return {k: _resum(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_resum(v) for v in x]
    return x


def merge(paths: list[str]) -> dict[str, Any]:
    """One results dict from several files of the same configuration: per-run values
    concatenated, summaries recomputed (the median of per-run ratios stays that);
    the files' machine facts and commands are kept under "merged_from"."""
    ds = [json.loads(Path(p).read_text()) for p in paths]
    out = ds[0]
    for d in ds[1:]:
        _cat(out, d)
    out = _resum(out)
    for rows in out.get("bw", {}).values():
        for r in rows:
            r["best_ratio"] = C.best_ratio(r["aiote"]["gbps"], r["raw_dc1"]["gbps"])
            r["disturbed"] = C.disturbed(r["aiote"]["gbps"], r["raw_dc1"]["gbps"])
    for rows in out.get("paged", {}).values():
        for r in rows:
            r["best_ratio"] = C.best_ratio(r["paged"]["pages_per_s"], r["raw_dc1"]["pages_per_s"])
            r["disturbed"] = C.disturbed(r["paged"]["pages_per_s"], r["raw_dc1"]["pages_per_s"])
    out["merged_from"] = [
        {
            "file": p,
            "date": d["machine"].get("date"),
            "load": [d["machine"].get("loadavg_start"), d["machine"].get("loadavg_end")],
            "command": d.get("command"),
        }
        for p, d in zip(paths, ds)
    ]
    return out


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--merge":
        Path(sys.argv[2]).write_text(json.dumps(merge(sys.argv[3:]), indent=2, default=str))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--compare":
        args = sys.argv[2:]
        labels: list[str] = []
        if "--labels" in args:
            i = args.index("--labels")
            labels = args[i + 1].split(",")
            args = args[:i] + args[i + 2 :]
        compare(args, labels or [Path(a).stem for a in args])
        return 0
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
        nics(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
