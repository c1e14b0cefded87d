#!/usr/bin/env python
"""aiote write_paged vs raw libfabric vs Python-level single writes (issue 3).

Pages of PAGE bytes at random page indices (random permutations of the
pages of a 64 MiB region on both sides), every page carrying an imm, as
``fi_bench paged`` does.  Three ways, interleaved per run:

* raw C: ``fi_bench PROVIDER paged PAGE PAGES 32 1`` (and DC=0 for reference);
* aiote ``write_paged``: one call posts BATCH pages (default 10,000, numpy
  int64 page lists built beforehand), CALLS calls in flight (default 4);
* aiote single ``write`` per page from a Python loop, BATCH of them gathered
  at a time (what one would write without write_paged).

    .venv/bin/python benchmarks/bench_paged.py                 # shm + tcp
    .venv/bin/python benchmarks/bench_paged.py --providers shm --runs 5

Writes benchmarks/results/paged-<stamp>.json (+ paged-latest.json) and
docs/img/paged_rate.png.
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

REGION = 64 << 20  # like fi_bench paged (min(64 MiB, PAGES*PAGE))
DEFAULT_PAGES = "1K,8K,64K"


def page_counts(provider: str, page: int, quick: bool) -> tuple[int, int, int]:
    """(raw pages, write_paged pages, single-write pages) per run: ~0.2-1 s each."""
    if provider == "shm":
        n = {1 << 10: 300_000, 8 << 10: 150_000, 64 << 10: 30_000}.get(page, max(20_000, (2 << 30) // page))
    else:
        n = {1 << 10: 150_000, 8 << 10: 60_000, 64 << 10: 15_000}.get(page, max(10_000, (1 << 30) // page))
    single = min(n, 30_000 if provider == "shm" else 15_000)
    if quick:
        n //= 4
        single //= 4
    return n, n, single


def perms(page: int, total: int, batch: int, seed: int) -> list[tuple[Any, Any]]:
    """Batches of (src_pages, dst_pages): fresh random permutations of the region's pages, cycled."""
    import numpy as np

    rng = np.random.default_rng(seed)
    npages = REGION // page
    src = np.concatenate([rng.permutation(npages) for _ in range(-(-total // npages))])[:total]
    dst = np.concatenate([rng.permutation(npages) for _ in range(-(-total // npages))])[:total]
    return [(src[i : i + batch].astype(np.int64), dst[i : i + batch].astype(np.int64)) for i in range(0, total, batch)]


async def aiote_paged(
    target: C.Target,
    provider: str,
    polling: str,
    page: int,
    total: int,
    batch: int,
    calls: int,
    imm: int,
    mode: str,
) -> dict[str, Any]:
    import aiote

    batches = perms(page, total, batch, seed=imm)
    if mode == "single":  # Python ints, as a Python loop would have them
        batches = [(s.tolist(), d.tolist()) for s, d in batches]
    desc = await target.call("open", provider, polling, True, REGION, C.ENGINE_KW)
    try:
        async with aiote.TransferEngine(
            provider, host=C.loopback_host(provider), polling=polling, delivery_complete=True, **C.ENGINE_KW
        ) as eng:
            mr = eng.register(bytearray(b"\xa5") * REGION)
            d = aiote.MrDescriptor.from_bytes(desc)
            # warm-up: connection set-up, like fi_bench's first window
            await asyncio.gather(*(eng.write(mr, d, page, 0, 0, imm=imm) for _ in range(32)))
            t0 = time.perf_counter()
            if mode == "paged":
                it = iter(batches)

                async def worker() -> None:
                    for sp, dp in it:
                        await eng.write_paged(mr, d, page, sp, dp, imm=imm)

                await asyncio.gather(*(worker() for _ in range(calls)))
            else:
                for sp, dp in batches:
                    await asyncio.gather(
                        *[eng.write(mr, d, page, s * page, t * page, imm=imm) for s, t in zip(sp, dp, strict=True)]
                    )
            dt = time.perf_counter() - t0
            await target.call("wait", imm, 32 + total, 60)
            mr.close()
    finally:
        await target.call("close")
    return {"pages_per_s": total / dt, "gbps": total * page / dt / 1e9, "pages": total, "seconds": dt}


async def run_provider(con: Any, args: argparse.Namespace, provider: str, target: C.Target) -> list[dict[str, Any]]:
    from rich.progress import Progress

    pages = [C.parse_size(s) for s in args.pages.split(",")]
    rows = []
    imm = 1000
    kinds = ["raw_dc1", "paged", "raw_dc0", "single"]
    with Progress(transient=True, console=con) as prog:
        task = prog.add_task(f"{provider} paged", total=len(pages) * args.runs)
        for page in pages:
            n_raw, n_paged, n_single = page_counts(provider, page, args.quick)
            s: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
            load = []
            for _ in range(args.runs):
                load.append(C.loadavg()[0] if C.loadavg() else None)
                for k in kinds:
                    if k.startswith("raw"):
                        r = C.fi_bench(provider, "paged", page, n_raw, args.raw_inflight, int(k[-1]))
                        s[k].append({"pages_per_s": r["ops_per_s"], "gbps": r["gbps"]})
                    else:
                        imm += 1
                        s[k].append(
                            await aiote_paged(
                                target,
                                provider,
                                args.polling,
                                page,
                                n_paged if k == "paged" else n_single,
                                args.batch,
                                args.calls,
                                imm,
                                k,
                            )
                        )
                prog.advance(task)
            row: dict[str, Any] = {
                "page": page,
                "raw_pages": n_raw,
                "paged_pages": n_paged,
                "single_pages": n_single,
                "load1": load,
            }
            for k in kinds:
                row[k] = {m: C.summary([x[m] for x in s[k]]) for m in ("pages_per_s", "gbps")}
            for k in ("paged", "single"):
                row[f"{k}_ratio"] = C.paired_ratios(
                    row[k]["pages_per_s"]["values"], row["raw_dc1"]["pages_per_s"]["values"]
                )
                row[f"{k}_ratio_vs_dc0"] = C.paired_ratios(
                    row[k]["pages_per_s"]["values"], row["raw_dc0"]["pages_per_s"]["values"]
                )
            row["paged_over_single"] = C.paired_ratios(
                row["paged"]["pages_per_s"]["values"], row["single"]["pages_per_s"]["values"]
            )
            row["best_ratio"] = C.best_ratio(row["paged"]["pages_per_s"], row["raw_dc1"]["pages_per_s"])
            row["disturbed"] = C.disturbed(row["paged"]["pages_per_s"], row["raw_dc1"]["pages_per_s"])
            rows.append(row)
    return rows


def table(con: Any, provider: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.table import Table

    t = Table(
        title=f"{provider}: paged writes (random pages in 64 MiB, imm on every page), median (min–max) of "
        f"{args.runs} interleaved runs; write_paged: {args.batch} pages/call, {args.calls} calls in "
        f"flight; raw: {args.raw_inflight} in flight; aiote polling={args.polling}",
        title_justify="left",
    )
    for col in (
        "page",
        "raw DC=1 pages/s",
        "write_paged pages/s",
        "paged/raw",
        "best/best",
        "target",
        "single write pages/s",
        "single/raw",
        "paged/single",
        "raw DC=1 GB/s",
        "paged GB/s",
        "raw DC=0 pages/s",
        "paged/raw DC=0",
    ):
        t.add_column(col, justify="right")
    for r in rows:
        ratio = r["paged_ratio"]["median"]
        tgt = ""
        if r["page"] == 1 << 10:
            tgt = "[green]≥0.9 met[/]" if ratio >= 0.9 else "[red]≥0.9 MISSED[/]"
        t.add_row(
            C.fmt_size(r["page"]),
            C.fmt_k(r["raw_dc1"]["pages_per_s"]),
            C.fmt_k(r["paged"]["pages_per_s"]),
            C.fmt_med(r["paged_ratio"]) + (" [yellow]⚠[/]" if r["disturbed"] else ""),
            f"{r['best_ratio']:.2f}" if r["best_ratio"] else "-",
            tgt,
            C.fmt_k(r["single"]["pages_per_s"]),
            C.fmt_med(r["single_ratio"]),
            C.fmt_med(r["paged_over_single"], 1, 1),
            C.fmt_med(r["raw_dc1"]["gbps"]),
            C.fmt_med(r["paged"]["gbps"]),
            C.fmt_k(r["raw_dc0"]["pages_per_s"]),
            C.fmt_med(r["paged_ratio_vs_dc0"]),
        )
    con.print(t)
    con.print(
        "paged/raw: median of per-run ratios (min–max); "
        "best/best: fastest write_paged run / fastest raw run; "
        "⚠: some run was ≥2× slower than another (machine disturbed)"
    )


def plot(results: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    provs = list(results)
    fig, axes = plt.subplots(1, len(provs), figsize=(6.5 * len(provs), 4.5), squeeze=False)
    series = (
        ("raw_dc1", "raw C fi_bench paged, DC=1"),
        ("raw_dc0", "raw C, DC=0"),
        ("paged", "aiote write_paged"),
        ("single", "aiote write() per page, gathered"),
    )
    for j, prov in enumerate(provs):
        ax = axes[0][j]
        rows = results[prov]
        x = np.arange(len(rows))
        w = 0.2
        for i, (k, label) in enumerate(series):
            med = np.array([r[k]["pages_per_s"]["median"] for r in rows])
            lo = med - np.array([r[k]["pages_per_s"]["min"] for r in rows])
            hi = np.array([r[k]["pages_per_s"]["max"] for r in rows]) - med
            ax.bar(x + (i - 1.5) * w, med, w, yerr=[lo, hi], capsize=3, label=label)
        ax.set_yscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([C.fmt_size(r["page"]) for r in rows])
        ax.set_xlabel("page size")
        ax.set_ylabel("pages/s (median, min–max)")
        ax.set_title(f"{prov}: paged writes, random pages, imm per page{title}")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def amain(args: argparse.Namespace) -> int:
    con = C.console()
    C.ensure_fi_bench()
    info = C.machine_info()
    C.header(con, "aiote bench_paged", info)
    out: dict[str, Any] = {
        "machine": info,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "config": dict(vars(args)),
        "paged": {},
        "raw_commands": {},
    }
    t0 = time.time()
    async with C.Target() as target:
        for prov in [p.strip() for p in args.providers.split(",") if p.strip()]:
            out["paged"][prov] = await run_provider(con, args, prov, target)
            table(con, prov, out["paged"][prov], args)
            out["raw_commands"][prov] = [
                C.raw_command(prov, "paged", r["page"], r["raw_pages"], args.raw_inflight, 1)
                for r in out["paged"][prov]
            ]
    out["seconds"] = round(time.time() - t0, 1)
    if not args.no_plot:
        img = C.IMG_DIR / args.plot_name
        plot(out["paged"], img)
        out["plot"] = str(img.relative_to(C.ROOT))
        con.print(f"plot: {out['plot']}")
    path = C.write_results(args.name, out)
    con.print(f"results: {C.rel(path)}  ({out['seconds']} s)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--providers", default="shm,tcp")
    p.add_argument("--pages", default=DEFAULT_PAGES, help=f"page sizes (default {DEFAULT_PAGES})")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=10_000, help="pages per write_paged call (default 10000)")
    p.add_argument("--calls", type=int, default=4, help="write_paged calls in flight (default 4)")
    p.add_argument("--raw-inflight", type=int, default=32, help="fi_bench writes in flight (default 32)")
    p.add_argument("--polling", default="adaptive", choices=["busy", "adaptive", "blocking"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--plot-name", default="paged_rate.png")
    p.add_argument("--name", default="paged")
    p.add_argument("--replot", metavar="JSON", help="only redraw the plot from a results file, then exit")
    p.add_argument("--title", default="", help="suffix for the plot titles (with --replot)")
    p.add_argument("--spin-us", type=int, help="TransferEngine spin_us of both engines (default: aiote's)")
    args = p.parse_args()
    if args.spin_us is not None:
        C.ENGINE_KW["spin_us"] = args.spin_us
    if args.replot:
        import json

        d = json.loads(Path(args.replot).read_text())
        img = C.IMG_DIR / args.plot_name
        plot(d["paged"], img, args.title)
        print(f"plot: {img.relative_to(C.ROOT)} (from {args.replot})")
        return 0
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
