#!/usr/bin/env python
"""aiote vs raw libfabric: single-write throughput and imm notification latency.

Throughput (issue 2): writes of SIZE bytes with an imm, INFLIGHT in flight,
64 B ... 64 MiB, one target process.  For every size and run the raw C
baseline (benchmarks/raw/fi_bench bw, DC=1 and DC=0) and aiote (engine with
delivery_complete on) run back to back, interleaved, so that both see the
same slow or fast period of the machine.  Reported: median of the runs with
min–max, and the median of the per-run ratios aiote / raw(DC=1).

Latency (issue 2): ping-pong; A writes SIZE bytes with imm PING, B's
coroutine awaiting ``imms.wait(PING)`` resumes and writes back with PONG,
A's coroutine awaiting ``imms.wait(PONG)`` resumes.  One-way = RTT/2, p50 and
p99 per run, beside ``fi_bench lat`` (busy-polling C, same provider/size).

    .venv/bin/python benchmarks/bench_write.py                 # shm + tcp, bw + lat
    .venv/bin/python benchmarks/bench_write.py --providers shm --skip-lat
    .venv/bin/python benchmarks/bench_write.py --quick         # fewer sizes/iterations

Writes benchmarks/results/write-<stamp>.json (+ write-latest.json) and
docs/img/write_throughput.png.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

DEFAULT_SIZES = "64,256,1K,4K,16K,64K,256K,1M,4M,16M,64M"
PING, PONG = 101, 202
LAT_WARMUP = 100  # same as fi_bench
# latency configurations, in the order each run measures them
LAT_CONFIGS = ("raw_dc1", "aiote_busy", "raw_dc0", "aiote_adaptive", "aiote_spin", "asyncio_floor")


# ---------------------------------------------------------------- throughput


def bw_iters(provider: str, size: int, quick: bool) -> tuple[int, int]:
    """(raw iters, aiote iters): ~0.1-0.5 s each when undisturbed; at least 2-3 windows of 32."""
    if provider == "shm":
        budget, raw_max, aio_max, least = 2 << 30, 200_000, 25_000, 96
    else:
        budget, raw_max, aio_max, least = 1 << 30, 40_000, 12_000, 64
    if quick:
        budget //= 4
        raw_max //= 4
        aio_max //= 4
    n = budget // size
    return max(least, min(n, raw_max)), max(least, min(n, aio_max))


async def aiote_bw(
    target: C.Target,
    provider: str,
    polling: str,
    size: int,
    iters: int,
    inflight: int,
    imm: int,
    driver: str,
    target_polling: str | None = None,
    engine_kw: dict[str, Any] | None = None,
    cpu: bool = False,
) -> dict[str, Any]:
    """One aiote throughput measurement.  ``engine_kw``: TransferEngine keywords of both
    engines (default C.ENGINE_KW; bench_nics passes nics=k).  ``cpu``: also return the
    busy share of the engines' worker threads (both processes) over the timed part."""
    import aiote

    kw = C.ENGINE_KW if engine_kw is None else engine_kw
    desc = await target.call("open", provider, target_polling or polling, True, size, kw)
    try:
        tids = set(C.thread_cpu())
        async with aiote.TransferEngine(
            provider, host=C.loopback_host(provider), polling=polling, delivery_complete=True, **kw
        ) as eng:
            my_tids = set(C.thread_cpu()) - tids  # the worker thread(s) this engine started
            buf = bytearray(b"\xa5") * size
            mr = eng.register(buf)
            d = aiote.MrDescriptor.from_bytes(desc)
            warm = min(inflight, iters)  # connection set-up + faults, like fi_bench
            await asyncio.gather(*(eng.write(mr, d, size, 0, 0, imm=imm) for _ in range(warm)))

            if cpu:
                t_cpu0 = await target.call("cpu")
                my_cpu0 = C.thread_cpu()
            t0 = time.perf_counter()
            if driver == "tasks":
                # what a user writes: INFLIGHT coroutines, each awaiting its writes in turn
                left = iters

                async def worker() -> None:
                    nonlocal left
                    while left > 0:
                        left -= 1
                        await eng.write(mr, d, size, 0, 0, imm=imm)

                await asyncio.gather(*(worker() for _ in range(inflight)))
            else:
                # least Python: a completion callback posts the next write
                loop = asyncio.get_running_loop()
                fin: asyncio.Future[None] = loop.create_future()
                n_posted = n_done = 0

                def post() -> None:
                    nonlocal n_posted
                    n_posted += 1
                    eng.write(mr, d, size, 0, 0, imm=imm).add_done_callback(done)

                def done(f: asyncio.Future[None]) -> None:
                    nonlocal n_done
                    n_done += 1
                    if f.exception() is not None and not fin.done():
                        fin.set_exception(f.exception())
                    elif n_posted < iters:
                        post()
                    elif n_done == iters and not fin.done():
                        fin.set_result(None)

                for _ in range(min(inflight, iters)):
                    post()
                await fin
            dt = time.perf_counter() - t0
            if cpu:
                my_cpu1 = C.thread_cpu()
                t_cpu1, t_tids = await target.call("cpu")
            # every write landed, once: the target counted warm + iters imms
            await target.call("wait", imm, warm + iters, 60)
            ok = await target.call("check", 0, size, 0xA5)
            if not ok:
                raise RuntimeError(f"target region does not hold the written bytes ({size} B)")
            stats = eng.stats()
            tstats = await target.call("stats")
            nics = eng.nic_stats()
            tnics = await target.call("nic_stats")
            mr.close()
    finally:
        await target.call("close")
    keep = ("writes_posted", "eagain", "wakeups")
    res = {
        "gbps": size * iters / dt / 1e9,
        "ops_per_s": iters / dt,
        "iters": iters,
        "seconds": dt,
        "initiator_stats": {k: stats.get(k) for k in keep},
        "target_stats": {k: tstats.get(k) for k in ("imms_received", "wakeups")},
        "initiator_nics": nics,
        "target_nics": tnics,
    }
    if cpu:
        res["cpu"] = {
            "initiator_worker": C.cpu_delta(my_cpu0, my_cpu1, dt, only=my_tids),
            "initiator_loop": C.cpu_delta(my_cpu0, my_cpu1, dt, only={os.getpid()}),
            "target_worker": C.cpu_delta(t_cpu0[0], t_cpu1, dt, only=t_tids),
        }
    return res


