#!/usr/bin/env python
"""Batches of 32 writes with an imm, awaited one after another: ``scatter()`` per round
against a prepared batch's ``post()`` (and one awaited write at a time), on one engine,
modes alternating per rep (order flipped), so both see the same load.

    PYTHONPATH=. .venv/bin/python benchmarks/prepared_probe.py shm 64 2000 scatter,prep
    PYTHONPATH=. .venv/bin/python benchmarks/prepared_probe.py tcp 64 20 one

argv: provider (shm|tcp), size, rounds per rep, modes (scatter, prep, one).  Env: REPS
(default 10), KW / KWT: JSON TransferEngine keywords of the initiator / target.  The target
runs in a child process and keeps its numpy region; prints median (min–max) ops/s per mode.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np

PROV = sys.argv[1] if len(sys.argv) > 1 else "shm"
SIZE = int(sys.argv[2]) if len(sys.argv) > 2 else 64
NB = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
MODES = (sys.argv[4] if len(sys.argv) > 4 else "scatter,prep").split(",")
REPS = int(os.environ.get("REPS", "10"))
HOST = None if PROV == "shm" else "127.0.0.1"
BATCH = 32


def target(q: mp.Queue, done: mp.Event) -> None:
    import aiote

    async def main() -> None:
        async with aiote.TransferEngine(PROV, host=HOST, **json.loads(os.environ.get("KWT", "{}"))) as eng:
            mr = eng.register(np.zeros(64 << 20, dtype=np.uint8))
            q.put(mr.descriptor.to_bytes())
            await asyncio.get_running_loop().run_in_executor(None, done.wait)

    asyncio.run(main())


async def initiator(desc: bytes) -> None:
    import aiote

    async with aiote.TransferEngine(PROV, host=HOST, **json.loads(os.environ.get("KW", "{}"))) as eng:
        mr = eng.register(np.ones(64 << 20, dtype=np.uint8))
        d = aiote.MrDescriptor.from_bytes(desc)
        batch = [(d, 0, 0, SIZE)] * BATCH
        for _ in range(100):
            await eng.scatter(mr, batch, imm=7)
        prep = eng.prepare_scatter(mr, batch, imm=7)
        res: dict[str, list[float]] = {m: [] for m in MODES}
        for rep in range(REPS):
            for m in MODES if rep % 2 == 0 else MODES[::-1]:
                t0 = time.perf_counter()
                if m == "scatter":
                    for _ in range(NB):
                        await eng.scatter(mr, batch, imm=7)
                elif m == "prep":
                    for _ in range(NB):
                        await prep.post()
                elif m == "one":
                    for _ in range(NB * BATCH):
                        await eng.write(mr, d, SIZE, 0, 0, imm=7)
                res[m].append(NB * BATCH / (time.perf_counter() - t0))
        prep.close()
        for m in MODES:
            r = sorted(res[m])
            med = statistics.median(r)
            print(f"{PROV} {SIZE} B {m:8s}: {med / 1e6:.3f} M ops/s ({r[0] / 1e6:.3f}-{r[-1] / 1e6:.3f}), "
                  f"{1e6 / med:.2f} us/op, load {os.getloadavg()[0]:.1f}")


def main() -> int:
    mp.set_start_method("spawn")
    q: mp.Queue = mp.Queue()
    done = mp.Event()
    p = mp.Process(target=target, args=(q, done))
    p.start()
    try:
        asyncio.run(initiator(q.get(timeout=60)))
    finally:
        done.set()
        p.join(30)
        if p.is_alive():
            p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
