"""The `aiote` command: what this host offers, how fast it goes, and the demo.

```sh
aiote info  [--provider P] [--json]
aiote bench [--provider shm|tcp|efa|verbs] [--sizes 4K,1M,16M] [--plot out.png] [--json out.json]
aiote bench --store HOST:PORT --rank 0|1 --provider efa     # between two hosts
aiote demo  [demo options]                                  # python -m examples.kvcache
```

See docs/cli.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "parse_size", "format_size"]

USAGE = """asyncio-native RDMA transfers over libfabric: what this host offers, how fast it goes, the demo.

  aiote info  [--provider P] [--json]
  aiote bench [--provider shm|tcp|efa|verbs] [--sizes 4K,1M,16M] [--plot out.png] [--json out.json]
  aiote bench --store HOST:PORT --rank 0|1 --provider efa     # between two hosts
  aiote demo  [demo options]                                  # python -m examples.kvcache
"""

#: the providers aiote's engine is built for (libfabric names)
ENGINE_PROVIDERS = ("efa", "verbs;ofi_rxm", "cxi", "tcp;ofi_rxm", "shm")

_MR_MODE_BITS = {  # libfabric's FI_MR_* bits (fabric.h)
    1 << 0: "BASIC", 1 << 1: "SCALABLE", 1 << 2: "LOCAL", 1 << 3: "RAW", 1 << 4: "VIRT_ADDR",
    1 << 5: "ALLOCATED", 1 << 6: "PROV_KEY", 1 << 7: "MMU_NOTIFY", 1 << 8: "RMA_EVENT",
    1 << 9: "ENDPOINT", 1 << 10: "HMEM", 1 << 11: "COLLECTIVE",
}

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)(i?b)?\s*$", re.I)


def parse_size(text: str) -> int:
    """"4K" / "4KiB" / "4096" → 4096; "1M" → 1 MiB; "0" → 0 (an imm-only write)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 64K, 1M, 1G)")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def _sizes(text: str) -> list[int]:
    out = [parse_size(t) for t in text.split(",") if t.strip()]
    if not out:
        raise argparse.ArgumentTypeError("give at least one size")
    return out


def format_size(n: int) -> str:
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _speed(bits: int | None) -> str:
    if not bits:
        return "-"
    if bits >= 10**9:
        return f"{bits / 1e9:g} Gb/s"
    return f"{bits / 1e6:g} Mb/s"


def mr_mode_names(bits: int) -> list[str]:
    return [name for bit, name in _MR_MODE_BITS.items() if bits & bit]


def _console(**kw: Any) -> Any:
    from rich.console import Console

    return Console(**kw)


def _yes(v: bool) -> str:
    return "[green]✓[/]" if v else "[dim]✗[/]"


# ---------------------------------------------------------------- info


def _gather_info(provider: str | None, open_engines: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"nics": None, "topology": None, "engines": [], "notes": []}
    try:
        from .topology import nics, topology
    except ImportError as e:  # an older aiote, or discovery not built into _native yet
        out["notes"].append(f"NIC discovery (aiote.nics / aiote.topology) is not available in this build: {e}")
        nics = topology = None
    if nics is not None:
        try:
            out["nics"] = [_nic_dict(n) for n in nics(provider)]
        except Exception as e:  # noqa: BLE001 - show what failed, keep the rest
            out["notes"].append(f"aiote.nics() failed: {type(e).__name__}: {e}")
    if topology is not None:
        try:
            out["topology"] = _topology_dict(topology())
        except Exception as e:  # noqa: BLE001
            out["notes"].append(f"aiote.topology() failed: {type(e).__name__}: {e}")
    if open_engines:
        out["engines"] = asyncio.run(_probe_engines(_engine_candidates(provider, out["nics"])))
    return out


def _nic_dict(n: Any) -> dict[str, Any]:
    d = dataclasses.asdict(n)
    for k, v in d.items():
        if isinstance(v, frozenset):
            d[k] = sorted(v)
    d["supports_write_imm"] = bool(getattr(n, "supports_write_imm", False))
    return d


