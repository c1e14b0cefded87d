"""ImmCounter: await the arrival of N writes that carry an imm value."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import numbers
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
_imm_wait = lib.aiote_imm_wait  # bound once (the latency path)


# Waits with a timeout share one loop timer per counter: their deadlines go into a heap
# (lazy deletion: a wait that finishes first leaves its entry, skipped when it comes up)
# and one TimerHandle is armed for the earliest, re-armed only when an earlier one comes.
# A TimerHandle per wait cost ~2 µs per wait on the latency path (docs/benchmarks.md).
_COMPACT_SLACK = 256  # finished entries the heap may hold beyond twice the live ones


class _WaitFuture(asyncio.Future):
    """An armed wait's future.  Cancelling it takes the wait back in C at once (or, if it
    fired there already, ``_fired`` gives the count back).  No done-callbacks: a wait that
    resolves schedules only its awaiter's wake-up (the latency path, docs/concepts.md
    "loop_spin_us")."""

    _counter: ImmCounter | None = None
    _wid = 0

    def cancel(self, msg: object = None) -> bool:
        if not super().cancel(msg):
            return False
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
        # wid -> (future, imm, count, timeout or None), while armed
        self._waiters: dict[int, tuple[_WaitFuture, int, int, float | None]] = {}
        self._by_peer: dict[int, set[int]] = {}  # peer index -> waits that watch it
        self._deadlines: list[tuple[float, int]] = []  # heap of (loop time, wid); stale ones skipped
        self._timed = 0  # armed waits with a deadline (the heap's live entries)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = math.inf  # when _timer fires

    def wait(self, imm: int, count: int = 1, timeout: float | None = None,
             peer: bytes | EngineAddress | None = None) -> asyncio.Future[None]:
        """Future that resolves when ``count`` writes carrying ``imm`` have landed.

        With ``timeout`` (seconds: an int or float) it fails with ImmTimeout instead,
        consuming nothing; a timeout that is not a number raises InvalidArgument before
        anything is armed.  Timed waits share one loop timer per engine (a deadline heap).
        With ``peer`` (the writer's engine address) it fails with PeerUnreachable,
        consuming nothing, once the engine learns that peer is dead: at once for a
        shm peer whose process exited, within about ``peer_timeout`` otherwise (the
        engine probes a watched peer with a small message every
        ``min(peer_timeout / 4, 0.25)`` s; the probe failing, or not being taken for
        ``peer_timeout``, marks it down).
        """
        if not (type(imm) is int and 0 <= imm <= IMM_MAX):  # bool and int subclasses: the slow check
            if not isinstance(imm, int) or not 0 <= imm <= IMM_MAX:
                raise InvalidArgument(f"imm must be an int in 0..{IMM_MAX}, got {imm!r}")
        if not (type(count) is int and count >= 1):
            if not isinstance(count, int) or count < 1:
                raise InvalidArgument(f"count must be an int >= 1, got {count!r}")
        if timeout is not None:  # checked before anything is armed
            tt = type(timeout)
            if (tt is not float and tt is not int) and (not isinstance(timeout, numbers.Real) or tt is bool):
                raise InvalidArgument(f"timeout must be a number of seconds or None, got {timeout!r}")
            secs = float(timeout)
            if secs != secs:
                raise InvalidArgument("timeout must be a number of seconds or None, got nan")
        eng = self._engine
        h = eng._h
        if h is None or eng._closed:
            h = eng._handle()  # raises EngineClosed / not open
        loop = eng._loop
        pidx = None
        if peer is not None:
            addr = peer if isinstance(peer, EngineAddress) else EngineAddress.from_bytes(peer)
            pidx = eng._peer(addr.addrs, addr.provider)
        wid = next(self._ids)
        rc = _imm_wait(h, wid, imm, count)
        if rc:
            if rc == 1:  # satisfied already: consumed in C
                done: asyncio.Future[None] = loop.create_future()
                done.set_result(None)
                return done
            check(rc, "imms.wait")
        fut = _WaitFuture(loop=loop)
        fut._counter = self
        fut._wid = wid
        self._waiters[wid] = (fut, imm, count, timeout)
        if timeout is not None:
            when = loop.time() + secs
            heap = self._deadlines
            while heap and heap[0][1] not in self._waiters:  # finished waits at the top: drop them
                heapq.heappop(heap)
            heapq.heappush(heap, (when, wid))
            self._timed += 1
            if when < self._timer_when:  # a new earliest deadline: re-arm the one timer
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = loop.call_at(when, self._expire_due)
                self._timer_when = when
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
        fut, imm, count, timeout = entry
        if timeout is not None:
            self._timed -= 1
            if len(self._deadlines) > 2 * self._timed + _COMPACT_SLACK:
                self._compact()
        if fut.done():  # cancelled after the count was consumed in C: give it back
            self._restore(imm, count)
        else:
            fut.set_result(None)

    def _peer_down(self, peer: int, exc_factory: Callable[[], Exception]) -> None:
        for wid in list(self._by_peer.get(peer, ())):
            entry = self._waiters.get(wid)
            if entry is None or entry[0].done():
                continue
            if lib.aiote_imm_cancel(self._engine._handle(), wid) == 1:
                self._waiters.pop(wid, None)
                if entry[3] is not None:
                    self._untimed()
                entry[0].set_exception(exc_factory())
            # else it fired in C a moment ago: _fired() resolves it

    def _fail_all(self, exc_factory) -> None:
        waiters, self._waiters = self._waiters, {}
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_when = math.inf
        self._deadlines = []
        self._timed = 0
        for fut, _, _, _ in waiters.values():
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
        entry = self._waiters.get(wid)
        if entry is None or self._engine.closed:
            return
        if lib.aiote_imm_cancel(self._engine._handle(), wid) == 1:
            del self._waiters[wid]
            if entry[3] is not None:
                self._untimed()
        # else it already fired: _fired() will see the cancelled future and restore

    def _untimed(self) -> None:
        """A wait with a deadline finished before it: its heap entry is stale now.  Keep the
        heap within twice the live entries (plus slack) so it can't grow without bound
        (_fired does the same inline)."""
        self._timed -= 1
        if len(self._deadlines) > 2 * self._timed + _COMPACT_SLACK:
            self._compact()

    def _compact(self) -> None:
        waiters = self._waiters
        self._deadlines = [e for e in self._deadlines if e[1] in waiters]
        heapq.heapify(self._deadlines)

    def _expire_due(self) -> None:
        """The timer: fail every wait whose deadline has come (ImmTimeout, consuming nothing),
        in deadline order, then arm the timer for the next live deadline."""
        self._timer = None
        due = self._timer_when
        self._timer_when = math.inf
        eng = self._engine
        if eng.closed:
            return
        loop = eng._loop
        due = max(due, loop.time())  # the loop runs a timer up to its clock resolution early
        heap, waiters = self._deadlines, self._waiters
        while heap and heap[0][0] <= due:
            _, wid = heapq.heappop(heap)
            entry = waiters.get(wid)
            if entry is None or entry[0].done():
                continue  # finished before its deadline
            if lib.aiote_imm_cancel(eng._h, wid) == 1:
                del waiters[wid]
                self._timed -= 1
                fut, imm, count, timeout = entry
                fut.set_exception(ImmTimeout(f"{count} imm(s) {imm} not seen within {timeout} s"))
            # else it fired in C just now: its event resolves it (_fired)
        while heap and heap[0][1] not in waiters:
            heapq.heappop(heap)
        if heap:
            self._timer_when = heap[0][0]
            self._timer = loop.call_at(self._timer_when, self._expire_due)
