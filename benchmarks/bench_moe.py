"""MoE dispatch and combine latency: aiote ExpertParallel vs torch.distributed all_to_all_single.

EP ranks are processes on one host.  Each step every rank routes ``tokens`` tokens to
top-``k`` of ``experts`` experts; the experts are the identity (so only the
communication is timed).  aiote: ``ExpertParallel.dispatch`` / ``.combine``;
baseline: counts with one all_to_all_single, rows with another (dispatch), rows back
with a third (combine), same packing code, over gloo (``--device cpu``) or NCCL
(``--device cuda``: rank r on GPU r, aiote with ``device="cuda:r"`` buffers).  The two
systems alternate step by step (which goes first flips every step), so load on the
machine hits both alike.  p50/p99 over ``--steps`` steps, rank 0's clock, after
``--warmup`` steps.  ``--ab-lanes`` (GPUs) adds a third system in the same rotation:
aiote with ``GpuPaths.copy_lanes`` off (every IPC copy of a batch on one stream).
``--ab-base FILE`` adds another version of ``aiote/moe.py`` (e.g. main's, saved with
``git show main:aiote/moe.py``) as one more system in the rotation, on the same engine;
``--ab-wait-spin N`` one more: aiote with ``ExpertParallel.wait_spin_us = N``.

    python benchmarks/bench_moe.py [--ep 2,4] [--provider shm|tcp] [--device cpu|cuda]
                                   [--polling adaptive|busy|blocking] [--loop-spin-us N] [--ab-lanes] [--ab-base FILE]
                                   [--ab-wait-spin N]
                                   [--tokens 128 --hidden 2048 --experts 32 --topk 8]
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


def inputs(a, rank: int, step: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 100 + rank)
    x = torch.randn(a.tokens, a.hidden, generator=g)
    w, ids = torch.topk(torch.rand(a.tokens, a.experts, generator=g), a.topk, dim=1)
    return x.to(device), ids.to(device), w.to(device)


def backend(a) -> str:
    return "nccl" if a.device == "cuda" else "gloo"


def skip_reason(a, world: int) -> str | None:
    """Why this EP size can't run here (None: it can)."""
    if a.device != "cuda":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.device_count() < world:
        return f"EP {world} needs {world} GPUs, this host has {torch.cuda.device_count()}"
    return None


