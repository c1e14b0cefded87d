"""Two processes on loopback: one writes 1 MiB with an imm, the other awaits it.

    python examples/hello_write_imm.py [--provider shm|tcp]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time

import aiote


async def receiver(conn, provider: str) -> None:
    host = None if provider == "shm" else "127.0.0.1"
    async with aiote.TransferEngine(provider, host=host) as eng:
        buf = bytearray(1 << 20)
        mr = eng.register(buf)
        conn.send(mr.descriptor.to_bytes())  # the descriptor is all the writer needs
        await eng.imms.wait(42, count=1, timeout=30)
        conn.send(bytes(buf[:16]) + bytes(buf[-16:]))


async def writer(desc: bytes, provider: str) -> float:
    host = None if provider == "shm" else "127.0.0.1"
    async with aiote.TransferEngine(provider, host=host) as eng:
        src = bytearray(b"aiote!" * ((1 << 20) // 6) + b"\0" * ((1 << 20) % 6))
        mr = eng.register(src)
        t0 = time.perf_counter()
        await eng.write(mr, aiote.MrDescriptor.from_bytes(desc), imm=42)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--provider", default="shm", choices=["shm", "tcp"])
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_receiver_main, args=(child, args.provider))
    p.start()
    desc = parent.recv()
    dt = asyncio.run(writer(desc, args.provider))
    got = parent.recv()
    p.join()
    ok = got.startswith(b"aiote!") and p.exitcode == 0
    print(f"{args.provider}: wrote 1 MiB with imm 42 in {dt * 1e6:.0f} us; receiver saw {got[:12]!r}... "
          f"{'OK' if ok else 'MISMATCH'}")
    raise SystemExit(0 if ok else 1)


def _receiver_main(conn, provider: str) -> None:
    asyncio.run(receiver(conn, provider))


if __name__ == "__main__":
    main()
