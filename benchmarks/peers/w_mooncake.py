#!/usr/bin/env python
"""Mooncake Transfer Engine side of the peers benchmark (peers' venv).

    w_mooncake.py target
    w_mooncake.py initiator --ctl-port P --sizes 64,4096,...

``mooncake-transfer-engine-non-cuda``, protocol ``tcp``, metadata
``P2PHANDSHAKE`` (no metadata server: the segment name is host:rpc_port).
Modes per size: ``pipe`` = ``batch_transfer_sync_write`` of 32 writes, repeated;
``one`` = ``transfer_sync_write``, one at a time.  Complete = the sync call
returned success on the initiator (Mooncake gives the target no per-write
signal); the target checks the bytes after each point.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _ctl as K  # noqa: E402


def _engine() -> Any:
    from mooncake.engine import TransferEngine

    eng = TransferEngine()
    rc = eng.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        raise RuntimeError(f"mooncake TransferEngine.initialize(127.0.0.1, P2PHANDSHAKE, tcp) returned {rc}")
    return eng


def _buffer(eng: Any) -> Any:
    buf = K.buffer()
    rc = eng.register_memory(buf.ctypes.data, K.MAX_SIZE)
    if rc != 0:
        raise RuntimeError(f"mooncake register_memory returned {rc}")
    return buf


def target() -> None:
    eng = _engine()
    buf = _buffer(eng)
    srv = K.listen()
    K.ready(srv, version=K.pkg_version("mooncake-transfer-engine-non-cuda"))
    ctl = K.accept(srv)
    ctl.send({"segment": f"127.0.0.1:{eng.get_rpc_port()}", "addr": buf.ctypes.data})
    while True:
        msg = ctl.recv()
        if msg["cmd"] == "check":
            size, val = msg["size"], msg["val"]
            ctl.send({"ok": bool((buf[:size] == val).all())})
        elif msg["cmd"] == "exit":
            ctl.send({"ok": True})
            break
    ctl.close()


def initiator(args: argparse.Namespace) -> None:
    ctl = K.connect(args.ctl_port)
    hello = ctl.recv()
    eng = _engine()
    src = _buffer(eng)
    seg, dst, sa = hello["segment"], hello["addr"], src.ctypes.data

    def one(size: int) -> None:
        rc = eng.transfer_sync_write(seg, sa, dst, size)
        if rc != 0:
            raise RuntimeError(f"transfer_sync_write({size}) returned {rc}")

    for size in K.sizes_arg(args.sizes):
        srcs, dsts, lens = [sa] * K.INFLIGHT, [dst] * K.INFLIGHT, [size] * K.INFLIGHT
        for mode in ("pipe", "one"):
            val = K.pattern(size, mode)
            src[:size] = val
            for _ in range(K.warm_ops(size)):
                one(size)
            lat: list[float] = []
            if mode == "pipe":
                n = K.pipe_ops(size)
                t0 = K.now()
                for _ in range(n // K.INFLIGHT):
                    rc = eng.batch_transfer_sync_write(seg, srcs, dsts, lens)
                    if rc != 0:
                        raise RuntimeError(f"batch_transfer_sync_write(32 x {size}) returned {rc}")
                dt = K.now() - t0
            else:
                n = K.one_ops(size)
                t0 = K.now()
                for _ in range(n):
                    t = K.now()
                    one(size)
                    lat.append(K.now() - t)
                dt = K.now() - t0
            if not ctl.call({"cmd": "check", "size": size, "val": val})["ok"]:
                raise RuntimeError(f"target buffer does not hold the written bytes ({size} B, {mode})")
            K.emit(K.result("mooncake", mode, size, n, dt, lat))
    ctl.call({"cmd": "exit"})
    ctl.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", choices=["target", "initiator"])
    p.add_argument("--ctl-port", type=int, default=0)
    p.add_argument("--sizes", default="64,4096")
    args = p.parse_args()
    if args.role == "target":
        target()
    else:
        initiator(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
