"""Control messages over aiote's own send/recv.

Every message is a dict with a type key ``"t"``, pickled with a restricted
unpickler (plain containers, numbers, strings and bytes only: a message can
never name a class or function), and kept under aiote's 64 KiB message size.

``Channel`` receives on one engine; sends are fire-and-forget futures,
tracked per peer and bounded by a timeout.  With ``per_peer=True`` (the
router) every peer also gets its own sending engine, closed when the peer
dies or leaves: on shm a send to a SIGKILLed process never completes, and
the provider then holds back the completions of every later send of the
same engine, to live peers too, until its send slots run out (see
docs/kvcache-demo.md).  A dead peer must not be able to wedge the router.
"""

from __future__ import annotations

import asyncio
import io
import os
import pickle
from collections import defaultdict
from typing import Any

import aiote

__all__ = ["Channel", "encode", "decode", "MAX_MSG"]

MAX_MSG = 60 * 1024  # headroom under the engine's 64 KiB msg_size


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"messages may not reference {module}.{name}")


def encode(msg: dict[str, Any]) -> bytes:
    data = pickle.dumps(msg, protocol=5)
    if len(data) > MAX_MSG:
        raise ValueError(f"message {msg.get('t')!r} is {len(data)} bytes (limit {MAX_MSG})")
    return data


def decode(data: bytes) -> dict[str, Any]:
    msg = _Restricted(io.BytesIO(data)).load()
    if not isinstance(msg, dict) or "t" not in msg:
        raise ValueError("not a control message")
    return msg


class Channel:
    """Send/receive control messages."""

    def __init__(self, eng: aiote.TransferEngine, log: Any, send_timeout: float = 10.0,
                 per_peer: bool = False, provider: str = "shm", host: str | None = None):
        self.eng = eng
        self.log = log
        self.send_timeout = send_timeout
        self.per_peer = per_peer
        self._provider = provider  # of the per-peer engines
        self._host = host
        self._egress: dict[bytes, aiote.TransferEngine] = {}
        self._pending: dict[bytes, set[asyncio.Future[None]]] = defaultdict(set)
        self._dead: set[bytes] = set()

    def _engine_for(self, addr: bytes) -> aiote.TransferEngine:
        if not self.per_peer:
            return self.eng
        e = self._egress.get(addr)
        if e is None:
            e = self._egress[addr] = aiote.TransferEngine(self._provider, host=self._host).open()
        return e

    def send(self, addr: bytes, msg: dict[str, Any]) -> asyncio.Future[None] | None:
        """Start sending ``msg``; returns the future (None if the peer is known dead)."""
        if addr in self._dead or self.eng.closed:
            return None
        try:
            fut = self._engine_for(addr).send(addr, encode(msg))
        except aiote.AioteError as e:
            self.log.warning("send.refused", msg_type=msg["t"], error=repr(e))
            return None
        pending = self._pending[addr]
        pending.add(fut)
        timer = asyncio.get_running_loop().call_later(self.send_timeout, fut.cancel)

        def done(f: asyncio.Future[None]) -> None:
            timer.cancel()
            pending.discard(f)
            if f.cancelled():
                if addr not in self._dead:
                    self.log.warning("send.timeout", msg_type=msg["t"])
            elif f.exception() is not None:
                self.log.warning("send.failed", msg_type=msg["t"], error=repr(f.exception()))

        fut.add_done_callback(done)
        return fut

    async def recv(self) -> tuple[dict[str, Any], bytes]:
        while True:
            data, sender = await self.eng.recv()
            try:
                return decode(data), sender
            except Exception as e:  # noqa: BLE001 - a bad message is dropped, not fatal
                self.log.warning("recv.bad_message", error=repr(e), size=len(data))

    async def peer_gone(self, addr: bytes, dead: bool) -> None:
        """Stop talking to ``addr``: refuse new sends; a dead peer's pending ones are dropped
        (and its sending engine closed, which is what frees them), a departed one's flushed first."""
        self._dead.add(addr)
        if not dead:
            await self.flush(addr=addr)
        for f in list(self._pending.pop(addr, ())):
            f.cancel()
        e = self._egress.pop(addr, None)
        if e is not None:
            await e.close()

    async def flush(self, timeout: float = 2.0, addr: bytes | None = None) -> None:
        """Wait (bounded) until the sends started so far (to ``addr``, or all) have completed."""
        futs = [f for a, s in self._pending.items() if addr is None or a == addr for f in s]
        if futs:
            await asyncio.wait(futs, timeout=timeout)

    async def close(self) -> None:
        """Flush, then close the per-peer sending engines (not the receiving one)."""
        await self.flush()
        for e in list(self._egress.values()):
            await e.close()
        self._egress.clear()


def watch_pid(pid: int, on_exit: Any) -> Any:
    """Call ``on_exit()`` when process ``pid`` (same host) ends; returns a function that stops watching.

    A pidfd turns readable when the process exits, zombie or not, so a SIGKILLed
    peer is noticed at once, without waiting for heartbeats to go missing.
    Returns None where pidfds are not available (the heartbeat check remains).
    """
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
    state = {"open": True}

    def stop() -> None:
        if state["open"]:
            state["open"] = False
            loop.remove_reader(fd)
            os.close(fd)

    def fire() -> None:
        stop()
        on_exit()

    loop.add_reader(fd, fire)
    return stop
