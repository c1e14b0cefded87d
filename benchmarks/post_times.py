#!/usr/bin/env python
"""Per-post times of one window like the peers driver's pipelined point, over tcp.

    .venv/bin/python benchmarks/post_times.py [--posts 625] [--sizes 64,4096] [--rounds 1]

A fresh engine and a fresh target process (``PeerProcess``) per round, then per size: 32
single writes gathered (the driver's warm-up), 625 posts of a prepared batch of 32
writes to offset 0 with an imm, each post timed.  Prints per size the window's rate,
the first posts, p50/p90/p99/max and the time spent in posts over 200 µs: one-time
costs inside the window (a provider's first send growing its buffer pools, the carried
writes' hello) show there and not in a longer run such as batch_rtt.py.  Then 3,000
one-at-a-time writes (p50/p90/p99).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiote
from aiote.testing import PeerProcess


async def one_round(sizes: list[int], posts: int, warm: int = 32) -> None:
    async with aiote.TransferEngine("tcp", host="127.0.0.1") as eng:
        async with PeerProcess("tcp") as peer:
            _, desc = await peer.call("register", 1 << 20, 0)
            d = aiote.MrDescriptor.from_bytes(desc)
            src = eng.register(bytearray(1 << 20))
            for size in sizes:
                await asyncio.gather(*(eng.write(src, d, size, 0, 0, imm=size) for _ in range(warm)))
                prep = eng.prepare_scatter(src, [(d, 0, 0, size)] * 32, imm=size)
                ts = []
                t0 = time.perf_counter()
                for _ in range(posts):
                    t = time.perf_counter()
                    await prep.post()
                    ts.append((time.perf_counter() - t) * 1e6)
                dt = time.perf_counter() - t0
                prep.close()
                q = statistics.quantiles(ts, n=100)
                slow = sum(x for x in ts if x > 200)
                print(f"{size:>6} B  {32 * posts / dt / 1e3:7.0f} k writes/s  first {[round(x) for x in ts[:6]]} µs  "
                      f"p50 {q[49]:.1f} p90 {q[89]:.1f} p99 {q[98]:.1f} max {max(ts):.0f} µs  "
                      f"in posts > 200 µs: {slow / 1e3:.1f} of {dt * 1e3:.1f} ms", flush=True)
                lat = []
                for _ in range(3000):
                    t = time.perf_counter()
                    await eng.write(src, d, size, 0, 0, imm=size)
                    lat.append((time.perf_counter() - t) * 1e6)
                q = statistics.quantiles(lat, n=100)
                print(f"{size:>6} B  one at a time: p50 {q[49]:.1f} p90 {q[89]:.1f} p99 {q[98]:.1f} µs", flush=True)
                assert await peer.call("wait_imm", size, warm + posts * 32 + 3000, 30)  # every write landed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--posts", type=int, default=625)
    p.add_argument("--sizes", default="64,4096")
    p.add_argument("--rounds", type=int, default=1)
    a = p.parse_args()
    for _ in range(a.rounds):
        asyncio.run(one_round([int(x) for x in a.sizes.split(",")], a.posts))


if __name__ == "__main__":
    main()