def _topology_dict(t: Any) -> dict[str, Any]:
    gpus = []
    for g in t.gpus:
        gpus.append({"index": g.index, "pci": g.pci, "numa_node": g.numa_node, "device": g.device,
                     "nics": [{"name": name, "affinity": aff.name, "hops": hops} for name, aff, hops in g.links],
                     "cpus": list(g.cpus)})
    nics = [{"name": n.name, "kind": n.kind, "pci": n.pci, "numa_node": n.numa_node, "driver": n.driver,
             "interfaces": list(n.interfaces)} for n in t.nics]
    return {"gpus": gpus, "nics": nics, "numa_nodes": t.numa_nodes}


def _engine_candidates(provider: str | None, nic_list: list[dict[str, Any]] | None) -> list[str]:
    if provider:
        from .engine import PROVIDER_ALIASES

        return [PROVIDER_ALIASES.get(provider, provider)]
    if nic_list is None:  # no discovery: try the two that exist everywhere
        return ["shm", "tcp;ofi_rxm"]
    present = {n["provider"] for n in nic_list}
    return [p for p in ENGINE_PROVIDERS if p in present]


async def _probe_engines(providers: list[str]) -> list[dict[str, Any]]:
    from .engine import TransferEngine

    rows = []
    for p in providers:
        try:
            eng = TransferEngine(p, polling="blocking")
            eng.open()
            try:
                info = eng.info()
            finally:
                await eng.close()
            info["mr_mode_names"] = mr_mode_names(info["mr_mode"])
            rows.append(info)
        except Exception as e:  # noqa: BLE001 - a provider that does not open is a fact to show
            rows.append({"provider": p, "error": f"{type(e).__name__}: {e}"})
    return rows


def cmd_info(args: argparse.Namespace) -> int:
    data = _gather_info(args.provider, not args.no_engines)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    from rich.table import Table

    con = _console()
    from . import __version__

    con.print(f"[bold]aiote {__version__}[/] — libfabric providers, NICs and GPU↔NIC topology of this host")
    for note in data["notes"]:
        con.print(f"[yellow]note:[/] {note}")

    if data["nics"] is not None:
        t = Table(title="NICs (libfabric: provider + domain)", title_justify="left")
        for col in ("provider", "domain", "link", "PCI / NUMA", "RMA", "imm", "HMEM", "mr_mode", "WriteImm"):
            t.add_column(col)
        for n in data["nics"]:
            domain = n["domain"] + (f" ({n['interface']})" if n["interface"] not in ("", n["domain"]) else "")
            link = _speed(n["link_speed"]) if n["link_speed"] else ""
            if n["link_state"] != "unknown":
                link = f"{link} {n['link_state']}".strip()
            where = (n["pci"] or "-") + ("" if n["numa_node"] is None else f" / {n['numa_node']}")
            t.add_row(n["provider"], domain, link or "-", where, _yes(n["rma"]), f"{n['cq_data_size']} B",
                      _yes(n["hmem"]), ",".join(m.removeprefix("FI_MR_") for m in n["mr_mode"]) or "-",
                      _yes(n["supports_write_imm"]))
        if not data["nics"]:
            con.print("[yellow]libfabric lists no provider"
                      + (f" matching {args.provider!r}" if args.provider else "") + "[/]")
        else:
            con.print(t)

    topo = data["topology"]
    if topo is not None:
        if topo["gpus"]:
            t = Table(title="GPU ↔ NIC (sysfs, nearest first)", title_justify="left")
            for col in ("GPU", "PCI", "NUMA", "nearest NICs", "others", "CPUs"):
                t.add_column(col)
            for g in topo["gpus"]:
                best = g["nics"][0]["affinity"] if g["nics"] else None
                near = [f"{x['name']} ({x['affinity'].lower()})" for x in g["nics"] if x["affinity"] == best]
                far = [x["name"] for x in g["nics"] if x["affinity"] != best]
                t.add_row(str(g["index"]), g["pci"], "-" if g["numa_node"] is None else str(g["numa_node"]),
                          "\n".join(near) or "-", ", ".join(far) or "-", _cpus(g["cpus"]))
            con.print(t)
        else:
            devs = ", ".join(f"{n['name']} ({n['driver'] or n['kind']})" for n in topo["nics"]) or "none"
            con.print(f"GPU ↔ NIC: no NVIDIA GPU on this host; NICs on the PCI bus: {devs}; "
                      f"NUMA nodes: {topo['numa_nodes']}")

    if data["engines"]:
        t = Table(title="What an engine gets (TransferEngine(provider).open(); eng.info())", title_justify="left")
        for col in ("provider", "domain", "a write completes", "imm", "HMEM", "mr_mode", "inject", "CQ fd"):
            t.add_column(col)
        for e in data["engines"]:
            if "error" in e:
                t.add_row(e["provider"], f"[red]does not open: {e['error']}[/]", "", "", "", "", "", "")
                continue
            t.add_row(e["provider"], e["domain"],
                      "[green]delivered[/]" if e["delivery_complete"] else "[yellow]transmitted[/]",
                      f"{e['cq_data_size']} B", _yes(e["hmem"]), ",".join(e["mr_mode_names"]) or "-",
                      f"{e['inject_size']} B", _yes(e["cq_wait_fd"]))
        con.print(t)
        con.print("[dim]a write completes: what its future resolving means — delivered: the bytes are in "
                  "the target's memory (delivery complete); transmitted: they left (docs/concepts.md).  "
                  "CQ fd: the adaptive worker sleeps on it (else it naps).  imm: bytes of immediate data "
                  "(aiote needs 4).  GPU memory (CUDA tensors, GPUDirect) is not supported by aiote yet, "
                  "whatever HMEM says.[/]")
    return 0


