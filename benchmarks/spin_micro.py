#!/usr/bin/env python
"""Per-call costs on the ping-pong's path (diagnostic for ``loop_spin_us``; not a benchmark).

    python benchmarks/spin_micro.py [shm|tcp]

Best of 3 loops of 20 000 (5 000) calls each, with a target engine in another process.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def timed(name: str, fn: Callable[[], Any], n: int = 20000) -> None:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n / 1000)
    print(f"{name:40s} {best:7.3f} us")


async def main(prov: str) -> None:
    import aiote
    from aiote._core import lib

    loop = asyncio.get_running_loop()
    async with C.Target() as target:
        desc = await target.call("open", prov, "adaptive", True, 64, {})
        async with aiote.TransferEngine(prov, host=C.loopback_host(prov)) as eng:
            mr = eng.register(bytearray(64))
            d = aiote.MrDescriptor.from_bytes(desc)
            await eng.write(mr, d, 64, imm=7)
            h = eng._h
            timed("cffi aiote_events_pending", lambda: lib.aiote_events_pending(h))
            timed("loop.create_future", loop.create_future)
            timed("loop.call_later(30) + cancel", lambda: loop.call_later(30, int).cancel())
            timed("eng.write 64 B, no imm", lambda: eng.write(mr, d, 64))
            timed("eng.write 64 B, imm", lambda: eng.write(mr, d, 64, imm=7), 5000)
            for timeout in (None, 30):
                futs: list[Any] = []
                timed(f"imms.wait (timeout={timeout})",
                      lambda t=timeout, fs=futs: fs.append(eng.imms.wait(9, 1, timeout=t)), 5000)
                for f in futs:
                    f.cancel()
                await asyncio.sleep(0)
            print(eng.stats()["direct_writes"], "direct writes")
        await target.call("close")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "shm"))
