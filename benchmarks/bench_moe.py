"""MoE dispatch and combine latency: aiote ExpertParallel vs torch.distributed all_to_all_single (gloo).

EP ranks are processes on one host.  Each step every rank routes ``tokens`` tokens to
top-``k`` of ``experts`` experts; the experts are the identity (so only the
communication is timed).  aiote: ``ExpertParallel.dispatch`` / ``.combine``;
baseline: counts with one all_to_all_single, rows with another (dispatch), rows back
with a third (combine), same packing code.  p50/p99 over ``--steps`` steps, rank 0's
clock, after ``--warmup`` steps.

    python benchmarks/bench_moe.py [--ep 2,4] [--provider shm] [--tokens 128 --hidden 2048 --experts 32 --topk 8]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import time

import torch


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def inputs(a, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 100 + rank)
    x = torch.randn(a.tokens, a.hidden, generator=g)
    w, ids = torch.topk(torch.rand(a.tokens, a.experts, generator=g), a.topk, dim=1)
    return x, ids, w


def _rank(rank: int, world: int, a, port: int, conn) -> None:
    import torch.distributed as dist

    import aiote
    from aiote.moe import ExpertParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    async def aiote_part() -> tuple[list[float], list[float]]:
        host = "127.0.0.1" if a.provider == "tcp" else None
        async with aiote.TransferEngine(a.provider, host=host) as eng:
            ep = ExpertParallel(eng, rank, world, a.experts, a.hidden, a.tokens, a.topk)
            conn.send(ep.buffers)
            ep.connect(conn.recv())
            disp, comb = [], []
            for step in range(a.warmup + a.steps):
                x, ids, w = inputs(a, rank, step)
                dist.barrier()
                t0 = time.perf_counter()
                rows, _, per_src = await ep.dispatch(x, ids)
                t1 = time.perf_counter()
                await ep.combine(rows, per_src, w)
                t2 = time.perf_counter()
                if step >= a.warmup:
                    disp.append((t1 - t0) * 1e6)
                    comb.append((t2 - t1) * 1e6)
            dist.barrier()
            return disp, comb

    def gloo_part() -> tuple[list[float], list[float]]:
        per = a.experts // world
        disp, comb = [], []
        for step in range(a.warmup + a.steps):
            x, ids, w = inputs(a, rank, step)
            dist.barrier()
            t0 = time.perf_counter()
            flat = ids.reshape(-1)
            dest = flat // per
            order = torch.argsort(dest, stable=True)
            send = x[order // a.topk]
            counts = torch.bincount(dest, minlength=world)
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts)
            rows = torch.empty(int(recv_counts.sum()), a.hidden)
            dist.all_to_all_single(rows, send, recv_counts.tolist(), counts.tolist())
            t1 = time.perf_counter()
            back = torch.empty_like(send)
            dist.all_to_all_single(back, rows, counts.tolist(), recv_counts.tolist())
            out = torch.zeros(a.tokens, a.hidden)
            out.index_add_(0, order // a.topk, back * w.reshape(-1)[order].unsqueeze(1))
            t2 = time.perf_counter()
            if step >= a.warmup:
                disp.append((t1 - t0) * 1e6)
                comb.append((t2 - t1) * 1e6)
        return disp, comb

    res = {"aiote": asyncio.run(aiote_part()), "gloo all_to_all_single": gloo_part()}
    if rank == 0:
        conn.send(res)
    dist.destroy_process_group()


def run(world: int, a) -> dict:
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(world)]
    port = 29600 + os.getpid() % 500 + world
    procs = [ctx.Process(target=_rank, args=(r, world, a, port, pipes[r][1])) for r in range(world)]
    for p in procs:
        p.start()
    bufs = [pipes[r][0].recv() for r in range(world)]
    for r in range(world):
        pipes[r][0].send(bufs)
    res = pipes[0][0].recv()
    for p in procs:
        p.join(60)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep", default="2,4")
    ap.add_argument("--provider", default="shm")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    a = ap.parse_args()
    print(f"{a.provider}, {a.tokens} tokens x hidden {a.hidden} fp32, top-{a.topk} of {a.experts} experts, "
          f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'EP':>3} {'system':<24} {'dispatch p50':>13} {'p99':>9} {'combine p50':>12} {'p99':>9}  (us)")
    for world in [int(x) for x in a.ep.split(",")]:
        res = run(world, a)
        for name, (d, c) in res.items():
            print(f"{world:>3} {name:<24} {statistics.median(d):13.0f} {pct(d, 0.99):9.0f} "
                  f"{statistics.median(c):12.0f} {pct(c, 0.99):9.0f}")
        (ad, ac), (gd, gc) = res["aiote"], res["gloo all_to_all_single"]
        print(f"{'':>3} {'gloo / aiote (p50)':<24} {statistics.median(gd) / statistics.median(ad):13.2f} "
              f"{'':>9} {statistics.median(gc) / statistics.median(ac):12.2f}")


if __name__ == "__main__":
    main()
