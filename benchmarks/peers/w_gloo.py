#!/usr/bin/env python
"""torch.distributed gloo side of the peers benchmark (peers' venv), for reference.

    w_gloo.py target
    w_gloo.py initiator --ctl-port P --sizes 64,4096,...

Two-sided, unlike the others: the target posts a receive for every message.
Rank 0 (initiator) sends uint8 tensors to rank 1 (target) over gloo's TCP
transport on 127.0.0.1.  Modes per size: ``pipe`` = 32 ``isend`` in flight
(the target keeps 32 ``irecv`` posted); ``one`` = a blocking ``send``
answered by a 1-byte ack ``send`` from the target, one at a time (round trip).
Complete = the target's receive finished: the target stamps each completed
receive with CLOCK_MONOTONIC (shared by both processes) and a timed span ends
at its last receive.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _ctl as K  # noqa: E402


def _init(rank: int, port: int) -> Any:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, world_size=2, is_master=rank == 1, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    return store


def target() -> None:
    import torch
    import torch.distributed as dist

    srv = K.listen()
    K.ready(srv, version=torch.__version__)
    ctl = K.accept(srv)
    import socket

    with socket.socket() as s:  # a free port for the TCPStore (rank 1 hosts it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctl.send({"store_port": port})
    store = _init(1, port)
    buf = torch.zeros(K.MAX_SIZE, dtype=torch.uint8)
    while True:
        msg = ctl.recv()
        if msg["cmd"] == "recv":
            size, count, depth = msg["size"], msg["count"], msg["depth"]
            view = buf[:size]
            times: list[float] = []
            pending: collections.deque[Any] = collections.deque()
            posted = 0
            ack = torch.zeros(1, dtype=torch.uint8)
            while len(times) < count:
                while posted < count and len(pending) < depth:
                    pending.append(dist.irecv(view, src=0))
                    posted += 1
                pending.popleft().wait()
                times.append(K.now())
                if depth == 1:
                    dist.send(ack, dst=0)  # one at a time: the application's ack
            ctl.send({"times": times})
        elif msg["cmd"] == "check":
            size, val = msg["size"], msg["val"]
            ctl.send({"ok": bool((buf[:size] == val).all())})
        elif msg["cmd"] == "exit":
            ctl.send({"ok": True})
            break
    dist.destroy_process_group()
    del store
    ctl.close()


def initiator(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    ctl = K.connect(args.ctl_port)
    hello = ctl.recv()
    store = _init(0, hello["store_port"])
    src = torch.zeros(K.MAX_SIZE, dtype=torch.uint8)
    for size in K.sizes_arg(args.sizes):
        view = src[:size]
        for mode in ("pipe", "one"):
            val = K.pattern(size, mode)
            view.fill_(val)
            warm = K.warm_ops(size)
            n = K.pipe_ops(size) if mode == "pipe" else K.one_ops(size)
            depth = K.INFLIGHT if mode == "pipe" else 1
            ctl.send({"cmd": "recv", "size": size, "count": warm + n, "depth": depth})
            posts: list[float] = []
            lat: list[float] = []
            if mode == "pipe":
                pending: collections.deque[Any] = collections.deque()
                for _ in range(warm + n):
                    if len(pending) >= depth:
                        pending.popleft().wait()
                    posts.append(K.now())
                    pending.append(dist.isend(view, dst=1))
                while pending:
                    pending.popleft().wait()
            else:
                ack = torch.zeros(1, dtype=torch.uint8)
                for _ in range(warm + n):
                    posts.append(K.now())
                    dist.send(view, dst=1)
                    dist.recv(ack, src=1)
                    lat.append(K.now() - posts[-1])
                lat = lat[warm:]
            times = ctl.recv()["times"]
            dt = times[-1] - posts[warm]
            if not ctl.call({"cmd": "check", "size": size, "val": val})["ok"]:
                raise RuntimeError(f"target buffer does not hold the sent bytes ({size} B, {mode})")
            K.emit(K.result("gloo", mode, size, n, dt, lat))
    ctl.call({"cmd": "exit"})
    dist.destroy_process_group()
    del store
    ctl.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", choices=["target", "initiator"])
    p.add_argument("--ctl-port", type=int, default=0)
    p.add_argument("--sizes", default="64,4096")
    args = p.parse_args()
    # one intra-op thread: the 2 cores are for the two processes' communication
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.role == "target":
        target()
    else:
        initiator(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
