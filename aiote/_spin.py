"""Loop-spin mode: the asyncio loop spins on aiote's event queues before it sleeps.

With ``TransferEngine(loop_spin_us=N)`` the running loop's selector is wrapped:
``select(timeout)`` first spins (in C, GIL released) for up to N µs on the
engines' "events pending" flags, driving their progress meanwhile
(``aiote_spin`` / ``aiote_progress``), and when events come it drains them
*inside* ``select()``: the futures they resolve queue their callbacks before
asyncio counts the ready handles, so the awaiting task resumes in the same
loop iteration — no eventfd write, no epoll wake-up, no worker thread hop.
Only when nothing came for N µs (or the next timer is due sooner) does the
loop hand progress back to the worker and sleep in epoll as usual.

Other file descriptors are polled at least every ``_FD_POLL_NS`` while spinning
(a ``poll()`` from C of the real selector's epoll fd, and ``select(0)`` on the real
selector only when that says one is ready), timers keep their deadlines (the spin
never outlasts the timeout asyncio asked for) and ``select(0)`` spins not at all.
Several engines on one loop share one wrapper; the selector is restored when
the last of them closes.  Loops without a ``_selector`` (uvloop, the Windows
proactor) can't be wrapped: their engines keep the eventfd (no spinning).
"""

from __future__ import annotations

import asyncio
import selectors
import time
import weakref
from typing import TYPE_CHECKING, Any

from ._core import ffi, lib

if TYPE_CHECKING:
    from .engine import TransferEngine

__all__ = ["attach", "detach"]

_c_spin = lib.aiote_spin  # bound once: called per select()
_fd_readable = lib.aiote_fd_readable
_POLLABLE = tuple(getattr(selectors, n) for n in ("EpollSelector", "KqueueSelector", "DevpollSelector")
                  if hasattr(selectors, n))
_FD_POLL_NS = 50_000  # while spinning, look at the loop's other fds at least this often
_wrappers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _SpinSelector] = weakref.WeakKeyDictionary()


