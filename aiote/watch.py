"""Watchers: transfers fired by a 64-bit word that a GPU kernel (or anyone) advances.

A CUDA graph can't call Python, but it can write memory.  A ``Watcher`` owns a
word in pinned, device-mapped host memory (``cuda=True``) or plain host memory;
kernels write it through ``.device_ptr`` / ``.tensor``, CPU code through
``.set()``.  Reactions are armed in C: "when the value reaches v, post this
prepared transfer".  The engine's worker reads the word on every turn of its
loop while reactions are armed and posts the transfer itself — no Python, no
GIL between the kernel's store and the NIC.  Every crossed threshold fires once,
in order, even if the value jumps past several between two reads.

    w = eng.watcher(cuda=True)
    layer_xfer = [eng.prepare_paged(kv_host, peer_kv, page, src_pages[l], dst_pages[l], imm=l)
                  for l in range(n_layers)]
    done = [w.arm(l + 1, layer_xfer[l]) for l in range(n_layers)]   # futures
    graph.replay()            # its kernels do w.tensor.fill_(l + 1) after layer l
    await asyncio.gather(*done)
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ._core import check, ffi, lib
from .errors import EngineClosed, InvalidArgument

if TYPE_CHECKING:
    from .engine import TransferEngine

__all__ = ["Watcher", "Prepared"]

_CU_MEMHOSTALLOC_PORTABLE_DEVICEMAP = 0x1 | 0x2


_KEEP: Any = object()  # post(): the imm given at preparation


class Prepared:
    """A transfer checked and resolved once: posted by C each time a watcher
    reaction fires, or by ``post()``, as often as wanted.

    It holds its source region (which can't be closed meanwhile) until ``close()``.
    Only host memory or GPUDirect (``gpu="direct"``) regions: a staged GPU region's
    bytes pass through bounce slots under a protocol that Python drives.
    """

    def __init__(self, engine: TransferEngine, prep_id: int, keep: Any, n: int = 0):
        self._engine = engine
        self._id = prep_id
        self._keep = keep
        #: writes in the transfer (elements or pages); each carries the imm
        self.n = n
        self.closed = False

    def post(self, imm: int | None = _KEEP) -> asyncio.Future[None]:
        """Post the whole prepared batch now: one C call, no checking or resolving again.

        Returns one future for the batch, with the same meaning as ``scatter``'s or
        ``write_paged``'s (every write landed; a failure names the element).  ``imm``:
        the one given at preparation unless given here (``None``: no imm); every write
        of the batch carries it, so the target counts ``n`` of it per post.  Bounds
        were checked at preparation, against regions that can't change meanwhile: the
        source is held, and a target deregistered since fails the post (stale key).
        """
        if self.closed:
            raise InvalidArgument("post() on a closed Prepared transfer")
        eng = self._engine
        if imm is _KEEP:
            mode, v = 0, 0
        else:
            has, v = eng._check_imm(imm)
            mode = 2 if has else 1
        h = eng._handle()
        pid = self._id
        if not eng._deferred:  # fast path: one C call (the direct path may finish it there)
            op_id = next(eng._op_ids)
            rc = lib.aiote_post_prepared(h, op_id, pid, mode, v)
            if rc == lib.AIOTE_DONE:
                fut = eng._loop.create_future()
                fut.set_result(None)
                return fut
            if rc >= 0:
                return eng._track(op_id, self)
            if rc != -lib.AIOTE_E_AGAIN:
                check(rc, "post")

        def submit(op_id: int) -> int:
            if self.closed:  # closed while this post waited for room: its id may name another now
                raise InvalidArgument("the Prepared transfer was closed before it could be posted")
            rc = lib.aiote_post_prepared(h, op_id, pid, mode, v)
            if rc < 0 and rc != -lib.AIOTE_E_AGAIN:
                check(rc, "post")
            return rc

        return eng._submit(submit, self)

    def close(self) -> None:
        """Free it (RegionInUse-like AioteError while a reaction is armed with it)."""
        if self.closed:
            return
        if not self._engine.closed:
            check(lib.aiote_prepare_free(self._engine._handle(), self._id), "prepared transfer")
        self.closed = True
        self._keep = None


class _DeviceArray:
    """Just enough ``__cuda_array_interface__`` for torch.as_tensor to view the word."""

    def __init__(self, ptr: int):
        self.__cuda_array_interface__ = {"shape": (1,), "typestr": "<i8", "data": (ptr, False),
                                         "version": 3, "strides": None}


class Watcher:
    """A watched 64-bit word (see the module docstring).

    ``host_ptr``: its address for CPU writers; ``device_ptr`` / ``tensor`` (a 1-element
    int64 CUDA tensor) for kernels, with ``cuda=True``.  Values only matter as they
    grow: a reaction fires when the value is >= its threshold.
    """

    def __init__(self, engine: TransferEngine, *, cuda: bool = False, device: int = 0,
                 buffer: Any = None, offset: int = 0):
        self._engine = engine
        self._mem: Any = None
        self._cuda_host = 0
        self.device_ptr: int | None = None
        if buffer is not None:
            c = ffi.from_buffer("uint8_t[]", buffer, require_writable=True)
            if offset < 0 or offset + 8 > len(c):
                raise InvalidArgument(f"offset {offset} leaves no 8-byte word in the buffer")
            self.host_ptr = int(ffi.cast("uintptr_t", c)) + offset
            self._mem = (buffer, c)
        elif cuda:
            from . import cuda as cu

            drv = cu.driver()
            drv.use_device(device)
            p = ctypes.c_void_p()
            drv.call("cuMemHostAlloc", ctypes.byref(p), ctypes.c_size_t(64), _CU_MEMHOSTALLOC_PORTABLE_DEVICEMAP)
            self._cuda_host = self.host_ptr = int(p.value or 0)
            ctypes.memset(self.host_ptr, 0, 8)
            dptr = ctypes.c_uint64()
            drv.call("cuMemHostGetDevicePointer", ctypes.byref(dptr), ctypes.c_void_p(self.host_ptr), 0)
            self.device_ptr = dptr.value
            self._device = device
        else:
            self._mem = mmap.mmap(-1, mmap.PAGESIZE)
            self.host_ptr = ctypes.addressof(ctypes.c_char.from_buffer(self._mem))
        if self.host_ptr % 8:
            raise InvalidArgument("the watched word must be 8-byte aligned")
        self._word = ctypes.c_uint64.from_address(self.host_ptr)
        out = ffi.new("uint32_t*")
        check(lib.aiote_watch_add(engine._handle(), ffi.cast("uint64_t *", self.host_ptr), out), "watcher")
        self._id = int(out[0])
        self._pending: dict[int, asyncio.Future[Any]] = {}
        #: time.monotonic_ns() at which the worker saw the value of the latest fired wait()
        self.last_seen_ns = 0
        self.closed = False
        engine._watchers[self._id] = self

    # -- the word -------------------------------------------------------------------

    @property
    def value(self) -> int:
        return int(self._word.value)

    def set(self, value: int) -> None:
        """Store a value (an aligned 8-byte store: one write, seen whole)."""
        if not isinstance(value, int) or not 0 <= value < 1 << 64:
            raise InvalidArgument(f"value must be an int in 0..2**64-1, got {value!r}")
        self._word.value = value

    @property
    def tensor(self) -> Any:
        """The word as a 1-element int64 CUDA tensor (``cuda=True`` only), for kernels and graphs."""
        if self.device_ptr is None:
            raise InvalidArgument("this watcher's word is not device-mapped (watcher(cuda=True))")
        import torch

        return torch.as_tensor(_DeviceArray(self.device_ptr), device=f"cuda:{self._device}")

    # -- reactions --------------------------------------------------------------------

    def arm(self, threshold: int, transfer: Prepared) -> asyncio.Future[None]:
        """Post ``transfer`` (from C) once the value reaches ``threshold``; the future
        resolves when that transfer completes.  Cancelling it before it fires disarms it."""
        if not isinstance(transfer, Prepared) or transfer.closed:
            raise InvalidArgument("arm() needs an open Prepared transfer")
        return self._arm(threshold, transfer._id)

    def wait(self, value: int) -> asyncio.Future[int]:
        """A future for the first value seen that is >= ``value`` (the value itself)."""
        return self._arm(value, 0)

    async def changes(self, start: int | None = None) -> AsyncIterator[int]:
        """Yield values as they grow, from ``start`` (default: the current value + 1);
        a jump of several steps yields once, with the value seen."""
        nxt = self.value + 1 if start is None else start
        while True:
            v = await self.wait(nxt)
            yield v
            nxt = v + 1

    def _arm(self, threshold: int, prep: int) -> asyncio.Future[Any]:
        if self.closed:
            raise EngineClosed("watcher is closed")
        if not isinstance(threshold, int) or not 0 <= threshold < 1 << 64:
            raise InvalidArgument(f"threshold must be an int in 0..2**64-1, got {threshold!r}")
        eng = self._engine
        loop = eng._loop_checked()
        rid = next(eng._op_ids)
        fut: asyncio.Future[Any] = loop.create_future()
        if prep:
            eng._ops[rid] = eng._op_record(fut, self)
        else:
            self._pending[rid] = fut
            eng._watch_rids[rid] = self
        rc = lib.aiote_watch_arm(eng._handle(), self._id, threshold, prep, rid)
        if rc < 0:
            eng._ops.pop(rid, None)
            self._pending.pop(rid, None)
            check(rc, "arm")
        fut.add_done_callback(lambda f: self._on_done(rid, f))
        return fut

    def _on_done(self, rid: int, fut: asyncio.Future[Any]) -> None:
        self._pending.pop(rid, None)
        self._engine._watch_rids.pop(rid, None)
        if not fut.cancelled() or self._engine.closed:
            return
        h = self._engine._handle()
        if lib.aiote_watch_disarm(h, self._id, rid) == 0:
            lib.aiote_cancel(h, rid)  # fired already: withdraw what isn't posted yet
        self._engine._ops.pop(rid, None)

    def _event(self, ev: Any) -> None:
        fut = self._pending.pop(int(ev.id), None)
        if fut is None or fut.done():
            return
        if ev.status:
            fut.set_exception(EngineClosed("watcher closed"))
        else:
            self.last_seen_ns = int(ev.time_ns)
            fut.set_result(int(ev.index))

    def close(self) -> None:
        """Stop watching: armed reactions fail (EngineClosed).  Idempotent."""
        if self.closed:
            return
        eng = self._engine
        if not eng.closed:
            check(lib.aiote_watch_remove(eng._handle(), self._id), "watcher")
            eng._drain()  # the failed reactions' events
        self._release()

    def _release(self) -> None:
        self.closed = True
        for f in self._pending.values():
            if not f.done():
                f.set_exception(EngineClosed("watcher closed"))
        self._pending.clear()
        self._engine._watchers.pop(self._id, None)
        if self._cuda_host:
            from . import cuda as cu

            try:
                cu.driver().host_free(self._cuda_host)
            except cu.CudaError:
                pass
            self._cuda_host = 0
        self._mem = None

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
