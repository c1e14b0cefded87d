"""ImmCounter: await the arrival of N writes that carry an imm value."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._core import check, ffi, lib
from .descriptor import EngineAddress
from .errors import ImmTimeout, InvalidArgument, PeerUnreachable

if TYPE_CHECKING:
    from .engine import TransferEngine

__all__ = ["ImmCounter", "IMM_MAX"]

#: Largest imm a user may send: the top bits are reserved for shard counts of
#: striped writes, so the receiver always counts whole writes.
IMM_MAX = (1 << lib.AIOTE_IMM_BITS) - 1


class _WaitFuture(asyncio.Future):
    """An armed wait's future.  Cancelling it takes the wait back in C at once (or, if it
    fired there already, ``_fired`` gives the count back); its timeout timer is cancelled
    by whoever finishes it.  No done-callbacks: a wait that resolves schedules only its
    awaiter's wake-up (the latency path, docs/concepts.md "loop_spin_us")."""

    _counter: ImmCounter | None = None
    _wid = 0
    _timer: asyncio.TimerHandle | None = None

    def cancel(self, msg: object = None) -> bool:
        if not super().cancel(msg):
            return False
        if self._timer is not None:
            self._timer.cancel()
        c = self._counter
        if c is not None:
            c._cancelled(self._wid)
        return True


class ImmCounter:
    """Counts imm arrivals in C; ``wait`` resolves once ``count`` have landed.

    Arrivals are counted whether a wait was armed before or after them.  A
    satisfied wait consumes its count.  Waits on the same imm are served in
    the order they were armed.  Cancelling a wait (or its timeout) consumes
    nothing: if its count had already been reached, the count is given back.
    """

    def __init__(self, engine: TransferEngine):
        self._engine = engine
        self._ids = itertools.count(1)
        self._waiters: dict[int, tuple[asyncio.Future[None], int, int]] = {}
        self._by_peer: dict[int, set[int]] = {}  # peer index -> waits that watch it

    def wait(self, imm: int, count: int = 1, timeout: float | None = None,
             peer: bytes | EngineAddress | None = None) -> asyncio.Future[None]:
        """Future that resolves when ``count`` writes carrying ``imm`` have landed.

        With ``timeout`` (seconds) it fails with ImmTimeout instead, consuming nothing.
        With ``peer`` (the writer's engine address) it fails with PeerUnreachable,
        consuming nothing, once the engine learns that peer is dead: at once for a
        shm peer whose process exited, within about ``peer_timeout`` otherwise (the
        engine probes a watched peer with a small message every
        ``min(peer_timeout / 4, 0.25)`` s; the probe failing, or not being taken for
        ``peer_timeout``, marks it down).
        """
        if not isinstance(imm, int) or not 0 <= imm <= IMM_MAX:
            raise InvalidArgument(f"imm must be an int in 0..{IMM_MAX}, got {imm!r}")
        if not isinstance(count, int) or count < 1:
            raise InvalidArgument(f"count must be an int >= 1, got {count!r}")
        eng = self._engine
        loop = eng._loop_checked()
        pidx = None
        if peer is not None:
            addr = peer if isinstance(peer, EngineAddress) else EngineAddress.from_bytes(peer)
            pidx = eng._peer(addr.addrs, addr.provider)
        wid = next(self._ids)
        rc = check(lib.aiote_imm_wait(eng._handle(), wid, imm, count), "imms.wait")
        if rc == 1:
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done
        fut = _WaitFuture(loop=loop)
        fut._counter = self
        fut._wid = wid
        self._waiters[wid] = (fut, imm, count)
        if timeout is not None:
            fut._timer = loop.call_later(timeout, self._expire, wid, imm, count, timeout)
        if pidx is not None:
            self._watch(wid, pidx, fut)
        return fut

    def pending(self, imm: int) -> int:
        """Whole writes with ``imm`` that landed and no wait has consumed."""
        out = ffi.new("uint64_t*")
        check(lib.aiote_imm_pending(self._engine._handle(), imm, out))
        return int(out[0])

    # -- called by the engine ------------------------------------------------

    def _fired(self, wid: int) -> None:
        entry = self._waiters.pop(wid, None)
        if entry is None:
            return
        fut, imm, count = entry
        if fut.done():  # cancelled after the count was consumed in C: give it back
            self._restore(imm, count)
        else:
            if fut._timer is not None:
                fut._timer.cancel()
            fut.set_result(None)

    def _peer_down(self, peer: int, exc_factory: Callable[[], Exception]) -> None:
        for wid in list(self._by_peer.get(peer, ())):
            entry = self._waiters.get(wid)
            if entry is None or entry[0].done():
                continue
            if lib.aiote_imm_cancel(self._engine._handle(), wid) == 1:
                self._waiters.pop(wid, None)
                if entry[0]._timer is not None:
                    entry[0]._timer.cancel()
                entry[0].set_exception(exc_factory())
            # else it fired in C a moment ago: _fired() resolves it

    def _fail_all(self, exc_factory) -> None:
        waiters, self._waiters = self._waiters, {}
        for fut, _, _ in waiters.values():
            if fut._timer is not None:
                fut._timer.cancel()
            if not fut.done():
                fut.set_exception(exc_factory())

    # -- internals -------------------------------------------------------------

    def _watch(self, wid: int, peer: int, fut: asyncio.Future[None]) -> None:
        h = self._engine._handle()
        gone = check(lib.aiote_peer_watch(h, peer, 1), "imms.wait")
        self._by_peer.setdefault(peer, set()).add(wid)

        def unwatch(_: asyncio.Future[None]) -> None:
            waiters = self._by_peer.get(peer)
            if waiters is not None:
                waiters.discard(wid)
                if not waiters:
                    del self._by_peer[peer]
            if not self._engine.closed:
                lib.aiote_peer_watch(self._engine._handle(), peer, -1)

        fut.add_done_callback(unwatch)
        if gone:
            self._peer_down(peer, lambda: PeerUnreachable("peer is down (its process exited)"))

    def _restore(self, imm: int, count: int) -> None:
        if not self._engine.closed:
            lib.aiote_imm_restore(self._engine._handle(), imm, count)

    def _cancelled(self, wid: int) -> None:
        """A wait's future was cancelled (by its awaiter, a task's cancellation, wait_for)."""
        if wid not in self._waiters or self._engine.closed:
            return
        if lib.aiote_imm_cancel(self._engine._handle(), wid) == 1:
            self._waiters.pop(wid, None)
        # else it already fired: _fired() will see the cancelled future and restore

    def _expire(self, wid: int, imm: int, count: int, timeout: float) -> None:
        entry = self._waiters.get(wid)
        if entry is None or entry[0].done() or self._engine.closed:
            return
        if lib.aiote_imm_cancel(self._engine._handle(), wid) == 1:
            self._waiters.pop(wid, None)
            entry[0].set_exception(ImmTimeout(f"{count} imm(s) {imm} not seen within {timeout} s"))

