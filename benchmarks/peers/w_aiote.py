#!/usr/bin/env python
"""aiote side of the peers benchmark (runs from the project's .venv).

    w_aiote.py target    --provider shm|tcp [--polling adaptive]
    w_aiote.py initiator --provider shm|tcp --ctl-port P --sizes 64,4096,...

Modes per size: ``pipe`` = batches of 32 writes, every write with the imm,
each batch awaited before the next — as NIXL (a prepared 32-write transfer,
posted again and again) and Mooncake (``batch_transfer_sync_write`` of 32)
are driven.  ``--pipe prepared`` (default): the batch is prepared once per
size (``eng.prepare_scatter``) and each round is one ``post()``, as NIXL's
prepped transfer; ``--pipe batch``: one ``eng.scatter(..., imm)`` call per
round (the runs of 2026-11-27 18:28 to 2026-11-28); ``--pipe tasks``: 32
coroutines each awaiting ``eng.write(..., imm)`` in turn (bench_write's
driver, the runs before 2026-11-27 18:20).  ``one`` = one awaited write at a
time.  ``--loop-spin-us N``: both engines in latency mode (the event loop
spins up to N µs on the engine's events instead of sleeping; NIXL's and
fi_bench's pollers spin too).  Buffers are numpy arrays, as in the Mooncake and NIXL workers
(numpy asks for transparent huge pages on large arrays; see _ctl.buffer).
Complete = the write's future resolved: with ``delivery_complete=True``
(aiote's default) the bytes are in the target's memory.  The target then
waits for the imm count of every write and checks the bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _ctl as K  # noqa: E402


def _host(provider: str) -> str | None:
    return None if provider == "shm" else "127.0.0.1"


def _buffer(mem: str) -> Any:
    if mem == "bytearray":  # 4 KiB pages (THP=madvise): what bench_write measures
        import numpy as np

        return np.frombuffer(bytearray(b"\0") * K.MAX_SIZE, dtype=np.uint8)
    return K.buffer()


async def target(args: argparse.Namespace) -> None:
    import aiote

    loop = asyncio.get_running_loop()
    async with aiote.TransferEngine(args.provider, host=_host(args.provider), polling=args.polling,
                                    loop_spin_us=args.loop_spin_us) as eng:
        buf = _buffer(args.mem)
        mr = eng.register(buf)
        srv = K.listen()
        K.ready(srv, version=getattr(aiote, "__version__", "?"), provider=eng.provider)
        ctl = await loop.run_in_executor(None, K.accept, srv)
        ctl.send({"desc": mr.descriptor.to_bytes().hex()})
        while True:
            # blocking socket read in a thread: the loop must keep serving aiote's events
            msg = await loop.run_in_executor(None, ctl.recv)
            if msg["cmd"] == "check":
                size, val = msg["size"], msg["val"]
                await eng.imms.wait(msg["imm"], msg["count"], timeout=60)
                ctl.send({"ok": bool((buf[:size] == val).all())})
            elif msg["cmd"] == "exit":
                ctl.send({"ok": True})
                break
        ctl.close()
        mr.close()


async def _pipelined(eng: Any, mr: Any, d: Any, size: int, imm: int, n: int) -> None:
    """n writes, INFLIGHT coroutines each awaiting its writes in turn (bench_write's driver)."""
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await eng.write(mr, d, size, 0, 0, imm=imm)

    await asyncio.gather(*(worker() for _ in range(K.INFLIGHT)))


async def _batched(eng: Any, mr: Any, d: Any, size: int, imm: int, n: int) -> None:
    """n writes as n / INFLIGHT batches of INFLIGHT, one scatter call each, awaited in turn."""
    batch = [(d, 0, 0, size)] * K.INFLIGHT
    for _ in range(n // K.INFLIGHT):
        await eng.scatter(mr, batch, imm=imm)


async def _prepared(eng: Any, mr: Any, d: Any, size: int, imm: int, n: int) -> None:
    """n writes as n / INFLIGHT posts of one prepared batch of INFLIGHT (checked once), awaited in turn."""
    prep = eng.prepare_scatter(mr, [(d, 0, 0, size)] * K.INFLIGHT, imm=imm)
    post = prep.post
    for _ in range(n // K.INFLIGHT):
        await post()
    prep.close()


_PIPE = {"prepared": _prepared, "batch": _batched, "tasks": _pipelined}


async def initiator(args: argparse.Namespace) -> None:
    import aiote

    loop = asyncio.get_running_loop()
    ctl = K.connect(args.ctl_port)
    hello = ctl.recv()
    async with aiote.TransferEngine(args.provider, host=_host(args.provider), polling=args.polling,
                                    loop_spin_us=args.loop_spin_us) as eng:
        src = _buffer(args.mem)
        mr = eng.register(src)
        d = aiote.MrDescriptor.from_bytes(bytes.fromhex(hello["desc"]))
        for size in K.sizes_arg(args.sizes):
            for mode in ("pipe", "one"):
                val = K.pattern(size, mode)
                src[:size] = val
                imm = val  # one imm per (size, mode): the target counts exactly these writes
                warm = K.warm_ops(size)
                await asyncio.gather(*(eng.write(mr, d, size, 0, 0, imm=imm) for _ in range(warm)))
                lat: list[float] = []
                if mode == "pipe":
                    n = K.pipe_ops(size)
                    t0 = K.now()
                    await _PIPE[args.pipe](eng, mr, d, size, imm, n)
                    dt = K.now() - t0
                else:
                    n = K.one_ops(size)
                    t0 = K.now()
                    for _ in range(n):
                        t = K.now()
                        await eng.write(mr, d, size, 0, 0, imm=imm)
                        lat.append(K.now() - t)
                    dt = K.now() - t0
                r: dict[str, Any] = await loop.run_in_executor(
                    None, ctl.call, {"cmd": "check", "size": size, "val": val, "imm": imm, "count": warm + n}
                )
                if not r["ok"]:
                    raise RuntimeError(f"target buffer does not hold the written bytes ({size} B, {mode})")
                K.emit(K.result("aiote", mode, size, n, dt, lat, polling=args.polling, pipe=args.pipe,
                                loop_spin_us=args.loop_spin_us))
        mr.close()
    ctl.call({"cmd": "exit"})
    ctl.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", choices=["target", "initiator"])
    p.add_argument("--provider", default="shm", choices=["shm", "tcp"])
    p.add_argument("--polling", default="adaptive", choices=["adaptive", "busy", "blocking"])
    p.add_argument("--pipe", default="prepared", choices=list(_PIPE),
                   help="pipelined mode: a prepared batch of 32 posted per round (like NIXL's prepped transfer), "
                        "a scatter call of 32 per round, or 32 coroutines of single writes")
    p.add_argument("--loop-spin-us", type=int, default=0,
                   help="latency mode: the event loop spins this long on the engine's events (0: off)")
    p.add_argument("--ctl-port", type=int, default=0)
    p.add_argument("--sizes", default="64,4096")
    p.add_argument("--mem", default="numpy", choices=["numpy", "bytearray"],
                   help="buffers: numpy (huge pages, as the peers) or bytearray (4 KiB pages)")
    args = p.parse_args()
    asyncio.run(target(args) if args.role == "target" else initiator(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
