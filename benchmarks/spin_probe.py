#!/usr/bin/env python
"""Where a ping-pong's time goes (diagnostic for ``loop_spin_us``; not a benchmark).

    python benchmarks/spin_probe.py [shm|tcp] [LOOP_SPIN_US (0: off)] [adaptive|busy]

Both engines as in bench_write's latency test; prints p10/p50/p99 of the
``eng.write(…, imm=)`` call, of arming ``imms.wait(…, timeout=30)`` and of the
round trip, and how often the spinning loop polled its other fds (``select(0)``)
or slept in epoll.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

N = 3000


async def main(prov: str, spin: int, polling: str) -> None:
    import aiote
    from aiote import _spin

    kw = {"loop_spin_us": spin} if spin else {}
    counts = {"fd_polls": 0, "epoll_sleeps": 0}
    async with C.Target() as target:
        desc = await target.call("open", prov, polling, True, 64, kw)
        async with aiote.TransferEngine(prov, host=C.loopback_host(prov), polling=polling, **kw) as eng:
            mr = eng.register(bytearray(64))
            d = aiote.MrDescriptor.from_bytes(desc)
            pong = target.call("pong", mr.descriptor.to_bytes(), 64, N, 101, 202)
            w = _spin._wrappers.get(asyncio.get_running_loop())
            inner = w._inner if w is not None else None

            class Counting:
                def select(self, timeout: float | None = None) -> Any:
                    counts["fd_polls" if timeout == 0 else "epoll_sleeps"] += 1
                    return inner.select(timeout)

            if w is not None:
                w._inner = Counting()
            clk = time.perf_counter_ns
            tw, ta, tr = [], [], []
            for _ in range(N):
                t0 = clk()
                eng.write(mr, d, 64, 0, 0, imm=101)
                t1 = clk()
                f = eng.imms.wait(202, 1, timeout=30)
                t2 = clk()
                await f
                t3 = clk()
                tw.append(t1 - t0)
                ta.append(t2 - t1)
                tr.append(t3 - t0)
            if w is not None:
                w._inner = inner
            await pong
        await target.call("close")
    for name, v in (("write call", tw), ("wait arm", ta), ("round trip", tr)):
        v = sorted(v[200:])
        p = [v[int(len(v) * q)] / 1000 for q in (0.1, 0.5, 0.99)]
        print(f"{name:12s} p10 {p[0]:7.2f}  p50 {p[1]:7.2f}  p99 {p[2]:7.2f} us")
    print(counts)


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(main(a[0] if a else "shm", int(a[1]) if len(a) > 1 else 500, a[2] if len(a) > 2 else "adaptive"))
