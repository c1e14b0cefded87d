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


def _rank(rank: int, a, conn, bar=None) -> None:
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

    async def timed_wait(w, *args):
        ev.append(("wait_in", now()))
        try:
            await settled(w, *args)
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
    from aiote.gpu import IpcBatchPlan

    plan_submit = IpcBatchPlan.submit

    def timed_plan(self, *args, **kw):  # what ExpertParallel calls
        ev.append(("batch_in", now()))
        try:
            return plan_submit(self, *args, **kw)
        finally:
            ev.append(("batch_out", now()))

    IpcBatchPlan.submit = timed_plan

    def timed_method(cls, name):
        orig = getattr(cls, name)

        def wrapper(self, *args, **kw):
            ev.append((name + "_in", now()))
            try:
                return orig(self, *args, **kw)
            finally:
                ev.append((name + "_out", now()))

        setattr(cls, name, wrapper)

    for name in ("_route", "_post_split", "_headers", "_assemble"):  # dispatch's phases
        timed_method(moe.ExpertParallel, name)

    import aiote.engine as engine_mod

    real_lib = engine_mod.lib

    class TimedLib:  # the batch's C call, apart from its Python
        def __getattr__(self, name):
            return getattr(real_lib, name)

        def aiote_submit_cuda_lanes(self, *args):
            ev.append(("c_in", now()))
            try:
                return real_lib.aiote_submit_cuda_lanes(*args)
            finally:
                ev.append(("c_out", now()))

        def aiote_submit_cuda(self, *args):
            ev.append(("c_in", now()))
            try:
                return real_lib.aiote_submit_cuda(*args)
            finally:
                ev.append(("c_out", now()))

    engine_mod.lib = TimedLib()
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
            orig_wait = eng.imms.wait

            def timed_imm_wait(*args, **kw):  # armed (dispatch awaits it at once)
                ev.append(("imm_wait", now()))
                return orig_wait(*args, **kw)

            eng.imms.wait = timed_imm_wait

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
                if bar is not None:  # the ranks start each step together (as bench_moe's barrier)
                    bar.wait()
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
    """Medians (us) of rank 0's dispatch and combine phases, and the last peer's
    hand-over -> rank 0's wake-up (any world: the peer whose batch returned last)."""
    r0, peers = res[0]["steps"], [r["steps"] for r in res[1:]]
    rows: dict[str, list[float]] = {}

    def add(k, v):
        if v is not None:
            rows.setdefault(k, []).append(v * 1e6)

    def gap(a, b):
        return b - a if a is not None and b is not None else None

    for i, s0 in enumerate(r0):
        ps = [p[i] for p in peers if i < len(p)]
        t0, c = s0["t0"], s0["t1"]
        ph = {n: _phase(s0, n, t0) for n in ("_route_in", "_route_out", "_post_split_in", "batch_in", "batch_out",
                                              "_post_split_out", "imm_wait", "_headers_in",
                                              "_assemble_out")}
        add("dispatch (to synced)", c - t0)
        add("dispatch: checks before routing", gap(t0, ph["_route_in"]))
        add("dispatch: routing (ids .cpu(), numpy)", gap(ph["_route_in"], ph["_route_out"]))
        add("dispatch: settle, index upload", gap(ph["_route_out"], ph["_post_split_in"]))
        add("dispatch: index_select, copy list", gap(ph["_post_split_in"], ph["batch_in"]))
        add("dispatch: batch call", gap(ph["batch_in"], ph["batch_out"]))
        c_in, c_out = _phase(s0, "c_in", t0), _phase(s0, "c_out", t0)
        add("dispatch: batch call: Python before the C call", gap(ph["batch_in"], c_in))
        add("dispatch: batch call: the C call", gap(c_in, c_out))
        add("dispatch: batch -> wait (own rows)", gap(ph["batch_out"], ph["imm_wait"]))
        add("dispatch: waiting (to resumed)", gap(ph["imm_wait"], ph["_headers_in"]))
        add("dispatch: headers, assembly", gap(ph["_headers_in"], ph["_assemble_out"]))
        add("dispatch: return -> GPU synced", gap(ph["_assemble_out"], c))
        p_out = [_phase(p, "batch_out", p["t0"]) for p in ps]
        if ph["_headers_in"] is not None and p_out and None not in p_out:
            add("dispatch: last peer's batch -> rank 0 wakes", ph["_headers_in"] - max(p_out))
            add("dispatch: rank 0's batch - last peer's", ph["batch_out"] and max(p_out) - ph["batch_out"])
        add("dispatch: step start spread (last peer - rank 0)", max((p["t0"] for p in ps), default=t0) - t0)
        b_in, b_out = _phase(s0, "batch_in", c), _phase(s0, "batch_out", c)
        w_in, w_out = _phase(s0, "wait_in", c), _phase(s0, "wait_out", c)
        add("combine (to synced)", s0["t3"] - c)
        add("combine: python before the batch", gap(c, b_in))
        add("combine: batch call", gap(b_in, b_out))
        c_in, c_out = _phase(s0, "c_in", c), _phase(s0, "c_out", c)
        add("combine: batch call: Python before the C call", gap(b_in, c_in))
        add("combine: batch call: the C call", gap(c_in, c_out))
        add("combine: batch -> wait", gap(b_out, w_in))
        add("combine: waiting", gap(w_in, w_out))
        add("combine: after the wait (launches)", gap(w_out, s0["t2"]))
        add("combine: GPU sync", s0["t3"] - s0["t2"])
        p_out = [_phase(p, "batch_out", p["t1"]) or _phase(p, "scatter_out", p["t1"], last=True) for p in ps]
        if w_out is not None and p_out and None not in p_out:
            add("combine: last peer's hand-over -> rank 0 wakes", w_out - max(p_out))
        add("combine: last peer starts combine - rank 0 starts", max((p["t1"] for p in ps), default=c) - c)
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
    bar = ctx.Barrier(a.world)
    procs = [ctx.Process(target=_rank, args=(r, a, pipes[r][1], bar), daemon=True) for r in range(a.world)]
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
