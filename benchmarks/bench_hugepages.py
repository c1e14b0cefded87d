"""shm write throughput from a plain bytearray vs an aiote.host_buffer (2 MiB pages), A/B.

Per round and kind: a PeerProcess with a 16 MiB bytearray region, the source
region registered from ``bytearray(16 MiB)`` or ``aiote.host_buffer(16 MiB)``,
4 warm-up writes, then 64 pipelined 16 MiB writes timed; rounds alternate the
kinds so both see the same machine.  Prints the median and every round's GB/s.

    python benchmarks/bench_hugepages.py [--rounds 3] [--size-mib 16] [--writes 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiote
from aiote.testing import PeerProcess


async def one(kind: str, size: int, writes: int) -> float:
    async with aiote.TransferEngine("shm") as eng, PeerProcess("shm") as peer:
        _, d = await peer.call("register", size, 0)
        d = aiote.MrDescriptor.from_bytes(d)
        src = eng.register(aiote.host_buffer(size) if kind == "host_buffer" else bytearray(size))
        for _ in range(4):
            await eng.write(src, d)
        t = time.perf_counter()
        await asyncio.gather(*(eng.write(src, d) for _ in range(writes)))
        return writes * size / (time.perf_counter() - t) / 1e9


async def main(a: argparse.Namespace) -> None:
    res: dict[str, list[float]] = {"bytearray": [], "host_buffer": []}
    for _ in range(a.rounds):
        for kind in res:
            res[kind].append(await one(kind, a.size_mib << 20, a.writes))
    for kind, v in res.items():
        print(f"{kind:<12} median {statistics.median(v):6.2f} GB/s  runs {[round(x, 2) for x in v]}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=16)
    ap.add_argument("--writes", type=int, default=64)
    asyncio.run(main(ap.parse_args()))
