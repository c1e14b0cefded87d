"""Where one GPU->GPU write's time goes (aiote CUDA IPC path, 4 KiB, 2 GPUs).

Medians of 50: a copy alone through the C core (queued, its event polled by the
worker, the future resolved in the event loop), an imm-only write, a whole write,
the ``write()`` call alone (Python + queuing the copy, not its completion), and an
empty event-loop turn.

    PYTHONPATH=$PWD python3 benchmarks/gpu_latency_probe.py
"""

import asyncio
import multiprocessing as mp
import statistics
import sys
import time

import torch

import aiote

sys.path.insert(0, "benchmarks")
from bench_gpu import _aiote_target  # noqa: E402


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 1)


async def main() -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_aiote_target, args=(child, 1 << 20, True), daemon=True)
    p.start()
    async with aiote.TransferEngine("shm") as eng:
        src = eng.register(torch.ones(1 << 20, dtype=torch.uint8, device="cuda:0"))
        loop = asyncio.get_running_loop()
        d = aiote.MrDescriptor.from_bytes(await loop.run_in_executor(None, parent.recv))
        g = eng._gpu_paths()
        for _ in range(5):
            await eng.write(src, d, 4096, imm=1)
        a: list[float] = []
        b: list[float] = []
        c: list[float] = []
        e: list[float] = []
        f: list[float] = []
        ptr = src.cuda.ptr
        for _ in range(50):
            t = time.perf_counter()
            await g._gated(0, (0, 0), [(ptr + (512 << 10), ptr, 4096)], src, d, [], None)
            a.append((time.perf_counter() - t) * 1e6)
            t = time.perf_counter()
            await eng._imm_only(d, 5, 1)
            b.append((time.perf_counter() - t) * 1e6)
            t = time.perf_counter()
            await eng.write(src, d, 4096, imm=1)
            c.append((time.perf_counter() - t) * 1e6)
            t = time.perf_counter()
            w = eng.write(src, d, 4096, imm=1)
            f.append((time.perf_counter() - t) * 1e6)
            await w
            t = time.perf_counter()
            await asyncio.sleep(0)
            e.append((time.perf_counter() - t) * 1e6)
        print("copy alone", med(a), "imm_only", med(b), "write", med(c), "write() call", med(f),
              "loop turn", med(e))
        # the write's parts, back to back (no other operation in between)
        ext = d.cuda
        base = g._ipc_maps[(ext.pid, ext.ipc_handle)] + ext.ipc_offset
        parts: dict[str, list[float]] = {k: [] for k in ("torch stream", "submit_cuda call", "submit_cuda total",
                                                          "write call", "write total", "imm_only total")}
        for _ in range(200):
            t0 = time.perf_counter()
            w = g._torch_stream(0)
            t1 = time.perf_counter()
            fut = eng._submit_cuda(g._ctx(0), g._stream(0), w, [(base, ptr, 4096)], src, d, [(0, 0, 0)], 1)
            t2 = time.perf_counter()
            await fut
            t3 = time.perf_counter()
            fut = eng.write(src, d, 4096, imm=1)
            t4 = time.perf_counter()
            await fut
            t5 = time.perf_counter()
            await eng._imm_only(d, 5, 1)
            t6 = time.perf_counter()
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t1, t4 - t3, t5 - t3, t6 - t5)):
                parts[k].append(v * 1e6)
        print("  ".join(f"{k} {med(v)}" for k, v in parts.items()))
    parent.send(b"x")
    p.join(10)


if __name__ == "__main__":
    asyncio.run(main())