async def run_bw(con: Any, args: argparse.Namespace, provider: str, target: C.Target) -> list[dict[str, Any]]:
    from rich.progress import Progress

    sizes = [C.parse_size(s) for s in args.sizes.split(",")]
    rows = []
    imm = 1
    with Progress(transient=True, console=con) as prog:
        task = prog.add_task(f"{provider} throughput", total=len(sizes) * args.runs)
        for size in sizes:
            raw_it, aio_it = bw_iters(provider, size, args.quick)
            s: dict[str, list[Any]] = {"raw_dc1": [], "raw_dc0": [], "aiote": [], "load": []}
            for _ in range(args.runs):
                s["load"].append(C.loadavg()[0] if C.loadavg() else None)
                # interleaved: raw DC=1, aiote, raw DC=0
                s["raw_dc1"].append(C.fi_bench(provider, "bw", size, raw_it, args.inflight, 1))
                imm += 1
                s["aiote"].append(
                    await aiote_bw(target, provider, args.polling, size, aio_it, args.inflight, imm, args.driver,
                                   cpu=getattr(args, "cpu", False))
                )
                s["raw_dc0"].append(C.fi_bench(provider, "bw", size, raw_it, args.inflight, 0))
                prog.advance(task)
            row: dict[str, Any] = {
                "size": size,
                "raw_iters": raw_it,
                "aiote_iters": aio_it,
                "load1": s["load"],
            }
            for k in ("raw_dc1", "raw_dc0", "aiote"):
                row[k] = {
                    "gbps": C.summary([r["gbps"] for r in s[k]]),
                    "ops_per_s": C.summary([r["ops_per_s"] for r in s[k]]),
                }
            row["aiote_stats"] = [{"initiator": x["initiator_stats"], "target": x["target_stats"]} for x in s["aiote"]]
            if all("cpu" in x for x in s["aiote"]):
                # busy share of a core: the target's engine threads, the initiator's loop thread
                row["cpu"] = {
                    k: C.summary([sum(t["busy"] for t in x["cpu"][k]["threads"]) for x in s["aiote"]])
                    for k in ("target_worker", "initiator_loop", "initiator_worker")
                }
            row["ratio"] = C.paired_ratios(row["aiote"]["gbps"]["values"], row["raw_dc1"]["gbps"]["values"])
            row["ratio_vs_dc0"] = C.paired_ratios(row["aiote"]["gbps"]["values"], row["raw_dc0"]["gbps"]["values"])
            row["best_ratio"] = C.best_ratio(row["aiote"]["gbps"], row["raw_dc1"]["gbps"])
            row["disturbed"] = C.disturbed(row["aiote"]["gbps"], row["raw_dc1"]["gbps"])
            rows.append(row)
    return rows