def _cpus(cpus: list[int]) -> str:
    if not cpus:
        return "-"
    runs, start, prev = [], cpus[0], cpus[0]
    for c in cpus[1:] + [None]:  # type: ignore[list-item]
        if c is not None and c == prev + 1:
            prev = c
            continue
        runs.append(f"{start}-{prev}" if prev != start else str(start))
        if c is not None:
            start = prev = c
    return ",".join(runs)


# ---------------------------------------------------------------- bench

PING, PONG = 0x0B1, 0x0B2


@dataclasses.dataclass
class BenchPlan:
    sizes: list[int]
    lat_sizes: list[int]
    window: int = 32
    duration: float = 0.3
    lat_iters: int = 1000
    warmup: int = 50
    throughput: bool = True
    latency: bool = True

    @property
    def buffer(self) -> int:
        return max([*self.sizes, *self.lat_sizes, 4096])

    def steps(self) -> int:
        return len(self.sizes) * self.throughput + len(self.lat_sizes) * self.latency


@dataclasses.dataclass
class EngineArgs:
    provider: str
    host: str | None
    nics: int
    polling: str


class _PipeChannel:
    """Rank 0 ↔ a local peer process: a multiprocessing pipe."""

    def __init__(self, conn: Any, proc: Any = None):
        self.conn, self.proc = conn, proc

    async def exchange(self, value: bytes, timeout: float = 60) -> bytes:
        self.conn.send_bytes(value)

        def recv() -> bytes:
            deadline = time.monotonic() + timeout
            while not self.conn.poll(0.1):
                if self.proc is not None and not self.proc.is_alive():
                    raise RuntimeError(f"the peer process exited (code {self.proc.exitcode})")
                if time.monotonic() > deadline:
                    raise TimeoutError("the peer process did not answer")
            return self.conn.recv_bytes()

        return await asyncio.to_thread(recv)

    async def leave(self) -> None:
        return None


class _StoreChannel:
    """Two hosts: a TCPStore that rank 0 serves at --store HOST:PORT."""

    def __init__(self, group: Any):
        self.group = group

    async def exchange(self, value: bytes, timeout: float = 300) -> bytes:
        values = await self.group.exchange("hello", value, timeout)
        return values[1 - self.group.rank]

    async def leave(self) -> None:
        await self.group.leave(timeout=60)


