"""GPU->GPU write_imm across two processes, beside cudaMemcpyPeer and NCCL, in one run.

Needs a host with 2 GPUs.  Initiator on cuda:0, target on cuda:1, each its own process:

* aiote ``ipc``: the default on one host (CUDA IPC mapping, copy engines, imm after the copy);
* aiote ``staged``: ``cuda_ipc=False`` (the NIC path, ``--provider``), for reference: with the
  default mirror budget (each region a pinned mirror); ``--staged-only`` runs it beside
  ``staging_mirror_bytes=0`` (the bounce pools) in one run;
* ``memcpyPeer``: torch ``dst.copy_(src)`` between the two devices in one process;
* ``NCCL``: torch.distributed send/recv between two processes.

Bandwidth: ``iters`` transfers in flight, time until all are complete at the target
(aiote: every write future resolved = bytes in the target GPU and imm delivered).
Latency: one transfer at a time, median (aiote: awaited write; NCCL: ping-pong / 2;
memcpyPeer: copy + synchronize).

    python benchmarks/bench_gpu.py [--sizes 4K,...,256M] [--json out.json]
    python benchmarks/bench_gpu.py --staged-only [--provider shm] [--lat-iters 30] [--iters-div 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import time

import torch

SIZES = "4K,16K,64K,256K,1M,4M,16M,64M,256M"


def parse_size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


def iters_for(size: int) -> int:
    return max(8, min(400, (2 << 30) // size))


# ---- aiote ---------------------------------------------------------------------------


def _aiote_target(conn, max_size: int, ipc: bool, polling: str = "adaptive", provider: str = "shm",
                  kw: dict | None = None) -> None:
    import aiote

    async def main() -> None:
        host = None if provider == "shm" else "127.0.0.1"
        async with aiote.TransferEngine(provider, host=host, cuda_ipc=ipc, polling=polling, **(kw or {})) as eng:
            dst = eng.register(torch.zeros(max_size, dtype=torch.uint8, device="cuda:1"))
            conn.send(dst.descriptor.to_bytes())
            loop = asyncio.get_running_loop()
            done = asyncio.Event()
            loop.add_reader(conn.fileno(), done.set)
            await done.wait()
            conn.send(eng.gpu_stats)

    asyncio.run(main())


async def _aiote_run(sizes: list[int], ipc: bool, polling: str = "adaptive", provider: str = "shm",
                     kw: dict | None = None, lat_iters: int = 30, iters_div: int = 4) -> dict:
    """kw: both engines' extra options (e.g. staging_mirror_bytes=0: the bounce pools);
    the result has each size's numbers and, under "stats", both engines' gpu_stats."""
    import aiote

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_aiote_target, args=(child, max(sizes), ipc, polling, provider, kw), daemon=True)
    proc.start()
    out: dict = {}
    try:
        host = None if provider == "shm" else "127.0.0.1"
        async with aiote.TransferEngine(provider, host=host, cuda_ipc=ipc, polling=polling, **(kw or {})) as eng:
            src = eng.register(torch.randint(0, 256, (max(sizes),), dtype=torch.uint8, device="cuda:0"))
            loop = asyncio.get_running_loop()
            d = aiote.MrDescriptor.from_bytes(await loop.run_in_executor(None, parent.recv))
            for size in sizes:
                for _ in range(3):
                    await eng.write(src, d, size, imm=1)
                n = iters_for(size) if ipc else max(4, iters_for(size) // iters_div)
                t = time.perf_counter()
                await asyncio.gather(*(eng.write(src, d, size, imm=1) for _ in range(n)))
                bw = n * size / (time.perf_counter() - t) / 1e9
                lat, call = [], []
                for _ in range(lat_iters):
                    t = time.perf_counter()
                    f = eng.write(src, d, size, imm=2)
                    call.append((time.perf_counter() - t) * 1e6)
                    await f
                    lat.append((time.perf_counter() - t) * 1e6)
                out[size] = {"GB/s": bw, "lat_us": statistics.median(lat), "call_us": statistics.median(call)}
            out["stats"] = {"initiator": eng.gpu_stats}
    finally:
        parent.send(b"done")
        if parent.poll(30):
            out.setdefault("stats", {})["target"] = parent.recv()
        proc.join(30)
    return out


# ---- cudaMemcpyPeer ------------------------------------------------------------------


def memcpy_peer(sizes: list[int]) -> dict[int, dict[str, float]]:
    src = torch.randint(0, 256, (max(sizes),), dtype=torch.uint8, device="cuda:0")
    dst = torch.zeros(max(sizes), dtype=torch.uint8, device="cuda:1")
    out = {}
    for size in sizes:
        s, dd = src[:size], dst[:size]
        for _ in range(3):
            dd.copy_(s)
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        n = iters_for(size)
        t = time.perf_counter()
        for _ in range(n):
            dd.copy_(s, non_blocking=True)
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        bw = n * size / (time.perf_counter() - t) / 1e9
        lat = []
        for _ in range(30):
            t = time.perf_counter()
            dd.copy_(s, non_blocking=True)
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(1)
            lat.append((time.perf_counter() - t) * 1e6)
        out[size] = {"GB/s": bw, "lat_us": statistics.median(lat)}
    return out


# ---- NCCL ---------------------------------------------------------------------------


def _nccl_rank(rank: int, sizes: list[int], port: int, q) -> None:
    import torch.distributed as dist

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    buf = torch.zeros(max(sizes), dtype=torch.uint8, device=f"cuda:{rank}")
    out = {}
    for size in sizes:
        b = buf[:size]
        for _ in range(3):
            (dist.send if rank == 0 else dist.recv)(b, 1 - rank)
        torch.cuda.synchronize()
        dist.barrier()
        n = iters_for(size)
        t = time.perf_counter()
        reqs = [(dist.isend if rank == 0 else dist.irecv)(b, 1 - rank) for _ in range(n)]
        for r in reqs:
            r.wait()
        torch.cuda.synchronize()
        bw = n * size / (time.perf_counter() - t) / 1e9
        dist.barrier()
        lat = []
        for _ in range(30):
            t = time.perf_counter()
            if rank == 0:
                dist.send(b, 1)
                dist.recv(b, 1)
            else:
                dist.recv(b, 0)
                dist.send(b, 0)
            torch.cuda.synchronize()
            lat.append((time.perf_counter() - t) * 1e6 / 2)
        out[size] = {"GB/s": bw, "lat_us": statistics.median(lat)}
    if rank == 1:
        q.put(out)
    dist.destroy_process_group()


def nccl(sizes: list[int]) -> dict[int, dict[str, float]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_nccl_rank, args=(r, sizes, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = q.get(timeout=600)
    for p in procs:
        p.join(60)
    return res


def fmt(size: int) -> str:
    for unit, n in (("M", 1 << 20), ("K", 1 << 10)):
        if size >= n:
            return f"{size // n}{unit}"
    return str(size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=SIZES)
    ap.add_argument("--json")
    ap.add_argument("--polling", default="adaptive", choices=["adaptive", "busy", "blocking"],
                    help="both aiote engines' polling mode (default: the engine's default, adaptive)")
    ap.add_argument("--staged-only", action="store_true",
                    help="only the staged path, on --provider, both protocols: the mirror (default budget) "
                         "and the pools (staging_mirror_bytes=0) (docs/benchmarks.md#gpu)")
    ap.add_argument("--provider", default="shm")
    ap.add_argument("--lat-iters", type=int, default=30, help="writes timed one at a time per size (median)")
    ap.add_argument("--iters-div", type=int, default=4,
                    help="staged bandwidth: writes in flight per size = max(4, 2 GiB / size (8..400) / this)")
    a = ap.parse_args()
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    if a.staged_only:
        runs = {}
        for name, kw in (("mirror", {}), ("pools", {"staging_mirror_bytes": 0})):
            runs[name] = asyncio.run(_aiote_run(sizes, False, a.polling, a.provider, kw, a.lat_iters, a.iters_div))
            print(f"{name}: gpu_stats {runs[name].get('stats')}", flush=True)
        m, p = runs["mirror"], runs["pools"]
        print(f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, aiote staged on {a.provider}, "
              f"polling {a.polling}, {time.strftime('%Y-%m-%d %H:%M')}")
        print(" size | mirror GB/s | pools GB/s | pools/mirror | mirror lat us | pools lat us | mirror call us "
              "| pools call us")
        for s in sizes:
            print(f"{fmt(s):>5} | {m[s]['GB/s']:11.2f} | {p[s]['GB/s']:10.2f} | {p[s]['GB/s'] / m[s]['GB/s']:12.2f} "
                  f"| {m[s]['lat_us']:13.1f} | {p[s]['lat_us']:12.1f} | {m[s]['call_us']:14.1f} "
                  f"| {p[s]['call_us']:13.1f}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({n: {str(k): v for k, v in r.items()} for n, r in runs.items()}, f, indent=1)
        return
    results = {
        "aiote ipc": asyncio.run(_aiote_run(sizes, True, a.polling)),
        "aiote staged": asyncio.run(_aiote_run(sizes, False, a.polling)),
        "memcpyPeer": memcpy_peer(sizes),
        "NCCL": nccl(sizes),
    }
    names = list(results)
    print(f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("GB/s" + "".join(f" | {n:>12}" for n in names) + " | ipc/memcpyPeer | ipc/NCCL")
    for s in sizes:
        row = [results[n][s]["GB/s"] for n in names]
        print(f"{fmt(s):>5}" + "".join(f" | {v:12.2f}" for v in row)
              + f" | {row[0] / row[2]:14.2f} | {row[0] / row[3]:8.2f}")
    print("latency us" + "".join(f" | {n:>12}" for n in names) + " | NCCL/ipc")
    for s in sizes:
        row = [results[n][s]["lat_us"] for n in names]
        print(f"{fmt(s):>10}" + "".join(f" | {v:12.1f}" for v in row) + f" | {row[3] / row[0]:8.2f}")
    print("write() call us (returns the future)" + "".join(f" | {n:>12}" for n in names[:2]))
    for s in sizes:
        print(f"{fmt(s):>10}" + "".join(f" | {results[n][s]['call_us']:12.1f}" for n in names[:2]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({n: {str(k): v for k, v in r.items()} for n, r in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