def bw_table(con: Any, provider: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.table import Table

    t = Table(
        title=f"{provider}: single-write throughput, {args.inflight} in flight, "
        f"median ({'min–max' if args.runs > 1 else 'one run'}) of {args.runs} interleaved runs; "
        f"aiote polling={args.polling}, driver={args.driver}",
        title_justify="left",
    )
    for col in (
        "size",
        "raw DC=1 GB/s",
        "aiote GB/s",
        "aiote/raw",
        "best/best",
        "target",
        "raw DC=1 ops/s",
        "aiote ops/s",
        "raw DC=0 GB/s",
        "aiote/raw DC=0",
    ) + (("target worker CPU", "initiator loop CPU") if any("cpu" in r for r in rows) else ()):
        t.add_column(col, justify="right")
    for r in rows:
        ratio = r["ratio"]["median"]
        if r["size"] >= 1 << 20:
            tgt = "[green]≥0.95 met[/]" if ratio >= 0.95 else "[red]≥0.95 MISSED[/]"
        else:
            tgt = ""
        t.add_row(
            C.fmt_size(r["size"]),
            C.fmt_med(r["raw_dc1"]["gbps"]),
            C.fmt_med(r["aiote"]["gbps"]),
            C.fmt_med(r["ratio"]) + (" [yellow]⚠[/]" if r["disturbed"] else ""),
            f"{r['best_ratio']:.2f}" if r["best_ratio"] else "-",
            tgt,
            C.fmt_rate(r["raw_dc1"]["ops_per_s"]["median"]),
            C.fmt_rate(r["aiote"]["ops_per_s"]["median"]),
            C.fmt_med(r["raw_dc0"]["gbps"]),
            C.fmt_med(r["ratio_vs_dc0"]),
            *((C.fmt_med(r["cpu"]["target_worker"]), C.fmt_med(r["cpu"]["initiator_loop"])) if "cpu" in r else ()),
        )
    con.print(t)
    con.print(
        "aiote/raw: median of per-run ratios (min–max); best/best: fastest aiote run / fastest raw run; "
        "⚠: some run of this size was ≥2× slower than another (machine disturbed)"
    )


def plot_bw(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    provs = list(results)
    fig, axes = plt.subplots(
        2,
        len(provs),
        figsize=(6.5 * len(provs), 7.5),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1.3]},
        sharex=True,
    )
    for j, prov in enumerate(provs):
        rows = results[prov]
        x = [r["size"] for r in rows]
        ax, axr = axes[0][j], axes[1][j]
        for key, label, style in (
            ("raw_dc1", "raw C fi_bench, DC=1", "-o"),
            ("raw_dc0", "raw C fi_bench, DC=0", ":^"),
            ("aiote", f"aiote (delivery_complete, {args.polling})", "-s"),
        ):
            med = [r[key]["gbps"]["median"] for r in rows]
            lo = [r[key]["gbps"]["min"] for r in rows]
            hi = [r[key]["gbps"]["max"] for r in rows]
            (line,) = ax.plot(x, med, style, label=label, ms=4)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{prov}: write throughput, {args.inflight} in flight{getattr(args, 'title', '')}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        axr.plot(x, [r["ratio"]["median"] for r in rows], "-s", color="C2", ms=4, label="aiote / raw DC=1")
        axr.fill_between(
            x, [r["ratio"]["min"] for r in rows], [r["ratio"]["max"] for r in rows], color="C2", alpha=0.15
        )
        axr.axhline(0.95, color="red", ls="--", lw=1, label="target 0.95× (≥ 1 MiB)")
        axr.axvline(1 << 20, color="grey", ls=":", lw=1)
        axr.set_ylim(0, min(3.0, max(1.2, max(r["ratio"]["max"] or 0 for r in rows) * 1.05)))
        axr.set_ylabel("ratio")
        axr.set_xlabel("write size (bytes)")
        axr.grid(True, alpha=0.3)
        axr.legend(fontsize=8)
        axr.set_xticks(x)
        axr.set_xticklabels([C.fmt_size(s).replace(" ", "") for s in x], rotation=45, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- latency


async def aiote_lat(
    target: C.Target, provider: str, polling: str, size: int, iters: int, loop_spin_us: int = 0
) -> dict[str, Any]:
    import aiote

    region = max(size, 64)
    kw = dict(C.ENGINE_KW)
    if loop_spin_us:
        kw["loop_spin_us"] = loop_spin_us
    desc = await target.call("open", provider, polling, True, region, kw)
    try:
        async with aiote.TransferEngine(
            provider, host=C.loopback_host(provider), polling=polling, delivery_complete=True, **kw
        ) as eng:
            if loop_spin_us and not eng.loop_spinning:
                raise RuntimeError("loop_spin_us asked for, but this event loop can't spin")
            mr = eng.register(bytearray(b"\xa5") * region)
            d = aiote.MrDescriptor.from_bytes(desc)
            total = LAT_WARMUP + iters
            pong = target.call("pong", mr.descriptor.to_bytes(), size, total, PING, PONG)
            clock = time.perf_counter_ns
            us: list[float] = []
            writes = []
            for i in range(total):
                t0 = clock()
                writes.append(eng.write(mr, d, size, 0, 0, imm=PING))
                await eng.imms.wait(PONG, 1, timeout=30)
                t1 = clock()
                if i >= LAT_WARMUP:
                    us.append((t1 - t0) / 2000.0)
            await asyncio.gather(*writes)
            await pong
            keys = ("direct_writes", "direct_fallbacks", "msgs_sent", "wakeups", "imms_received")
            keys += ("loop_passes", "loop_found")
            mine, theirs = eng.stats(), await target.call("stats")
            stats = {k: [mine[k], theirs[k]] for k in keys}  # [this side, the target]
            mr.close()
    finally:
        await target.call("close")
    us.sort()
    return {
        "p50_us": C.percentile(us, 0.50),
        "p99_us": C.percentile(us, 0.99),
        "p999_us": C.percentile(us, 0.999),
        "max_us": us[-1],
        "iters": iters,
        "stats": stats,
    }


def _floor_child(rconn: Any, wconn: Any, total: int) -> None:
    """Echo one byte per byte received, from an asyncio reader callback + coroutine."""

    async def run() -> None:
        rd = _FdWaiter(rconn.fileno())
        wfd = wconn.fileno()
        for _ in range(total):
            await rd.next()
            os.write(wfd, b"p")
        rd.close()

    asyncio.run(run())


class _FdWaiter:
    """A reader kept registered with the loop (as aiote's eventfd is); next() awaits one byte."""

    def __init__(self, fd: int):
        self.fd = fd
        self.loop = asyncio.get_running_loop()
        self.fut: asyncio.Future[bytes] | None = None
        self.buf = 0
        self.loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        self.buf += len(os.read(self.fd, 64))
        if self.fut is not None and not self.fut.done() and self.buf:
            self.buf -= 1
            self.fut.set_result(b"")

    def next(self) -> asyncio.Future[bytes]:
        self.fut = self.loop.create_future()
        if self.buf:
            self.buf -= 1
            self.fut.set_result(b"")
        return self.fut

    def close(self) -> None:
        self.loop.remove_reader(self.fd)


async def asyncio_floor(iters: int) -> dict[str, Any]:
    """The same ping-pong with no aiote: two asyncio processes, a pipe each way.

    One-way = RTT/2 = one process's write -> the other's loop wakes from epoll,
    runs the reader callback, resumes the awaiting coroutine.  A floor for any
    design where the loop sleeps in epoll until a thread or peer writes an fd.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    a_r, b_w = ctx.Pipe(duplex=False)
    b_r, a_w = ctx.Pipe(duplex=False)
    total = LAT_WARMUP + iters
    p = ctx.Process(target=_floor_child, args=(b_r, b_w, total), daemon=True)
    p.start()
    loop = asyncio.get_running_loop()
    rd = _FdWaiter(a_r.fileno())
    wfd = a_w.fileno()
    clock = time.perf_counter_ns
    us: list[float] = []
    for i in range(total):
        t0 = clock()
        os.write(wfd, b"p")
        await asyncio.wait_for(rd.next(), 30)
        t1 = clock()
        if i >= LAT_WARMUP:
            us.append((t1 - t0) / 2000.0)
    rd.close()
    await loop.run_in_executor(None, p.join, 10)
    for c in (a_r, a_w, b_r, b_w):
        c.close()
    us.sort()
    return {
        "p50_us": C.percentile(us, 0.50),
        "p99_us": C.percentile(us, 0.99),
        "p999_us": C.percentile(us, 0.999),
        "max_us": us[-1],
        "iters": iters,
    }


async def run_lat(con: Any, args: argparse.Namespace, provider: str, target: C.Target) -> dict[str, Any]:
    from rich.progress import Progress

    size = C.parse_size(args.lat_size)
    configs = [k for k in LAT_CONFIGS if k in args.lat_configs.split(",")]
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
    with Progress(transient=True, console=con) as prog:
        task = prog.add_task(f"{provider} latency", total=args.runs * len(configs))
        for _ in range(args.runs):
            for k in configs:
                if k.startswith("raw"):
                    samples[k].append(C.fi_bench(provider, "lat", size, args.raw_lat_iters, 1, int(k[-1])))
                elif k == "asyncio_floor":
                    samples[k].append(await asyncio_floor(args.lat_iters))
                elif k == "aiote_spin":  # adaptive workers, spinning loops (loop_spin_us)
                    samples[k].append(
                        await aiote_lat(target, provider, "adaptive", size, args.lat_iters, args.loop_spin_us)
                    )
                else:
                    samples[k].append(await aiote_lat(target, provider, k.split("_")[1], size, args.lat_iters))
                prog.advance(task)
    out: dict[str, Any] = {
        "size": size,
        "raw_iters": args.raw_lat_iters,
        "aiote_iters": args.lat_iters,
        "loop_spin_us": args.loop_spin_us,
    }
    for k in configs:
        out[k] = {m: C.summary([s[m] for s in samples[k]]) for m in ("p50_us", "p99_us")}
        if not k.startswith("raw"):
            out[k]["p999_us"] = C.summary([s["p999_us"] for s in samples[k]])
            out[k]["max_us"] = C.summary([s["max_us"] for s in samples[k]])
    return out


def lat_table(con: Any, provider: str, lat: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.table import Table

    t = Table(
        title=f"{provider}: imm notification latency, one-way = RTT/2, {C.fmt_size(lat['size'])} writes, "
        f"median (min–max) of {args.runs} runs",
        title_justify="left",
    )
    for col in ("config", "p50 µs", "p99 µs", "p50 − raw DC=1 p50", "p50 − raw DC=0 p50", "target (shm)"):
        t.add_column(col, justify="right")
    nan = {"p50_us": {"median": float("nan")}}
    r1 = lat.get("raw_dc1", nan)["p50_us"]["median"]
    r0 = lat.get("raw_dc0", nan)["p50_us"]["median"]
    for k, label in (
        ("raw_dc0", "raw C, DC=0 (busy-polling C)"),
        ("raw_dc1", "raw C, DC=1 (busy-polling C)"),
        ("aiote_busy", "aiote polling=busy"),
        ("aiote_adaptive", "aiote polling=adaptive"),
        ("aiote_spin", f"aiote adaptive + loop_spin_us={lat.get('loop_spin_us', '?')}"),
        ("asyncio_floor", "no aiote: asyncio pipe ping-pong (floor)"),
    ):
        if k not in lat:
            continue
        p50, p99 = lat[k]["p50_us"], lat[k]["p99_us"]
        tgt = ""
        if k.startswith("aiote") and provider == "shm":
            ok50 = p50["median"] <= r1 + 5
            ok99 = p99["median"] <= 30
            tgt = (
                f"p50 ≤ raw+5: {'[green]met[/]' if ok50 else '[red]MISSED[/]'}; "
                f"p99 ≤ 30: {'[green]met[/]' if ok99 else '[red]MISSED[/]'}"
            )
        t.add_row(
            label,
            C.fmt_med(p50),
            C.fmt_med(p99),
            f"{p50['median'] - r1:+.2f}" if not k.startswith("raw") and r1 == r1 else "",  # (r1 != r1: NaN, not run)
            f"{p50['median'] - r0:+.2f}" if not k.startswith("raw") and r0 == r0 else "",
            tgt,
        )
    con.print(t)


# ---------------------------------------------------------------- main


async def amain(args: argparse.Namespace) -> int:
    con = C.console()
    C.ensure_fi_bench()
    info = C.machine_info()
    C.header(con, "aiote bench_write", info)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    out: dict[str, Any] = {
        "machine": info,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "config": {k: v for k, v in vars(args).items()},
        "bw": {},
        "lat": {},
        "raw_commands": {},
    }
    t_start = time.time()
    async with C.Target() as target:
        for prov in providers:
            if not args.skip_bw:
                out["bw"][prov] = await run_bw(con, args, prov, target)
                bw_table(con, prov, out["bw"][prov], args)
                r = out["bw"][prov][0]
                out["raw_commands"][f"{prov}_bw"] = (
                    C.raw_command(prov, "bw", r["size"], r["raw_iters"], args.inflight, 1) + "   (per size; DC 1 and 0)"
                )
            if not args.skip_lat:
                out["lat"][prov] = await run_lat(con, args, prov, target)
                lat_table(con, prov, out["lat"][prov], args)
                out["raw_commands"][f"{prov}_lat"] = (
                    C.raw_command(prov, "lat", out["lat"][prov]["size"], args.raw_lat_iters, 1, 1) + "   (DC 1 and 0)"
                )
    out["seconds"] = round(time.time() - t_start, 1)
    if out["bw"] and not args.no_plot:
        img = C.IMG_DIR / args.plot_name
        plot_bw(out["bw"], args, img)
        out["plot"] = str(img.relative_to(C.ROOT))
        con.print(f"plot: {out['plot']}")
    path = C.write_results(args.name, out)
    con.print(f"results: {C.rel(path)}  ({out['seconds']} s)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--providers", default="shm,tcp", help="comma list of shm, tcp (default: shm,tcp)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma list (default {DEFAULT_SIZES})")
    p.add_argument("--runs", type=int, default=3, help="interleaved runs per point (default 3)")
    p.add_argument("--inflight", type=int, default=32, help="writes in flight (default 32, fi_bench's default)")
    p.add_argument(
        "--polling",
        default="adaptive",
        choices=["busy", "adaptive", "blocking"],
        help="aiote polling mode of both engines for throughput (default adaptive)",
    )
    p.add_argument(
        "--driver",
        default="tasks",
        choices=["tasks", "callbacks"],
        help="tasks: INFLIGHT coroutines awaiting writes; callbacks: completion posts the next",
    )
    p.add_argument("--lat-size", default="64", help="latency write size (default 64)")
    p.add_argument("--lat-iters", type=int, default=5000, help="aiote ping-pongs per run (default 5000)")
    p.add_argument("--raw-lat-iters", type=int, default=20000, help="fi_bench lat round trips (default 20000)")
    p.add_argument(
        "--lat-configs",
        default=",".join(LAT_CONFIGS),
        help=f"latency configurations to run, in this order per run (default: all of {','.join(LAT_CONFIGS)})",
    )
    p.add_argument(
        "--loop-spin-us", type=int, default=500, help="loop_spin_us of both engines in the aiote_spin config (500)"
    )
    p.add_argument("--skip-bw", action="store_true")
    p.add_argument("--skip-lat", action="store_true")
    p.add_argument("--quick", action="store_true", help="a quarter of the iterations")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--plot-name", default="write_throughput.png")
    p.add_argument("--name", default="write", help="results file prefix (default write)")
    p.add_argument("--replot", metavar="JSON", help="only redraw the plot from a results file, then exit")
    p.add_argument("--title", default="", help="suffix for the plot titles (with --replot)")
    p.add_argument("--spin-us", type=int, help="TransferEngine spin_us of both engines (default: aiote's)")
    p.add_argument(
        "--cpu", action="store_true", help="throughput: also report the busy share of the target's engine threads "
        "and of the initiator's loop thread (1.00 = one core)"
    )
    args = p.parse_args()
    if args.spin_us is not None:
        C.ENGINE_KW["spin_us"] = args.spin_us
    if args.replot:
        import json

        d = json.loads(Path(args.replot).read_text())
        cfg = argparse.Namespace(**{**vars(args), **{k: d["config"][k] for k in ("inflight", "polling")}})
        img = C.IMG_DIR / args.plot_name
        plot_bw(d["bw"], cfg, img)
        print(f"plot: {img.relative_to(C.ROOT)} (from {args.replot})")
        return 0
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