async def bench_rank(rank: int, eargs: EngineArgs, plan: BenchPlan | None, channel: Any,
                     on_step: Any = None) -> dict[str, Any] | None:
    """One side of the benchmark.  Rank 0 drives (its plan rules) and returns the results;
    rank 1 serves as the target and echoes pings."""
    from .descriptor import MrDescriptor
    from .engine import TransferEngine

    # 1: rank 0's plan (rank 1 needs its buffer size), 2: addresses and descriptors
    raw = await channel.exchange(json.dumps(dataclasses.asdict(plan) if rank == 0 else {}).encode())
    if rank == 1:
        plan = BenchPlan(**json.loads(raw))
    assert plan is not None
    async with TransferEngine(eargs.provider, host=eargs.host, nics=eargs.nics, polling=eargs.polling) as eng:
        buf = bytearray(plan.buffer)
        mr = eng.register(buf)
        hello = json.dumps({"provider": eng.provider, "address": eng.address.hex(),
                            "desc": mr.descriptor.to_bytes().hex()}).encode()
        other = json.loads(await channel.exchange(hello))
        if other["provider"] != eng.provider:
            raise SystemExit(f"rank {rank} runs {eng.provider!r}, its peer {other['provider']!r}: "
                             "give both the same --provider")
        peer_addr = bytes.fromhex(other["address"])
        peer_desc = MrDescriptor.from_bytes(bytes.fromhex(other["desc"]))
        if rank == 1:
            await _serve(eng, mr, peer_desc)
            result = None
        else:
            result = await _drive(eng, mr, peer_addr, peer_desc, plan, on_step)
        await channel.leave()
        return result


async def _serve(eng: Any, mr: Any, peer_desc: Any) -> None:
    while True:  # (bounded waits: a vanished rank 0 must not leave this one hanging)
        data, _sender = await asyncio.wait_for(eng.recv(), 600)
        msg = json.loads(data)
        if msg["op"] == "exit":
            return
        if msg["op"] == "pong":
            n, size = msg["n"], msg["size"]
            for _ in range(n):
                await eng.imms.wait(PING, 1, timeout=60)
                if size:
                    await eng.write(mr, peer_desc, size, imm=PONG)
                else:
                    await eng.write_imm(peer_desc, PONG)


async def _drive(eng: Any, mr: Any, peer_addr: bytes, peer_desc: Any, plan: BenchPlan,
                 on_step: Any) -> dict[str, Any]:
    info = eng.info()
    out: dict[str, Any] = {"provider": eng.provider, "domain": info["domain"], "nics": info["nics"],
                           "delivery_complete": info["delivery_complete"], "window": plan.window,
                           "throughput": [], "latency": []}
    await eng.write(mr, peer_desc, min(4096, plan.buffer))  # connections up before timing
    if plan.throughput:
        for size in plan.sizes:
            out["throughput"].append(await _throughput(eng, mr, peer_desc, size, plan.window, plan.duration))
            if on_step:
                on_step(f"throughput {format_size(size)}")
    if plan.latency:
        for size in plan.lat_sizes:
            out["latency"].append(await _latency(eng, mr, peer_addr, peer_desc, size, plan.lat_iters,
                                                 plan.warmup))
            if on_step:
                on_step(f"latency {format_size(size)}")
    await eng.send(peer_addr, json.dumps({"op": "exit"}).encode())
    return out


