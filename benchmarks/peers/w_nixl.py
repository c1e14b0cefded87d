#!/usr/bin/env python
"""NVIDIA NIXL side of the peers benchmark (peers' venv).

    UCX_TLS=tcp UCX_NET_DEVICES=lo w_nixl.py target
    UCX_TLS=tcp UCX_NET_DEVICES=lo w_nixl.py initiator --ctl-port P --sizes 64,4096,...

``nixl`` from PyPI, UCX backend (the transports come from ``UCX_TLS``, set by
the driver).  Modes per size:

* ``pipe``: one prepared WRITE request of 32 descriptors, posted with
  ``transfer()`` and polled with ``check_xfer_state()`` until DONE, reposted.
  Complete = DONE on the initiator.
* ``one``: a 1-descriptor WRITE with a notification, one at a time.  Complete
  = DONE on the initiator *and* the target application's ack: the target's
  ``get_new_notifs()`` loop answers each notification with ``send_notif``, and
  the initiator posts the next write once it has both (a full round trip,
  like aiote's delivery-complete write, but acknowledged by the application).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _ctl as K  # noqa: E402


def _agent(name: str, args: argparse.Namespace) -> Any:
    from nixl._api import nixl_agent, nixl_agent_config

    # No progress thread by default: on 2 cores a spinning progress thread per
    # process starves the pollers (ms latencies); the initiator progresses in
    # check_xfer_state(), the target in its get_new_notifs() loop.
    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=args.prog_thread, backends=[]))
    # "peer" (NIXL's default) needs an AM lane with peer failure handling, which
    # UCX's shm transports lack: UCX_TLS=shm then fails to connect.
    agent.create_backend("UCX", {"ucx_error_handling_mode": args.err_mode} if args.err_mode else {})
    return agent


def _buffer(agent: Any) -> Any:
    buf = K.buffer()
    agent.register_memory([(buf.ctypes.data, K.MAX_SIZE, 0, "")], "DRAM")
    return buf


def _ucx_version() -> str:
    # the UCX that nixl's wheel bundles (not a system one)
    import ctypes
    import glob

    import nixl

    base = Path(nixl.__file__).resolve().parent.parent
    for lib in glob.glob(str(base / "nixl_cu1*.libs" / "libucp-*.so*")):
        try:
            f = ctypes.CDLL(lib).ucp_get_version_string
            f.restype = ctypes.c_char_p
            return f().decode()
        except OSError:
            continue
    return "?"


def target(args: argparse.Namespace) -> None:
    import select

    agent = _agent("target", args)
    buf = _buffer(agent)
    srv = K.listen()
    K.ready(srv, version=K.pkg_version("nixl"), ucx=_ucx_version(), ucx_tls=os.environ.get("UCX_TLS", ""))
    ctl = K.accept(srv)
    ctl.send({"meta": agent.get_agent_metadata().hex(), "addr": buf.ctypes.data})
    while True:
        # the target's loop, as a NIXL user writes it: poll notifications (this
        # also progresses UCX) and answer each with an ack notification
        for sender, msgs in agent.get_new_notifs().items():
            for _ in msgs:
                agent.send_notif(sender, b"a")
        if not select.select([ctl.sock], [], [], 0)[0]:
            continue
        msg = ctl.recv()
        if msg["cmd"] == "meta":  # the initiator's metadata: needed to send it acks
            agent.add_remote_agent(bytes.fromhex(msg["meta"]))
            ctl.send({"ok": True})
        elif msg["cmd"] == "check":
            size, val = msg["size"], msg["val"]
            ctl.send({"ok": bool((buf[:size] == val).all())})
        elif msg["cmd"] == "exit":
            ctl.send({"ok": True})
            break
    ctl.close()


def initiator(args: argparse.Namespace) -> None:
    ctl = K.connect(args.ctl_port)
    hello = ctl.recv()
    agent = _agent("initiator", args)
    src = _buffer(agent)
    remote = agent.add_remote_agent(bytes.fromhex(hello["meta"]))
    ctl.call({"cmd": "meta", "meta": agent.get_agent_metadata().hex()})
    dst, sa = hello["addr"], src.ctypes.data

    def wait(h: Any) -> None:
        st, deadline = agent.transfer(h), K.now() + K.OP_TIMEOUT
        while st == "PROC":
            st = agent.check_xfer_state(h)
            if K.now() > deadline:
                raise TimeoutError(f"NIXL transfer not DONE after {K.OP_TIMEOUT} s")
        if st != "DONE":
            raise RuntimeError(f"NIXL transfer state {st}")

    for size in K.sizes_arg(args.sizes):
        loc = agent.prep_xfer_dlist("NIXL_INIT_AGENT", [(sa, size, 0)] * K.INFLIGHT, "DRAM")
        rem = agent.prep_xfer_dlist(remote, [(dst, size, 0)] * K.INFLIGHT, "DRAM")
        idx = list(range(K.INFLIGHT))
        batch = agent.make_prepped_xfer("WRITE", loc, idx, rem, idx)
        plain = agent.make_prepped_xfer("WRITE", loc, [0], rem, [0])
        single = agent.make_prepped_xfer("WRITE", loc, [0], rem, [0], notif_msg=b"n")
        for mode in ("pipe", "one"):
            val = K.pattern(size, mode)
            src[:size] = val
            warm = K.warm_ops(size)
            lat: list[float] = []
            if mode == "pipe":
                for _ in range(warm):
                    wait(plain)
                n = K.pipe_ops(size)
                t0 = K.now()
                for _ in range(n // K.INFLIGHT):
                    wait(batch)
                dt = K.now() - t0
            else:
                n = K.one_ops(size)
                t0 = 0.0
                for i in range(warm + n):
                    if i == warm:
                        t0 = K.now()
                    t = K.now()
                    st, acked = agent.transfer(single), False
                    while st == "PROC" or not acked:
                        if K.now() - t > K.OP_TIMEOUT:
                            raise TimeoutError(f"NIXL write+notif: state {st}, ack {acked} after {K.OP_TIMEOUT} s")
                        if st == "PROC":
                            st = agent.check_xfer_state(single)
                        if not acked:
                            acked = bool(agent.get_new_notifs())
                    if st != "DONE":
                        raise RuntimeError(f"NIXL transfer state {st}")
                    lat.append(K.now() - t)
                lat = lat[warm:]
                dt = K.now() - t0
            if not ctl.call({"cmd": "check", "size": size, "val": val})["ok"]:
                raise RuntimeError(f"target buffer does not hold the written bytes ({size} B, {mode})")
            K.emit(K.result("nixl", mode, size, n, dt, lat, ucx_tls=os.environ.get("UCX_TLS", ""),
                            err_mode=args.err_mode or "peer", prog_thread=args.prog_thread))
        for h in (batch, plain, single):
            agent.release_xfer_handle(h)
        for d in (loc, rem):
            agent.release_dlist_handle(d)
    ctl.call({"cmd": "exit"})
    ctl.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", choices=["target", "initiator"])
    p.add_argument("--ctl-port", type=int, default=0)
    p.add_argument("--sizes", default="64,4096")
    p.add_argument("--err-mode", default="", help="UCX backend ucx_error_handling_mode (default: NIXL's, peer)")
    p.add_argument("--prog-thread", action="store_true", help="NIXL progress thread on (default off)")
    args = p.parse_args()
    if args.role == "target":
        target(args)
    else:
        initiator(args)
    sys.stdout.flush()
    os._exit(0)  # NIXL/UCX teardown segfaults at interpreter exit here; the results are out


if __name__ == "__main__":
    sys.exit(main())
