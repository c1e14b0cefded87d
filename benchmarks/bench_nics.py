#!/usr/bin/env python
"""Multi-NIC aggregate throughput (issue 5): k = 1, 2, 4 "NICs" per engine.

On one host a "NIC" is one libfabric domain + endpoint of the provider
(``TransferEngine(provider, nics=k)`` opens k of them; so does the target
engine in the other process, with the same k).  Single large writes
(default 1, 16, 64 MiB, 32 in flight, an imm each, delivery-complete) from
offset 0 to offset 0, as in bench_write; writes >= stripe_threshold
(256 KiB) are striped over the NICs by aiote, which ``nic_stats()`` shows
(bytes per NIC, printed below the table).

Beside aiote, in the same run, interleaved per size and run:

* raw C, one thread: ``fi_kbench PROV K SIZE ITERS 32 1 0``: k domains per
  process, every write striped into k shards (shard i on domain i), one
  thread per process driving all k domains -- the same structure as aiote's
  one worker per engine;
* raw C, k threads: ``fi_kbench ... 1 1``: the same with one thread per
  domain on each side -- what one worker per NIC could reach.

Reported: GB/s (median, min-max of the runs), the scaling factor against
k = 1 of the same implementation (median of per-run ratios), the issue's
target "2 NICs >= 1.8x one NIC", and the CPU busy share of the threads that
do the work (aiote: the engines' worker threads, from /proc; raw: whole
processes, from getrusage), which says whether a core, not the "NIC", is
the limit.

    .venv/bin/python benchmarks/bench_nics.py                     # shm + tcp, ~3-5 min
    .venv/bin/python benchmarks/bench_nics.py --providers shm --sizes 16M --runs 5
    .venv/bin/python benchmarks/bench_nics.py --replot benchmarks/results/nics-XXXX.json --plot-name X.png

Writes benchmarks/results/nics-<stamp>.json (+ nics-latest.json) and
docs/img/nics_scaling.png.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import bench_write as W  # noqa: E402

DEFAULT_SIZES = "1M,16M,64M"
IMPLS = ("raw1", "rawk", "aiote")
LABELS = {
    "raw1": "raw C, 1 thread/process",
    "rawk": "raw C, k threads/process",
    "aiote": "aiote (1 worker/engine)",
}


def iters_for(provider: str, size: int, quick: bool, inflight: int) -> int:
    """Writes per measurement, the same for raw and aiote: bench_write's byte budget
    (2 GiB shm, 1 GiB tcp; half with --quick), at least two windows."""
    budget = (2 << 30) if provider == "shm" else (1 << 30)
    if quick:
        budget //= 2
    return max(2 * inflight, budget // size)


def _busy(cpu: dict[str, Any]) -> tuple[float, float]:
    """(busy, sys) share of the busiest thread of a cpu_delta()."""
    th = cpu["threads"]
    return (th[0]["busy"], th[0]["sys"]) if th else (0.0, 0.0)


async def run_provider(con: Any, args: argparse.Namespace, provider: str, target: C.Target) -> list[dict[str, Any]]:
    from rich.progress import Progress

    sizes = [C.parse_size(s) for s in args.sizes.split(",")]
    ks = [int(k) for k in args.nics.split(",")]
    nproc = args.nproc
    rows = []
    imm = 1000
    with Progress(transient=True, console=con) as prog:
        task = prog.add_task(f"{provider} k={ks}", total=len(sizes) * args.runs * len(ks))
        for size in sizes:
            iters = iters_for(provider, size, args.quick, args.inflight)
            samples: dict[int, dict[str, list[Any]]] = {k: {i: [] for i in IMPLS} for k in ks}
            loads = []
            for run in range(args.runs):
                loads.append(C.loadavg()[0] if C.loadavg() else None)
                # interleaved: for each k, raw 1 thread, raw k threads, aiote; k order alternates per run
                for k in ks if run % 2 == 0 else list(reversed(ks)):
                    s = samples[k]
                    if not args.skip_raw:
                        s["raw1"].append(C.fi_kbench(provider, k, size, iters, args.inflight, 1, 0))
                        if k > 1 and args.raw_threads:
                            s["rawk"].append(C.fi_kbench(provider, k, size, iters, args.inflight, 1, 1))
                    imm += 1
                    s["aiote"].append(
                        await W.aiote_bw(
                            target,
                            provider,
                            args.polling,
                            size,
                            iters,
                            args.inflight,
                            imm,
                            args.driver,
                            engine_kw={**C.ENGINE_KW, "nics": k},
                            cpu=True,
                        )
                    )
                    prog.advance(task)
            # k = 1: one thread per domain is the same program as one thread per process
            if 1 in samples:
                samples[1]["rawk"] = samples[1]["raw1"]
            base = samples[ks[0]] if ks[0] == 1 else None
            for k in ks:
                s = samples[k]
                row: dict[str, Any] = {"size": size, "k": k, "iters": iters, "load1": loads, "nproc": nproc}
                for impl in IMPLS:
                    g = [x["gbps"] for x in s[impl]]
                    row[impl] = {"gbps": C.summary(g)}
                    if base is not None and s[impl]:
                        row[impl]["scale"] = C.paired_ratios(
                            g, [x["gbps"] for x in base["raw1" if impl == "rawk" else impl]]
                        )
                    else:
                        row[impl]["scale"] = C.summary([])
                row["aiote_vs_raw1"] = C.paired_ratios([x["gbps"] for x in s["aiote"]], [x["gbps"] for x in s["raw1"]])
                row["disturbed"] = C.disturbed(*(row[i]["gbps"] for i in IMPLS if s[i]))
                # proof of striping and where the CPU went: from the last aiote run
                last = s["aiote"][-1]
                row["aiote_nic_bytes"] = [n["bytes_written"] for n in last["initiator_nics"]]
                row["aiote_nic_writes"] = [n["writes_posted"] for n in last["initiator_nics"]]
                row["target_nic_imms"] = [n["imms_received"] for n in last["target_nics"]]
                row["aiote_nic_stats_last"] = {"initiator": last["initiator_nics"], "target": last["target_nics"]}
                row["aiote_cpu"] = [x["cpu"] for x in s["aiote"]]
                iw = [_busy(x["cpu"]["initiator_worker"]) for x in s["aiote"]]
                tw = [_busy(x["cpu"]["target_worker"]) for x in s["aiote"]]
                lp = [_busy(x["cpu"]["initiator_loop"]) for x in s["aiote"]]
                row["aiote_worker_busy"] = {
                    "initiator": C.summary([b for b, _ in iw]),
                    "initiator_sys": C.summary([y for _, y in iw]),
                    "target": C.summary([b for b, _ in tw]),
                    "target_sys": C.summary([y for _, y in tw]),
                    "loop": C.summary([b for b, _ in lp]),
                }
                for impl in ("raw1", "rawk"):
                    if s[impl]:
                        row[f"{impl}_cpu"] = {
                            key: C.summary([x[key] for x in s[impl]])
                            for key in ("initiator_cpu", "initiator_sys", "target_cpu", "target_sys")
                        }
                row["aiote_stats"] = [
                    {"initiator": x["initiator_stats"], "target": x["target_stats"]} for x in s["aiote"]
                ]
                row["samples"] = {i: s[i] for i in ("raw1", "rawk") if s[i]}
                rows.append(row)
    return rows


def _scale(r: dict[str, Any], impl: str) -> str:
    sc = r[impl]["scale"]
    if sc["median"] is None:
        return "-"
    txt = C.fmt_med(sc)
    if r["k"] == 2:
        txt += " [green]✓[/]" if sc["median"] >= 1.8 else " [red]✗[/]"
    return txt


def table(con: Any, provider: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.table import Table

    t = Table(
        title=f"{provider}: aggregate write throughput with k NICs (k domains per process, loopback), "
        f"{args.inflight} in flight, GB/s median ({'min–max' if args.runs > 1 else 'one run'}) of {args.runs} "
        f"interleaved runs; ×k=1: median of per-run ratios to k=1 (✓/✗: 2 NICs ≥ 1.8×)",
        title_justify="left",
    )
    for col in (
        "size",
        "k",
        "raw 1 thread",
        "×k=1",
        "raw k threads",
        "×k=1 (vs raw 1 thr k=1)",
        "aiote",
        "×k=1",
        "aiote/raw 1thr",
        "aiote worker busy init / target (sys)",
        "raw 1thr CPU init / target (sys)",
        "aiote bytes per NIC (MiB)",
    ):
        t.add_column(col, justify="right")
    for r in rows:
        wb = r["aiote_worker_busy"]
        rc = r.get("raw1_cpu")
        t.add_row(
            C.fmt_size(r["size"]),
            str(r["k"]),
            C.fmt_med(r["raw1"]["gbps"]),
            _scale(r, "raw1"),
            C.fmt_med(r["rawk"]["gbps"]) if r["k"] > 1 else "(= raw 1 thread)",
            _scale(r, "rawk") if r["k"] > 1 else "",
            C.fmt_med(r["aiote"]["gbps"]),
            _scale(r, "aiote"),
            C.fmt_med(r["aiote_vs_raw1"]) + (" [yellow]⚠[/]" if r["disturbed"] else ""),
            f"{wb['initiator']['median']:.0%} ({wb['initiator_sys']['median']:.0%}) / "
            f"{wb['target']['median']:.0%} ({wb['target_sys']['median']:.0%})",
            f"{rc['initiator_cpu']['median']:.2f} ({rc['initiator_sys']['median']:.2f}) / "
            f"{rc['target_cpu']['median']:.2f} ({rc['target_sys']['median']:.2f})"
            if rc
            else "-",
            " / ".join(f"{b / 2**20:.0f}" for b in r["aiote_nic_bytes"]),
        )
    con.print(t)
    con.print(
        "busy: share of the timed window a thread ran (user+sys; 100% = one core), sys part in brackets; "
        "raw CPU in cores (whole process: busy-polling C is always ≥ 1 per thread). "
        "⚠: a run ≥ 2× slower than another (machine disturbed). bytes per NIC include the warm-up window."
    )


def print_nic_stats(con: Any, provider: str, rows: list[dict[str, Any]]) -> None:
    """Proof of striping: eng.nic_stats() of the initiator and imms per NIC at the target (last run)."""
    kmax = max(r["k"] for r in rows)
    shown = False
    for r in rows:
        if r["k"] == 1:
            continue
        con.print(
            f"{provider} {C.fmt_size(r['size'])} k={r['k']}: initiator bytes_written per NIC "
            f"{r['aiote_nic_bytes']}, writes_posted {r['aiote_nic_writes']}; "
            f"target imms_received per NIC {r['target_nic_imms']}"
        )
        if r["k"] == kmax and not shown:
            shown = True
            con.print(f"    initiator eng.nic_stats() = {r['aiote_nic_stats_last']['initiator']}")


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        if r["k"] != 2:
            continue
        parts = []
        for impl in IMPLS:
            m = r[impl]["scale"]["median"]
            if m is not None:
                parts.append(f"{LABELS[impl]} {m:.2f}× {'met' if m >= 1.8 else 'missed'}")
        out.append(f"{C.fmt_size(r['size'])}: 2 NICs / 1 NIC: " + "; ".join(parts))
    return out


def plot(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    provs = list(results)
    fig, axes = plt.subplots(
        2, len(provs), figsize=(6.5 * len(provs), 8), squeeze=False, gridspec_kw={"height_ratios": [3, 2]}
    )
    styles = {"raw1": ("--", "o"), "rawk": (":", "^"), "aiote": ("-", "s")}
    for j, prov in enumerate(provs):
        rows = results[prov]
        sizes = sorted({r["size"] for r in rows})
        ax, axs = axes[0][j], axes[1][j]
        for ci, size in enumerate(sizes):
            rs = sorted((r for r in rows if r["size"] == size), key=lambda r: r["k"])
            ks = [r["k"] for r in rs]
            for impl in IMPLS:
                pts = [(r["k"], r[impl]) for r in rs if r[impl]["gbps"]["median"] is not None]
                if not pts:
                    continue
                x = [k for k, _ in pts]
                ls, mk = styles[impl]
                color = f"C{ci}"
                ax.errorbar(
                    x,
                    [v["gbps"]["median"] for _, v in pts],
                    yerr=[
                        [v["gbps"]["median"] - v["gbps"]["min"] for _, v in pts],
                        [v["gbps"]["max"] - v["gbps"]["median"] for _, v in pts],
                    ],
                    ls=ls,
                    marker=mk,
                    color=color,
                    ms=5,
                    capsize=3,
                    label=f"{C.fmt_size(size)} {LABELS[impl]}",
                )
                sp = [(k, v["scale"]["median"]) for k, v in pts if v["scale"]["median"] is not None]
                if sp:
                    axs.plot([k for k, _ in sp], [m for _, m in sp], ls=ls, marker=mk, color=color, ms=5)
            ax.set_xticks(ks)
        ax.set_ylabel("GB/s (aggregate)")
        ax.set_title(f"{prov}: k NICs (domains) per process, {args.inflight} in flight{title}", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6.5, ncol=1)
        kmax = max(r["k"] for r in rows)
        axs.plot([1, kmax], [1, kmax], color="grey", lw=1, ls="-", alpha=0.5, label="ideal (= k)")
        axs.plot([2], [1.8], marker="*", color="red", ms=12, ls="none", label="target: 2 NICs ≥ 1.8×")
        axs.axhline(1.0, color="black", lw=0.8)
        axs.set_xticks(sorted({r["k"] for r in rows}))
        axs.set_xlabel("k (NICs per engine / domains per process)")
        axs.set_ylabel("× k=1 (same size; raw k threads vs raw 1 thread)")
        top = max((r[i]["scale"]["median"] or 0) for r in rows for i in IMPLS)
        axs.set_ylim(0, max(kmax + 0.3, top * 1.08))
        axs.grid(True, alpha=0.3)
        axs.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def amain(args: argparse.Namespace) -> int:
    con = C.console()
    C.ensure_fi_bench()
    info = C.machine_info()
    args.nproc = info["nproc"]
    C.header(con, "aiote bench_nics", info)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    out: dict[str, Any] = {
        "machine": info,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "config": dict(vars(args)),
        "nics": {},
        "raw_commands": {},
        "verdict": {},
    }
    t_start = time.time()
    async with C.Target() as target:
        for prov in providers:
            rows = await run_provider(con, args, prov, target)
            out["nics"][prov] = rows
            table(con, prov, rows, args)
            print_nic_stats(con, prov, rows)
            out["verdict"][prov] = verdict(rows)
            for line in out["verdict"][prov]:
                con.print(f"[bold]{prov} {line}[/]")
            r = rows[0]
            out["raw_commands"][prov] = (
                f"benchmarks/raw/fi_kbench '{C.PROVIDERS[prov]}' K {r['size']} {r['iters']} {args.inflight} 1 THREADS"
                "   (per size, K and THREADS 0/1)"
            )
    out["seconds"] = round(time.time() - t_start, 1)
    if not args.no_plot:
        img = C.IMG_DIR / args.plot_name
        plot(out["nics"], args, img, args.title)
        out["plot"] = C.rel(img)
        con.print(f"plot: {out['plot']}")
    path = C.write_results(args.name, out)
    con.print(f"results: {C.rel(path)}  ({out['seconds']} s)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--providers", default="shm,tcp", help="comma list of shm, tcp (default: shm,tcp)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma list (default {DEFAULT_SIZES})")
    p.add_argument("--nics", default="1,2,4", help="comma list of k, starting with 1 (default 1,2,4)")
    p.add_argument("--runs", type=int, default=3, help="interleaved runs per point (default 3)")
    p.add_argument("--inflight", type=int, default=32, help="writes in flight (default 32)")
    p.add_argument("--polling", default="adaptive", choices=["busy", "adaptive", "blocking"])
    p.add_argument("--driver", default="tasks", choices=["tasks", "callbacks"])
    p.add_argument("--no-raw-threads", dest="raw_threads", action="store_false", help="skip raw with k threads")
    p.add_argument("--skip-raw", action="store_true", help="aiote only")
    p.add_argument("--quick", action="store_true", help="half the iterations")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--plot-name", default="nics_scaling.png")
    p.add_argument("--name", default="nics", help="results file prefix (default nics)")
    p.add_argument("--replot", metavar="JSON", help="only redraw the plot from a results file, then exit")
    p.add_argument("--title", default="", help="suffix for the plot titles")
    args = p.parse_args()
    if args.replot:
        import json

        d = json.loads(Path(args.replot).read_text())
        cfg = argparse.Namespace(**{**vars(args), "inflight": d["config"]["inflight"]})
        img = C.IMG_DIR / args.plot_name
        plot(d["nics"], cfg, img, args.title)
        print(f"plot: {C.rel(img)} (from {args.replot})")
        return 0
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