def _rank(rank: int, world: int, a, port: int, conn) -> None:
    import torch.distributed as dist

    import aiote
    from aiote.moe import ExpertParallel

    torch.set_num_threads(1)
    gpu = a.device == "cuda"
    dev = f"cuda:{rank}" if gpu else "cpu"
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group(backend(a), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    per = a.experts // world

    def baseline_step(x, ids, w) -> tuple[float, float]:
        t0 = time.perf_counter()
        flat = ids.reshape(-1)
        dest = flat // per
        order = torch.argsort(dest, stable=True)
        send = x[order // a.topk]
        counts = torch.bincount(dest, minlength=world)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts)
        rc, sc = recv_counts.tolist(), counts.tolist()
        rows = torch.empty(sum(rc), a.hidden, device=dev)
        dist.all_to_all_single(rows, send, rc, sc)
        sync()
        t1 = time.perf_counter()
        back = torch.empty_like(send)
        dist.all_to_all_single(back, rows, sc, rc)
        out = torch.zeros(a.tokens, a.hidden, device=dev)
        out.index_add_(0, order // a.topk, back * w.reshape(-1)[order].unsqueeze(1))
        sync()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    async def main() -> dict:
        host = "127.0.0.1" if a.provider == "tcp" else None
        async with aiote.TransferEngine(a.provider, host=host, polling=a.polling,
                                        loop_spin_us=a.loop_spin_us) as eng:
            ep = ExpertParallel(eng, rank, world, a.experts, a.hidden, a.tokens, a.topk,
                                device=dev if gpu else None)
            eps = {"aiote": ep, "aiote1": ep, "aiote2": ep}
            spin0 = ep.wait_spin_us
            if a.ab_base:  # another version of aiote/moe.py, same engine, imms of its own
                eps["aiote0"] = load_base(a.ab_base).ExpertParallel(
                    eng, rank, world, a.experts, a.hidden, a.tokens, a.topk, device=dev if gpu else None,
                    imm_base=ExpertParallel.DISPATCH_IMM + 0x10)
            names = (["aiote", "base"] + (["aiote1"] if a.ab_lanes else []) + (["aiote0"] if a.ab_base else [])
                     + (["aiote2"] if a.ab_wait_spin >= 0 else []))
            mine = [e for n, e in eps.items() if n in names and n not in ("aiote1", "aiote2")]
            # plain tuples: the parent can't unpickle aiote.moe_base's MoeBuffers
            conn.send([(e.buffers.recv, e.buffers.combine, e.buffers.meta) for e in mine])
            got = conn.recv()
            for i, e in enumerate(mine):
                e.connect([type(e.buffers)(*b[i]) for b in got])

            async def aiote_step(x, ids, w, ep=ep) -> tuple[float, float]:
                t0 = time.perf_counter()
                rows, _, per_src = await ep.dispatch(x, ids)
                sync()
                t1 = time.perf_counter()
                await ep.combine(rows, per_src, w)
                sync()
                t2 = time.perf_counter()
                return t1 - t0, t2 - t1

            # per step: dispatch, combine (wall, rank 0's clock), CPU time of the rank's process (all threads)
            res: dict[str, tuple[list[float], ...]] = {n: ([], [], []) for n in names}
            paths = eng._gpu_paths() if gpu else None
            for step in range(a.warmup + a.steps):
                x, ids, w = inputs(a, rank, step, dev)
                k = step % len(names)  # which goes first rotates every step
                for name in names[k:] + names[:k]:
                    dist.barrier()
                    if paths is not None:
                        paths.copy_lanes = name != "aiote1"
                    ep.wait_spin_us = a.ab_wait_spin if name == "aiote2" else spin0
                    cpu0 = time.process_time()
                    d, c = await aiote_step(x, ids, w, eps[name]) if name != "base" else baseline_step(x, ids, w)
                    cpu = time.process_time() - cpu0
                    if step >= a.warmup:
                        res[name][0].append(d * 1e6)
                        res[name][1].append(c * 1e6)
                        res[name][2].append(cpu * 1e6)
            for e in mine:
                await e.settle()
            dist.barrier()
            if paths is not None:  # rank 0's batches whose copies went over several streams
                res["lane_batches"] = ([float(paths.stats["lane_batches"])],)
            return res

    res = asyncio.run(main())
    if rank == 0:
        conn.send(res)
    dist.destroy_process_group()


def load_base(path: str):
    """aiote/moe.py of another version (a file), as the module aiote.moe_base (its relative
    imports resolve in this aiote)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("aiote.moe_base", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["aiote.moe_base"] = mod
    spec.loader.exec_module(mod)
    return mod


def run(world: int, a) -> dict:
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(world)]
    port = 29600 + os.getpid() % 500 + world
    procs = [ctx.Process(target=_rank, args=(r, world, a, port, pipes[r][1])) for r in range(world)]
    for p in procs:
        p.start()
    for _, child_end in pipes:
        child_end.close()  # so that a rank that dies reads as EOF here, not as a hang
    try:
        bufs = [pipes[r][0].recv() for r in range(world)]
        for r in range(world):
            pipes[r][0].send(bufs)
        res = pipes[0][0].recv()
    except EOFError:
        raise SystemExit(f"a rank died (exit codes {[p.join(10) or p.exitcode for p in procs]})") from None
    for p in procs:
        p.join(60)
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep", default="2,4")
    ap.add_argument("--provider", default="shm")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: host tensors, baseline over gloo; cuda: rank r on GPU r, baseline over NCCL")
    ap.add_argument("--polling", choices=("adaptive", "busy", "blocking"), default="adaptive",
                    help="aiote engines' polling mode")
    ap.add_argument("--loop-spin-us", type=int, default=0,
                    help="aiote engines' loop_spin_us (the asyncio loop spins this long on aiote's events before "
                         "it sleeps; NCCL's host waits spin too)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--ab-lanes", action="store_true",
                    help="also time aiote with copy lanes off (one stream for a batch's IPC copies), same rotation")
    ap.add_argument("--ab-base", default="",
                    help="also time another version of aiote/moe.py (a file path), same engine and rotation")
    ap.add_argument("--ab-wait-spin", type=int, default=-1,
                    help="also time aiote with ExpertParallel.wait_spin_us = N (µs), same rotation")
    a = ap.parse_args(argv)
    a.ep_sizes = [int(x) for x in a.ep.split(",")]
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    base = f"{backend(a)} all_to_all_single"
    spin = f", loop_spin_us={a.loop_spin_us}" if a.loop_spin_us else ""
    print(f"{a.provider} ({a.polling}{spin}), {a.device}, {a.tokens} tokens x hidden {a.hidden} fp32, "
          f"top-{a.topk} of {a.experts} experts, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'EP':>3} {'system':<24} {'dispatch p50':>13} {'p99':>9} {'combine p50':>12} {'p99':>9} "
          f"{'CPU/step p50':>13}  (us)")
    for world in a.ep_sizes:
        why = skip_reason(a, world)
        if why:
            print(f"{world:>3} skipped: {why}")
            continue
        load0 = os.getloadavg()[0]
        res = run(world, a)
        load1 = os.getloadavg()[0]
        for key, name in (("aiote", "aiote"), ("aiote1", "aiote, one copy stream"), ("aiote0", "aiote, --ab-base"),
                          ("aiote2", f"aiote, wait spin {a.ab_wait_spin}"),
                          ("base", base)):
            if key not in res:
                continue
            d, c, cpu = res[key]
            print(f"{world:>3} {name:<24} {statistics.median(d):13.0f} {pct(d, 0.99):9.0f} "
                  f"{statistics.median(c):12.0f} {pct(c, 0.99):9.0f} {statistics.median(cpu):13.0f}")
        (ad, ac, _), (gd, gc, _) = res["aiote"], res["base"]
        print(f"{'':>3} {backend(a) + ' / aiote (p50)':<24} {statistics.median(gd) / statistics.median(ad):13.2f} "
              f"{'':>9} {statistics.median(gc) / statistics.median(ac):12.2f}   load {load0:.1f} -> {load1:.1f}")
        if "aiote1" in res:
            od, oc, _ = res["aiote1"]
            print(f"{'':>3} {backend(a) + ' / one-stream (p50)':<24} "
                  f"{statistics.median(gd) / statistics.median(od):13.2f} {'':>9} "
                  f"{statistics.median(gc) / statistics.median(oc):12.2f}")
        for key, label in (("aiote0", "--ab-base"), ("aiote2", "--ab-wait-spin")):
            if key in res:
                od, oc, _ = res[key]
                print(f"{'':>3} {backend(a) + ' / ' + label + ' (p50)':<24} "
                      f"{statistics.median(gd) / statistics.median(od):13.2f} {'':>9} "
                      f"{statistics.median(gc) / statistics.median(oc):12.2f}")
        if "lane_batches" in res:
            print(f"{'':>3} rank 0 batches over several copy streams: {int(res['lane_batches'][0][0])}")


if __name__ == "__main__":
    main()
