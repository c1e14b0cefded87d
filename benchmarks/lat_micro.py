#!/usr/bin/env python
"""Per-call costs of the imm latency path, one process (diagnostic for issue 2; not a benchmark).

    python benchmarks/lat_micro.py [N]

Two shm engines in this process on one spinning loop (``loop_spin_us=500``), so that
the numbers need no second process and no second core: good for A/B of two builds in
the same minute (``PYTHONPATH=BUILD_DIR``).  Prints, best of 5 loops of N (20 000):

* ``cycle t=...``: ``a.write(…, imm=1)`` then ``await b.imms.wait(1, 1, timeout=t)``,
  the whole half round trip of bench_write's ping-pong without the other process;
* ``C write`` / ``write``: ``aiote_submit_write`` called directly vs ``eng.write()``;
* ``arm+fire``: ``imms.wait`` + a counted arrival + the drain that resolves it;
* ``arm`` / ``write`` / ``land->resume`` (p50): the three parts of one cycle, timed
  inside it (``land->resume``: from the write's return to the coroutine running again).
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import Callable
from typing import Any


def best_of(fn: Callable[[], Any], n: int, reps: int = 5) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n / 1000)
    return best


async def main(n: int) -> None:
    import aiote
    from aiote._core import ffi, lib

    async with aiote.TransferEngine("shm", loop_spin_us=500) as a, aiote.TransferEngine("shm", loop_spin_us=500) as b:
        d = b.register(bytearray(64)).descriptor
        src = a.register(bytearray(64))
        await a.write(src, d, 64, imm=1)
        await b.imms.wait(1, 1)
        out: dict[str, float] = {}
        for t in (None, 30):
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter_ns()
                for _ in range(n):
                    a.write(src, d, 64, 0, 0, imm=1)
                    await b.imms.wait(1, 1, timeout=t)
                best = min(best, (time.perf_counter_ns() - t0) / n / 1000)
            out[f"cycle t={t}"] = best
        clock = time.perf_counter_ns
        parts: dict[str, list[int]] = {"arm": [], "write": [], "land->resume": []}
        for _ in range(n):
            t0 = clock()
            w = b.imms.wait(1, 1, timeout=30)
            t1 = clock()
            a.write(src, d, 64, 0, 0, imm=1)
            t2 = clock()
            await w
            t3 = clock()
            parts["arm"].append(t1 - t0)
            parts["write"].append(t2 - t1)
            parts["land->resume"].append(t3 - t2)
        h, mr = a._h, src._mr_id()
        wr = ffi.new("aiote_wr[1]")
        wr[0].rdesc, wr[0].len = a._rdesc(d), 64
        bad, ids = ffi.new("uint64_t*"), itertools.count(1 << 40)
        out["C write"] = best_of(lambda: lib.aiote_submit_writes(h, next(ids), mr, wr, 1, 1, 3, bad), n)
        out["write"] = best_of(lambda: a.write(src, d, 64, 0, 0, imm=3), n)

        def arm_fire(t: float | None) -> None:
            b.imms.wait(2, 1, timeout=t)
            b._imm_arrive(2, 1)
            b._drain()

        out["arm+fire t=None"] = best_of(lambda: arm_fire(None), n)
        out["arm+fire t=30"] = best_of(lambda: arm_fire(30), n)
        for k, v in parts.items():
            v.sort()
            out[f"{k} p50"] = v[len(v) // 2] / 1000
    print("  ".join(f"{k} {v:.2f}" for k, v in out.items()), "(µs)")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))
