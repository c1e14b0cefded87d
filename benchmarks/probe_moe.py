"""Where a MoE step's time goes, per rank: a timeline of each dispatch and combine.

Runs ``ExpertParallel`` with rows on GPUs (rank r on GPU r mod count; ``--device cpu``:
host rows) for ``--steps`` steps, experts = identity, and records on each rank (one
clock: every rank is a process of this host) when each call starts, when its batch of
copies or writes is handed to the engine, when it starts and stops waiting for the
peers' imms, and when it returns (and the GPU is done).  Prints the medians of each
phase on rank 0 and the time from the peer's hand-over to rank 0's wake-up.  Checks
every output against ``sum_k w * x``.  ``--step-timeout``: a call that takes longer
prints the engine's state (imms pending, stats, which of its own writes are done)
and fails, instead of hanging (diagnosis of the staged path: ``--ipc 0``).

    python benchmarks/probe_moe.py [--world 2] [--ipc 1|0] [--loop-spin-us N] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch


def _rank(rank: int, a, conn) -> None:
    import aiote
    import aiote.moe as moe
    from aiote.gpu import GpuPaths

    torch.set_num_threads(1)  # as bench_moe: intra-op threads fight the ranks for the cores
    gpu = a.device == "cuda"
    dev = f"cuda:{rank % torch.cuda.device_count()}" if gpu else "cpu"
    if gpu:
        torch.cuda.set_device(dev)
    dump = open(os.path.join(a.out, f"probe_fault_r{rank}.txt"), "w") if a.out else sys.stderr
    faulthandler.dump_traceback_later(a.dump_after, repeat=False, file=dump)
    ev: list[tuple[str, float]] = []
    now = time.perf_counter

    settled = moe._settled_or_withdrawn

    async def timed_wait(w):
        ev.append(("wait_in", now()))
        try:
            await settled(w)
        finally:
            ev.append(("wait_out", now()))

    moe._settled_or_withdrawn = timed_wait
    batch = GpuPaths.ipc_batch

    def timed_batch(self, *args, **kw):
        ev.append(("batch_in", now()))
        try:
            return batch(self, *args, **kw)
        finally:
            ev.append(("batch_out", now()))

    GpuPaths.ipc_batch = timed_batch
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    async def main() -> dict:
        host = "127.0.0.1" if a.provider == "tcp" else None
        async with aiote.TransferEngine(a.provider, host=host, cuda_ipc=bool(a.ipc), polling=a.polling,
                                        loop_spin_us=a.loop_spin_us) as eng:
            ep = moe.ExpertParallel(eng, rank, a.world, a.experts, a.hidden, a.tokens, a.topk,
                                    device=dev if gpu else None)
            conn.send(ep.buffers)
            ep.connect(conn.recv())
            orig_scatter = eng.scatter

            def timed_scatter(*args, **kw):
                ev.append(("scatter_in", now()))
                try:
                    return orig_scatter(*args, **kw)
                finally:
                    ev.append(("scatter_out", now()))

            eng.scatter = timed_scatter

            def state(what: str) -> str:
                imms = {hex(i): eng.imms.pending(i) for i in (*ep._dispatch_imms, ep._combine_imm)}
                return (f"rank {rank} {what} timed out: imms pending {imms}; own writes done "
                        f"{[f.done() for f in ep._pending]}; gpu {eng.gpu_stats}; engine {eng.stats()}")

            async def call(coro, what):
                if not a.step_timeout:
                    return await coro
                try:
                    return await asyncio.wait_for(coro, a.step_timeout)
                except asyncio.TimeoutError:
                    msg = state(what)
                    print(msg, file=sys.stderr, flush=True)
                    raise SystemExit(msg) from None

            steps, worst = [], 0.0
            for step in range(a.warmup + a.steps):
                g = torch.Generator().manual_seed(step * 100 + rank)
                x = torch.randn(a.tokens, a.hidden, generator=g)
                w, ids = torch.topk(torch.rand(a.tokens, a.experts, generator=g), a.topk, dim=1)
                x, ids, w = x.to(dev), ids.to(dev), w.to(dev)
                sync()
                ev.clear()
                t0 = now()
                rows, _, per = await call(ep.dispatch(x, ids), f"dispatch of step {step}")
                sync()
                t1 = now()
                ev.append(("combine", t1))
                out = await call(ep.combine(rows, per, w), f"combine of step {step}")
                t2 = now()
                sync()
                t3 = now()
                ref = (x.unsqueeze(1) * w.unsqueeze(2)).sum(1)
                worst = max(worst, float((out - ref).abs().max()))
                if step >= a.warmup:
                    steps.append({"t0": t0, "t1": t1, "t2": t2, "t3": t3, "ev": list(ev)})
                if a.verbose:
                    print(f"rank {rank} step {step}: dispatch {1e6 * (t1 - t0):.0f} us, combine "
                          f"{1e6 * (t3 - t1):.0f} us", file=sys.stderr, flush=True)
            await ep.settle()
            return {"steps": steps, "err": worst, "gpu": eng.gpu_stats}

    res = asyncio.run(main())
    faulthandler.cancel_dump_traceback_later()
    conn.send(res)


def _phase(step: dict, name: str, after: float, last: bool = False) -> float | None:
    ts = [t for n, t in step["ev"] if n == name and t >= after]
    return (ts[-1] if last else ts[0]) if ts else None


def summary(res: list[dict]) -> dict:
    """Medians (us) of rank 0's combine phases and the peer's hand-over -> rank 0's wake-up."""
    r0, r1 = res[0]["steps"], res[1]["steps"]
    rows: dict[str, list[float]] = {}

    def add(k, v):
        if v is not None:
            rows.setdefault(k, []).append(v * 1e6)

    for s0, s1 in zip(r0, r1):
        add("dispatch", s0["t1"] - s0["t0"])
        add("combine (to synced)", s0["t3"] - s0["t1"])
        c = s0["t1"]
        b_in, b_out = _phase(s0, "batch_in", c), _phase(s0, "batch_out", c)
        w_in, w_out = _phase(s0, "wait_in", c), _phase(s0, "wait_out", c)
        add("combine: python before the batch", b_in and b_in - c)
        add("combine: batch call", b_out and b_in and b_out - b_in)
        add("combine: batch -> wait", w_in and b_out and w_in - b_out)
        add("combine: waiting", w_out and w_in and w_out - w_in)
        add("combine: after the wait (launches)", w_out and s0["t2"] - w_out)
        add("combine: GPU sync", s0["t3"] - s0["t2"])
        p_out = _phase(s1, "batch_out", s1["t1"]) or _phase(s1, "scatter_out", s1["t1"], last=True)
        add("combine: peer's hand-over -> rank 0 wakes", w_out and p_out and w_out - p_out)
        add("combine: peer starts combine - rank 0 starts", s1["t1"] - c)
    return {k: round(statistics.median(v), 1) for k, v in rows.items()}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    ap.add_argument("--ipc", type=int, default=1)
    ap.add_argument("--provider", default="shm")
    ap.add_argument("--polling", default="adaptive")
    ap.add_argument("--loop-spin-us", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--step-timeout", type=float, default=0)
    ap.add_argument("--dump-after", type=float, default=120, help="faulthandler dump of every rank after N s")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--out", default="")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(a.world)]
    procs = [ctx.Process(target=_rank, args=(r, a, pipes[r][1]), daemon=True) for r in range(a.world)]
    for p in procs:
        p.start()
    for _, c in pipes:
        c.close()
    try:
        bufs = [pipes[r][0].recv() for r in range(a.world)]
        for r in range(a.world):
            pipes[r][0].send(bufs)
        res = [pipes[r][0].recv() for r in range(a.world)]
    except EOFError:
        raise SystemExit(f"a rank died (exit codes {[p.join(10) or p.exitcode for p in procs]})") from None
    for p in procs:
        p.join(30)
    s = summary(res)
    tag = f"world {a.world}, ipc {a.ipc}, {a.provider}, {a.polling}, loop_spin_us {a.loop_spin_us}"
    print(f"{tag}: max |out - ref| {max(r['err'] for r in res):.2e}; gpu stats rank 0 {res[0]['gpu']}")
    for k, v in s.items():
        print(f"  {k:<45} {v:9.1f} us")
    if a.out:
        name = f"probe_w{a.world}_ipc{a.ipc}_spin{a.loop_spin_us}.json"
        with open(os.path.join(a.out, name), "w") as f:
            json.dump({"args": vars(a), "summary": s, "ranks": res}, f)


if __name__ == "__main__":
    main()