async def _throughput(eng: Any, mr: Any, desc: Any, size: int, window: int, duration: float) -> dict[str, Any]:
    """Keep ``window`` writes of ``size`` in flight for ``duration`` seconds."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    st = {"inflight": 0, "done": 0, "error": None}
    stop_at = loop.time() + duration

    def issue() -> None:
        f = eng.write(mr, desc, size)
        st["inflight"] += 1
        f.add_done_callback(landed)

    def landed(f: asyncio.Future[None]) -> None:
        st["inflight"] -= 1
        if f.cancelled() or f.exception() is not None:
            st["error"] = st["error"] or (f.exception() if not f.cancelled() else RuntimeError("cancelled"))
        else:
            st["done"] += 1
        if st["error"] is None and loop.time() < stop_at:
            issue()
        elif st["inflight"] == 0 and not finished.done():
            finished.set_result(None)

    t0 = time.perf_counter()
    for _ in range(window):
        issue()
    await asyncio.wait_for(finished, duration + 60)
    dt = time.perf_counter() - t0
    if st["error"] is not None:
        raise st["error"]
    n = st["done"]
    return {"size": size, "ops": n, "seconds": dt, "gbps": n * size * 8 / dt / 1e9,
            "GBps": n * size / dt / 1e9, "mops": n / dt / 1e6}


async def _latency(eng: Any, mr: Any, peer_addr: bytes, desc: Any, size: int, iters: int,
                   warmup: int) -> dict[str, Any]:
    """Ping-pong: a write of ``size`` (0: imm only) carrying PING; the peer answers the same with PONG."""
    await eng.send(peer_addr, json.dumps({"op": "pong", "n": iters + warmup, "size": size}).encode())
    rtts = []
    for i in range(iters + warmup):
        w = eng.imms.wait(PONG, 1, timeout=30)
        t0 = time.perf_counter_ns()
        await (eng.write(mr, desc, size, imm=PING) if size else eng.write_imm(desc, PING))
        await w
        if i >= warmup:
            rtts.append((time.perf_counter_ns() - t0) / 1e3)
    rtts.sort()
    return {"size": size, "iters": iters, "rtt_p50_us": rtts[len(rtts) // 2],
            "rtt_p99_us": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))], "rtt_mean_us": statistics.fmean(rtts),
            "rtt_min_us": rtts[0], "one_way_p50_us": rtts[len(rtts) // 2] / 2}


def _local_peer_main(conn: Any, eargs: dict[str, Any]) -> None:
    try:
        asyncio.run(bench_rank(1, EngineArgs(**eargs), None, _PipeChannel(conn)))
    except KeyboardInterrupt:
        pass


def _need_matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_results(res: dict[str, Any], path: str) -> None:
    plt = _need_matplotlib()
    if plt is None:
        raise ImportError("matplotlib")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if res["throughput"]:
        xs = [r["size"] for r in res["throughput"]]
        ax1.plot(xs, [r["gbps"] for r in res["throughput"]], "o-")
        ax1.set_xscale("log", base=2)
        ax1.set_xticks(xs, [format_size(x) for x in xs], rotation=45)
    ax1.set_title(f"write throughput ({res['window']} in flight)")
    ax1.set_xlabel("write size")
    ax1.set_ylabel("Gb/s")
    ax1.grid(True, alpha=0.3)
    if res["latency"]:
        labels = [format_size(r["size"]) if r["size"] else "imm only" for r in res["latency"]]
        xs = list(range(len(labels)))
        ax2.plot(xs, [r["rtt_p50_us"] for r in res["latency"]], "o-", label="p50")
        ax2.plot(xs, [r["rtt_p99_us"] for r in res["latency"]], "s--", label="p99")
        ax2.set_xticks(xs, labels)
        ax2.legend()
    ax2.set_title("ping-pong round trip (write + imm each way)")
    ax2.set_xlabel("write size")
    ax2.set_ylabel("µs")
    ax2.grid(True, alpha=0.3)
    fig.suptitle(f"aiote bench: {res['provider']} ({res['domain']}, {res['nics']} NIC(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _render_bench(con: Any, res: dict[str, Any]) -> None:
    from rich.table import Table

    if res["throughput"]:
        t = Table(title=f"write throughput: {res['provider']} ({res['domain']}), {res['window']} in flight",
                  title_justify="left")
        for col in ("size", "Gb/s", "GB/s", "Mop/s", "writes"):
            t.add_column(col, justify="right")
        for r in res["throughput"]:
            t.add_row(format_size(r["size"]), f"{r['gbps']:.2f}", f"{r['GBps']:.3f}", f"{r['mops']:.3f}",
                      str(r["ops"]))
        con.print(t)
    if res["latency"]:
        t = Table(title="ping-pong latency: write with imm → peer's imm wait → write back", title_justify="left")
        for col in ("size", "RTT p50 µs", "RTT p99 µs", "RTT mean µs", "min µs", "≈ one-way p50 µs"):
            t.add_column(col, justify="right")
        for r in res["latency"]:
            t.add_row(format_size(r["size"]) if r["size"] else "imm only", f"{r['rtt_p50_us']:.1f}",
                      f"{r['rtt_p99_us']:.1f}", f"{r['rtt_mean_us']:.1f}", f"{r['rtt_min_us']:.1f}",
                      f"{r['one_way_p50_us']:.1f}")
        con.print(t)


def cmd_bench(args: argparse.Namespace) -> int:
    con = _console(stderr=args.rank == 1)
    if args.plot and _need_matplotlib() is None:
        con.print("[red]--plot needs matplotlib:[/] pip install 'aiote\\[bench]'  (or: pip install matplotlib)")
        return 2
    from .engine import PROVIDER_ALIASES

    provider = PROVIDER_ALIASES.get(args.provider, args.provider)
    host = args.host
    if host is None and args.store is None and provider != "shm":
        host = "127.0.0.1"  # both processes on this host
    eargs = EngineArgs(provider, host, args.nics, args.polling)
    plan = BenchPlan(sizes=args.sizes, lat_sizes=args.lat_sizes, window=args.window, duration=args.duration,
                     lat_iters=args.lat_iters, warmup=min(args.lat_iters, 50),
                     throughput=args.only != "latency", latency=args.only != "throughput")
    try:
        if args.store is None:
            res = _bench_local(con, eargs, plan)
        else:
            res = _bench_two_hosts(con, eargs, plan, args.store, args.rank)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a failed benchmark is reported, not a traceback
        if isinstance(e, SystemExit) and not isinstance(e.code, str):
            raise
        con.print(f"[red]bench failed:[/] {type(e).__name__}: {e}")
        return 1
    if res is None:  # rank 1
        con.print("rank 1: done")
        return 0
    _render_bench(con, res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
        con.print(f"results: {args.json}")
    if args.plot:
        plot_results(res, args.plot)
        con.print(f"plot: {args.plot}")
    return 0


def _progress(con: Any, total: int) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=con, transient=False)


def _bench_local(con: Any, eargs: EngineArgs, plan: BenchPlan) -> dict[str, Any]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_local_peer_main, args=(child, dataclasses.asdict(eargs)), daemon=True)
    con.print(f"aiote bench: {eargs.provider}, this process ↔ a peer process on this host "
              f"({eargs.nics} NIC(s), polling {eargs.polling})")
    proc.start()
    child.close()
    try:
        with _progress(con, plan.steps()) as progress:
            task = progress.add_task("starting the peer", total=plan.steps())

            def step(what: str) -> None:
                progress.update(task, advance=1, description=what)

            res = asyncio.run(bench_rank(0, eargs, plan, _PipeChannel(parent, proc), step))
            progress.update(task, description="done")
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        parent.close()
    return res  # type: ignore[return-value]


def _bench_two_hosts(con: Any, eargs: EngineArgs, plan: BenchPlan, store: str, rank: int) -> dict[str, Any] | None:
    from . import rendezvous

    host, _, port = store.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--store wants HOST:PORT, got {store!r}")
    con.print(f"rank {rank}: {'serving' if rank == 0 else 'joining'} the store at {host}:{port} …")
    st = rendezvous.create_store(host, int(port), is_master=(rank == 0), world_size=2, timeout=300)
    group = rendezvous.Group(st, rank, 2, prefix="aiote-bench", serving=(rank == 0))
    channel = _StoreChannel(group)
    if rank == 1:
        return asyncio.run(bench_rank(1, eargs, None, channel))
    with _progress(con, plan.steps()) as progress:
        task = progress.add_task("waiting for rank 1", total=plan.steps())
        res = asyncio.run(bench_rank(0, eargs, plan, channel,
                                     lambda what: progress.update(task, advance=1, description=what)))
        progress.update(task, description="done")
    return res


# ---------------------------------------------------------------- demo


def find_examples(explicit: str | None = None) -> Path | None:
    """A directory holding ``examples/kvcache`` (a source checkout of aiote), or None."""
    here = Path(__file__).resolve().parent.parent
    for cand in (explicit, os.environ.get("AIOTE_EXAMPLES"), here, Path.cwd()):
        if cand and (Path(cand) / "examples" / "kvcache" / "__main__.py").is_file():
            return Path(cand).resolve()
    return None


DEMO_HELP = """aiote demo [--examples-dir DIR] [demo options]

