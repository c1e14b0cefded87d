#!/usr/bin/env python
"""CPU per write, per thread of both processes: a prepared batch of 32 SIZE-byte writes with an
imm, posted and awaited in turn for SECS seconds (the peers driver's pipelined mode), with the
target in a spawned child; prints ops/s and, from /proc/<pid>/task/<tid>/schedstat deltas, each
busy thread's run and run-queue wait in µs per write and its context switches per batch.

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_per_write.py 64 2

argv: size, seconds.  Env: KW / KWT, JSON TransferEngine keywords of the initiator / target;
PROV (default tcp)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np

SIZE = int(sys.argv[1]) if len(sys.argv) > 1 else 64
SECS = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
PROV = os.environ.get("PROV", "tcp")
HOST = None if PROV == "shm" else "127.0.0.1"
BATCH = 32


def threads(pid: int) -> dict[str, tuple[int, int, int]]:
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                r, w, n = map(int, f.read().split())
        except OSError:
            continue
        out[t] = (r, w, n)
    return out


def target(q: mp.Queue, done: mp.Event) -> None:
    import aiote

    async def main() -> None:
        async with aiote.TransferEngine(PROV, host=HOST, **json.loads(os.environ.get("KWT", "{}"))) as eng:
            mr = eng.register(np.zeros(64 << 20, dtype=np.uint8))
            q.put(mr.descriptor.to_bytes())
            await asyncio.get_running_loop().run_in_executor(None, done.wait)

    asyncio.run(main())


async def initiator(desc: bytes, child: int) -> None:
    import aiote

    async with aiote.TransferEngine(PROV, host=HOST, **json.loads(os.environ.get("KW", "{}"))) as eng:
        mr = eng.register(np.ones(64 << 20, dtype=np.uint8))
        d = aiote.MrDescriptor.from_bytes(desc)
        prep = eng.prepare_scatter(mr, [(d, 0, 0, SIZE)] * BATCH, imm=7)
        for _ in range(300):
            await prep.post()
        pids = {"init": os.getpid(), "targ": child}
        a = {k: threads(p) for k, p in pids.items()}
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < SECS:
            for _ in range(100):
                await prep.post()
            n += 100 * BATCH
        dt = time.perf_counter() - t0
        b = {k: threads(p) for k, p in pids.items()}
        prep.close()
    print(f"{PROV} {SIZE} B: {n / dt / 1e3:.1f} k ops/s, {dt / n * 1e6:.2f} us/op, load {os.getloadavg()[0]:.1f}")
    for k, p in pids.items():
        for t, (r, w, c) in b[k].items():
            if t not in a[k]:
                continue
            r0, w0, c0 = a[k][t]
            run = (r - r0) / n / 1e3
            if run > 0.05:
                name = "loop" if t == str(p) else "thread"
                print(f"  {k} {name} {t}: run {run:.2f} us/op, wait {(w - w0) / n / 1e3:.2f} us/op, "
                      f"switches {(c - c0) / n * BATCH:.2f}/batch")


def main() -> int:
    mp.set_start_method("spawn")
    q: mp.Queue = mp.Queue()
    done = mp.Event()
    p = mp.Process(target=target, args=(q, done))
    p.start()
    try:
        asyncio.run(initiator(q.get(timeout=60), p.pid))
    finally:
        done.set()
        p.join(30)
        if p.is_alive():
            p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
