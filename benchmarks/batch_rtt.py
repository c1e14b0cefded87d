"""Round trip of one prepared batch over tcp: post 32 small writes with an imm, await, repeat.

The peers driver's pipelined mode (benchmarks/peers) is this loop; here it runs longer (3,000
posts after 200 warm-up ones) and with the knobs that decide it: the target's polling mode,
the initiator's ``loop_spin_us`` and ``carry_max`` (0: every write an RMA write of its own).
The target is a PeerProcess (another process, default settings but ``--target-polling``).

    .venv/bin/python benchmarks/batch_rtt.py                      # default, then carry off
    .venv/bin/python benchmarks/batch_rtt.py --configs adaptive:0:8192,adaptive:500:8192,busy:0:0

Prints one JSON line per configuration: µs per post (round trip) and writes per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiote
from aiote.testing import PeerProcess


async def one(provider: str, target_polling: str, loop_spin_us: int, carry_max: int, size: int, batch: int,
              posts: int) -> dict:
    host = None if provider == "shm" else "127.0.0.1"
    async with aiote.TransferEngine(provider, host=host, loop_spin_us=loop_spin_us, carry_max=carry_max) as eng:
        async with PeerProcess(provider, polling=target_polling) as peer:
            rid, desc = await peer.call("register", size * batch, 0)
            d = aiote.MrDescriptor.from_bytes(desc)
            src = eng.register(bytearray(size * batch))
            prep = eng.prepare_scatter(src, [(d, i * size, i * size, size) for i in range(batch)], imm=1)
            for _ in range(200):
                await prep.post()
            t = time.perf_counter()
            for _ in range(posts):
                await prep.post()
            dt = time.perf_counter() - t
            assert await peer.call("wait_imm", 1, (200 + posts) * batch, 30)
            prep.close()
            s = eng.stats()
    return {"provider": provider, "target_polling": target_polling, "loop_spin_us": loop_spin_us,
            "carry_max": carry_max, "size": size, "batch": batch, "posts": posts,
            "rtt_us": round(dt / posts * 1e6, 1), "writes_per_s": round(batch * posts / dt),
            "writes_carried": s["writes_carried"]}


async def amain(args: argparse.Namespace) -> None:
    for _ in range(args.rounds):
        for cfg in args.configs.split(","):
            tp, spin, carry = cfg.split(":")
            print(json.dumps(await one(args.provider, tp, int(spin), int(carry), args.size, args.batch,
                                       args.posts)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--provider", default="tcp")
    p.add_argument("--configs", default="adaptive:0:8192,adaptive:0:0",
                   help="target_polling:initiator_loop_spin_us:carry_max, comma-separated")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--posts", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=1)
    asyncio.run(amain(p.parse_args()))


if __name__ == "__main__":
    main()