Runs the disaggregated prefill/decode KV-cache demo, `python -m examples.kvcache`
(it lives in aiote's source tree, examples/kvcache; docs/kvcache-demo.md).
Demo options (--provider shm|tcp, --requests N, --crash decode, ...) are the demo's
own: `aiote demo --help` lists them.
"""


def cmd_demo(argv: list[str]) -> int:
    con = _console(stderr=True)
    explicit = None
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--examples-dir":
            explicit = next(it, None)
        elif a.startswith("--examples-dir="):
            explicit = a.split("=", 1)[1]
        else:
            rest.append(a)
    root = find_examples(explicit)
    if root is None:
        con.print("[red]aiote demo:[/] the demo is not installed with the package: it lives in aiote's source "
                  "tree (examples/kvcache).  From a checkout run [bold]scripts/demo.sh[/] or "
                  "[bold]python -m examples.kvcache[/], or point this command at it: "
                  "[bold]aiote demo --examples-dir /path/to/aiote[/] (or AIOTE_EXAMPLES=/path/to/aiote).")
        return 2
    missing = [m for m in ("torch", "anyio") if importlib.util.find_spec(m) is None]
    if missing:
        con.print(f"[red]aiote demo:[/] the demo needs {' and '.join(missing)}: pip install 'aiote\\[demo]'")
        return 2
    if "-h" in rest or "--help" in rest:
        con.print(DEMO_HELP)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p))
    try:
        return subprocess.call([sys.executable, "-m", "examples.kvcache", *rest], cwd=str(root), env=env)
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="aiote", description=USAGE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"aiote {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="{info,bench,demo}")
    sub.required = True

    i = sub.add_parser("info", help="providers, NICs, link speeds, GPU↔NIC topology, what each provider supports")
    i.add_argument("--provider", default=None, help="only this provider (a name or a layer: efa, tcp, shm)")
    i.add_argument("--no-engines", action="store_true", help="don't open an engine per provider")
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")

    b = sub.add_parser("bench", help="write throughput and ping-pong latency between two processes",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Two processes on this host (default: a peer process is spawned), or two "
                                   "hosts: run `aiote bench --store HOST:PORT --rank 0` on one (it serves a "
                                   "TCPStore at HOST:PORT, needs torch) and `... --rank 1` on the other.  "
                                   "Rank 0 writes into rank 1's memory (throughput) and ping-pongs writes with "
                                   "imms (latency); its options rule.")
    b.add_argument("--provider", default="shm", help="shm, tcp, efa, verbs, or a libfabric name")
    b.add_argument("--host", default=None, help="bind address for tcp/verbs (default 127.0.0.1 locally)")
    b.add_argument("--nics", type=int, default=1, help="NICs per engine (large writes are striped)")
    b.add_argument("--polling", default="adaptive", choices=["busy", "adaptive", "blocking"])
    b.add_argument("--sizes", type=_sizes, default=_sizes("4K,16K,64K,256K,1M,4M,16M"),
                   help="throughput write sizes, comma-separated")
    b.add_argument("--window", type=int, default=32, help="writes in flight")
    b.add_argument("--duration", type=float, default=0.3, help="seconds per throughput size")
    b.add_argument("--lat-sizes", type=_sizes, default=_sizes("0,64,4K,64K"),
                   help="ping-pong write sizes (0: imm only)")
    b.add_argument("--lat-iters", type=int, default=1000, help="round trips per latency size")
    b.add_argument("--only", choices=["throughput", "latency"], default=None)
    b.add_argument("--store", default=None, metavar="HOST:PORT", help="two hosts: the TCPStore rank 0 serves")
    b.add_argument("--rank", type=int, choices=[0, 1], default=0, help="with --store: this host's rank")
    b.add_argument("--plot", default=None, metavar="OUT.png", help="also plot the results (needs matplotlib)")
    b.add_argument("--json", default=None, metavar="OUT.json", help="also write the results as JSON")

    sub.add_parser("demo", help="run the KV-cache disaggregation demo (python -m examples.kvcache)",
                   add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "demo":
        return cmd_demo(argv[1:])
    args = build_parser().parse_args(argv)
    if args.cmd == "info":
        return cmd_info(args)
    if args.window < 1 or args.duration <= 0 or args.lat_iters < 1 or args.nics < 1:
        build_parser().error("--window, --duration, --lat-iters and --nics must be positive")
    return cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