class _SpinSelector:
    """Wraps a selectors.BaseSelector; everything but ``select`` is delegated."""

    def __init__(self, loop: asyncio.AbstractEventLoop, inner: Any):
        self._loop = loop
        self._inner = inner
        self._engines: list[TransferEngine] = []
        self._handles: Any = ffi.NULL
        self._n = 0
        self._spin_ns = 0
        self._spinning = False  # the engines are in loop-spin mode (C side)
        self._wait_ns = 0  # await-spin: EWMA of how long the loop waited before an event (ns)
        self._last_fd_poll = 0
        # epoll, kqueue, devpoll: one fd, readable when any fd registered with it is ready
        self._epfd = inner.fileno() if isinstance(inner, _POLLABLE) else -1

    def __getattr__(self, name: str) -> Any:  # register, unregister, modify, get_key, get_map, close
        return getattr(self._inner, name)

    # -- engines -------------------------------------------------------------------

    def add(self, eng: TransferEngine) -> None:
        self._engines.append(eng)
        if self._spinning:
            lib.aiote_loop_spin(eng._h, 1)
        self._rebuild()

    def remove(self, eng: TransferEngine) -> None:
        if eng in self._engines:
            self._engines.remove(eng)
            lib.aiote_loop_spin(eng._h, 0)  # its worker takes over (before the engine shuts down)
            self._rebuild()

    def _rebuild(self) -> None:
        self._n = len(self._engines)
        self._handles = ffi.new("aiote_engine*[]", [e._h for e in self._engines]) if self._n else ffi.NULL
        self._spin_ns = max((e._loop_spin_ns for e in self._engines), default=0)

    # -- the selector ----------------------------------------------------------------

    def select(self, timeout: float | None = None) -> list[Any]:
        n = self._n
        if not n:
            return self._inner.select(timeout)
        spin_ns = self._spin_ns
        if not spin_ns:
            spin_ns = self._await_budget()
            if spin_ns <= 0:  # -1: awaited but the waits run long (measure them); 0: nothing awaited
                return self._sleep(timeout, measure=spin_ns < 0)
        h = self._handles
        if not self._spinning:
            for e in self._engines:
                lib.aiote_loop_spin(e._h, 1)
            self._spinning = True
        if timeout is not None and timeout <= 0:  # handles are ready: one progress round, no spin
            if _c_spin(h, n, 0):
                self._drain()
            self._last_fd_poll = time.monotonic_ns()
            return self._poll_fds()
        start = time.monotonic_ns()
        budget = spin_ns if timeout is None else min(spin_ns, int(timeout * 1e9))
        end = start + budget
        now = start
        while True:
            chunk = min(end - now, _FD_POLL_NS - (now - self._last_fd_poll))
            if chunk > 0 and _c_spin(h, n, chunk):
                self._drain()
                now = time.monotonic_ns()
                self._waited(now - start)
                if now - self._last_fd_poll < _FD_POLL_NS:
                    return []
                self._last_fd_poll = now
                return self._poll_fds()
            now = time.monotonic_ns()
            if now - self._last_fd_poll >= _FD_POLL_NS or now >= end:
                self._last_fd_poll = now
                ready = self._poll_fds()
                if ready:
                    return ready
            if now >= end:
                break
        # nothing for the whole spin: hand progress back to the workers and sleep in epoll
        if timeout is not None:
            timeout = max(0.0, timeout - (time.monotonic_ns() - start) / 1e9)
        return self._sleep(timeout, not self._spin_ns, start)

    def _await_budget(self) -> int:
        """Await-spin: how long to spin now.  Only while a coroutine awaits one of the
        engines (an operation in flight, an imm wait armed), and only while such waits
        have lately ended sooner than half the budget: a spin that keeps running out
        costs a core and then a wake-up more than sleeping at once."""
        for e in self._engines:
            if e._await_spin_ns and (e._ops or e.imms._waiters):
                ns = e._await_spin_ns
                return ns if self._wait_ns * 2 <= ns else -1
        return 0

    def _waited(self, ns: int) -> None:
        self._wait_ns += (ns - self._wait_ns) >> 2  # EWMA, 1/4 weight to the newest wait

    def _sleep(self, timeout: float | None, measure: bool = False, start: int = 0) -> list[Any]:
        """Hand progress back to the workers (if the loop drove it) and sleep in epoll."""
        if self._spinning:
            pending = 0
            for e in self._engines:
                pending |= lib.aiote_loop_spin(e._h, 0)
            self._spinning = False
            if pending:
                self._drain()
                return self._inner.select(0)
        if not measure or timeout == 0:
            return self._inner.select(timeout)
        t0 = start or time.monotonic_ns()
        ready = self._inner.select(timeout)
        self._waited(time.monotonic_ns() - t0)  # an event or a timer: the loop idled this long
        return ready

    def _poll_fds(self) -> list[Any]:
        """The other fds' events, without waiting: ``select(0)`` of the real selector, asked
        only when its epoll fd says one is ready (one poll() from C: a select(0) from Python
        cost ~1.5 µs, every 50 µs of spinning)."""
        fd = self._epfd
        if fd >= 0 and _fd_readable(fd) == 0:
            return []
        return self._inner.select(0)

    def _drain(self) -> None:
        for e in self._engines:
            try:
                e._drain()
                if e._deferred:
                    e._flush_deferred()
            except Exception as exc:  # noqa: BLE001 - never let it escape from select()
                self._loop.call_exception_handler(
                    {"message": "aiote: draining an engine's events failed", "exception": exc})


def attach(eng: TransferEngine) -> bool:
    """Spin ``eng``'s loop on it; False where the loop can't be wrapped (uvloop, proactor)."""
    loop = eng._loop
    w = _wrappers.get(loop)
    if w is None or getattr(loop, "_selector", None) is not w:
        inner = getattr(loop, "_selector", None)
        if inner is None or not hasattr(inner, "select") or not isinstance(loop, asyncio.SelectorEventLoop):
            return False
        w = _SpinSelector(loop, inner)
        loop._selector = w  # type: ignore[attr-defined]
        _wrappers[loop] = w
    w.add(eng)
    return True


def detach(eng: TransferEngine) -> None:
    """Stop spinning on ``eng``; the last engine restores the loop's own selector."""
    loop = eng._loop
    w = _wrappers.get(loop) if loop is not None else None
    if w is None:
        return
    w.remove(eng)
    if not w._engines:
        if getattr(loop, "_selector", None) is w:
            loop._selector = w._inner  # type: ignore[attr-defined]
        _wrappers.pop(loop, None)
