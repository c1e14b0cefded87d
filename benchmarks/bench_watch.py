"""Trigger latency of watchers: a word is written -> the worker sees it (and posts the
prepared transfer) -> the receiver's coroutine resumes.

Beside it, in the same run, the Python-callback way (a Python thread polls the word
and hands the write to the event loop), as pplx-garden's UVM watcher does.

    python benchmarks/bench_watch.py [--provider shm] [--n 2000] [--polling adaptive] [--gpu]

``--gpu``: the word is device-mapped and written by a CUDA kernel (``w.tensor.fill_``);
t0 is taken just before the kernel is launched, so launch latency is included.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import statistics
import threading
import time

import aiote


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def row(name: str, xs: list[float]) -> str:
    return (f"{name:<44} p50 {statistics.median(xs):8.1f}  p99 {pct(xs, 0.99):8.1f}  "
            f"mean {statistics.fmean(xs):8.1f}  max {max(xs):9.1f}  (us, n={len(xs)})")


async def c_reaction(provider: str, polling: str, n: int, gpu: bool) -> tuple[list[float], list[float]]:
    host = "127.0.0.1" if provider == "tcp" else None
    async with aiote.TransferEngine(provider, host=host, polling=polling) as a, \
            aiote.TransferEngine(provider, host=host, polling=polling) as b:
        src, dst = a.register(bytearray(64)), b.register(bytearray(64))
        prep = a.prepare_write(src, dst.descriptor, imm=1)
        w = a.watcher(cuda=gpu)
        word = w.tensor if gpu else None
        await a.write(src, dst.descriptor, imm=2)  # connect
        await b.imms.wait(2)
        seen, resumed = [], []
        for i in range(1, n + 1):
            fired, sight, landed = w.arm(i, prep), w.wait(i), b.imms.wait(1)
            t0 = time.monotonic_ns()
            if gpu:
                word.fill_(i)
            else:
                w.set(i)
            await sight
            await landed
            resumed.append((time.monotonic_ns() - t0) / 1e3)
            seen.append((w.last_seen_ns - t0) / 1e3)
            await fired
        w.close()
        prep.close()
        return seen, resumed


async def python_poller(provider: str, polling: str, n: int) -> list[float]:
    """Baseline: a Python thread spins on the word and calls into the loop."""
    host = "127.0.0.1" if provider == "tcp" else None
    async with aiote.TransferEngine(provider, host=host, polling=polling) as a, \
            aiote.TransferEngine(provider, host=host, polling=polling) as b:
        src, dst = a.register(bytearray(64)), b.register(bytearray(64))
        word = ctypes.c_uint64(0)
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def poll() -> None:
            last = 0
            while not stop.is_set():
                v = word.value
                if v != last:
                    last = v
                    loop.call_soon_threadsafe(a.write, src, dst.descriptor, 64, 0, 0, 1)

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        out = []
        try:
            for i in range(1, n + 1):
                landed = b.imms.wait(1)
                t0 = time.monotonic_ns()
                word.value = i
                await landed
                out.append((time.monotonic_ns() - t0) / 1e3)
        finally:
            stop.set()
            t.join()
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", default="shm")
    ap.add_argument("--polling", default="adaptive")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--gpu", action="store_true")
    a = ap.parse_args()
    seen, resumed = asyncio.run(c_reaction(a.provider, a.polling, a.n, a.gpu))
    base = asyncio.run(python_poller(a.provider, a.polling, a.n))
    print(f"{a.provider}, polling={a.polling}, writer={'GPU kernel' if a.gpu else 'CPU store'}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(row("aiote C reaction: word -> seen by worker", seen))
    print(row("aiote C reaction: word -> receiver resumes", resumed))
    print(row("Python poller: word -> receiver resumes", base))


if __name__ == "__main__":
    main()
