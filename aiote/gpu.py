"""GPU memory in every operation: direct (GPUDirect), host-staged, or CUDA IPC.

A CUDA buffer is registered one of two ways (``TransferEngine(gpu=...)``):

* ``direct``: the NIC registers the device memory itself (``FI_HMEM``; efa,
  verbs with GPUDirect RDMA).  Writes are plain NIC writes.
* ``staged`` (shm, tcp and any NIC without GPUDirect): the region gets a
  pinned host *mirror* of the same size, registered with the NIC.  A GPU
  source is copied device→host into its mirror before the NIC reads it; a
  GPU destination receives into its mirror and the writer then sends a
  commit message naming the byte ranges; the owner copies them host→device
  and only then counts the imm.  Large transfers go in chunks, so the copies
  of one chunk overlap the network transfer of the next.

Between processes of one host (same boot id) a GPU destination with a CUDA
IPC handle is written by mapping it (``cuIpcOpenMemHandle``) and copying with
the copy engines (NVLink between GPUs); the imm follows as an imm-only write
once the copy's event has completed, so ``imms.wait`` keeps its meaning.

Copies run on streams of their own (``cuMemcpyAsync``, the copy engines, no
kernels); a source tensor's pending work on torch's current stream is waited
for first.  A CUDA host function queued after the copies wakes the event loop
through an eventfd (see _CopyWaiter).
"""

from __future__ import annotations

import asyncio
import collections
import os
import secrets
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from . import cuda
from .descriptor import CudaExt, MrDescriptor
from .errors import OutOfBounds

if TYPE_CHECKING:
    from .engine import TransferEngine
    from .memory import MemoryRegion

__all__ = ["GpuPaths", "Element", "chunk_elements"]

_COMMIT = struct.Struct("<4sQIII")  # magic, token, imm (or NO_IMM), imm count, range count
_RANGE = struct.Struct("<QQ")
_MAGIC = b"AGC1"
_NO_IMM = 0xFFFFFFFF


@dataclass
class Element:
    """One write: ``length`` bytes from ``src_off`` of the source to ``dst_off`` of ``dst``."""

    dst: MrDescriptor
    src_off: int
    dst_off: int
    length: int


#: one range of a chunk: (src_off, dst_off, len, whole element, last part of its element)
Part = tuple[int, int, int, bool, bool]


@dataclass
class _GpuInfo:
    """What a registered GPU region keeps beside its MemoryRegion."""

    device: int
    ptr: int        # device address of byte 0
    mirror: int     # pinned host mirror (staged), 0 for direct
    token: int


class _CopyWaiter:
    """Resolves futures when copies queued on aiote's streams are done.

    After each batch of copies, a CUDA host function (``aiote_host_notify``,
    C, no Python and no GIL) adds 1 to an eventfd the event loop watches; the
    loop then resolves, in order, every pending copy whose event has completed.
    One wake-up of the loop per completion, no thread of our own."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        from ._core import ffi, lib

        self._drv = cuda.driver()
        self._loop = loop
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fn = int(ffi.cast("uintptr_t", ffi.addressof(lib, "aiote_host_notify")))
        self._pending: dict[int, collections.deque[tuple[int, asyncio.Future[None]]]] = {}
        loop.add_reader(self._efd, self._on_notify)

    def after(self, device: int, stream: int) -> asyncio.Future[None]:
        """A future for everything queued on stream so far."""
        drv = self._drv
        ev = drv.event()
        drv.record(ev, stream)
        drv.call("cuLaunchHostFunc", _vp(stream), _vp(self._fn), _vp(self._efd))
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pending.setdefault(device, collections.deque()).append((ev, fut))
        return fut

    def _on_notify(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        drv = self._drv
        for device, q in self._pending.items():
            if not q:
                continue
            drv.use_device(device)
            while q:
                ev, fut = q[0]
                rc = drv.query(ev)
                if rc is False:
                    break  # not yet (a later notification comes)
                q.popleft()
                drv.destroy_event(ev)
                if not fut.done():
                    if rc is True:
                        fut.set_result(None)
                    else:
                        fut.set_exception(rc)

    def close(self) -> None:
        """Wait for copies in flight (their buffers may be freed next)."""
        self._loop.remove_reader(self._efd)
        for device, q in self._pending.items():
            for ev, fut in q:
                try:
                    self._drv.use_device(device)
                    self._drv.synchronize(ev)
                    self._drv.destroy_event(ev)
                except cuda.CudaError:
                    pass
                if not fut.done():
                    fut.cancel()
        self._pending.clear()
        os.close(self._efd)


def chunk_elements(es: Sequence[Element], cap: int, max_ranges: int = 2000) -> list[list[Part]]:
    """Group elements into chunks of at most chunk_bytes and 2,000 ranges: lists of
    (src_off, dst_off, len, whole element, last part of its element).  An element
    that fits a chunk is never cut; a larger one is cut into chunk-sized parts."""
    out: list[list[Part]] = []
    cur: list[Part] = []
    size = 0
    for e in es:
        if e.length <= cap:
            if size + e.length > cap or len(cur) >= max_ranges:
                out.append(cur)
                cur, size = [], 0
            cur.append((e.src_off, e.dst_off, e.length, True, True))
            size += e.length
            continue
        if cur:
            out.append(cur)
            cur, size = [], 0
        for off in range(0, e.length, cap):
            n = min(cap, e.length - off)
            out.append([(e.src_off + off, e.dst_off + off, n, False, off + n == e.length)])
    if cur:
        out.append(cur)
    return out


def _merge(ranges: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Coalesce (src, dst, len) ranges that continue each other (fewer copies)."""
    out: list[tuple[int, int, int]] = []
    for s, d, n in ranges:
        if n == 0:
            continue
        if out and out[-1][0] + out[-1][2] == s and out[-1][1] + out[-1][2] == d:
            ps, pd, pn = out[-1]
            out[-1] = (ps, pd, pn + n)
        else:
            out.append((s, d, n))
    return out


class GpuPaths:
    """The GPU side of one engine: registration, routing, copies, commits."""

    def __init__(self, engine: TransferEngine, mode: str, ipc: bool, chunk_bytes: int):
        self._engine = engine
        self.mode = mode              # "staged" or "direct"
        self.ipc = ipc                # use CUDA IPC for same-host GPU destinations
        self.chunk_bytes = chunk_bytes
        self._drv = cuda.driver()
        self._boot = cuda.boot_id()
        self._pid = os.getpid()
        self._streams: dict[int, int] = {}
        self._waiter: _CopyWaiter | None = None
        self._by_token: dict[int, MemoryRegion] = {}
        self._ipc_maps: dict[tuple[int, bytes], int] = {}  # (pid, handle) -> mapped base
        self.stats = {"staged_in": 0, "staged_out": 0, "ipc_writes": 0, "commits_sent": 0,
                      "commits_received": 0, "bad_commits": 0}

    # -- registration ------------------------------------------------------------

    def register(self, cp: cuda.CudaPointer) -> MemoryRegion:
        from .memory import MemoryRegion

        eng, drv = self._engine, self._drv
        drv.use_device(cp.device)
        token = secrets.randbits(64)
        if self.mode == "direct":
            region = MemoryRegion._from_device(eng, cp)
            mirror = 0
        else:
            mirror = drv.host_alloc(cp.nbytes)
            try:
                region = MemoryRegion._from_raw(eng, mirror, cp.nbytes, cp.keep)
            except BaseException:
                drv.host_free(mirror)
                raise
            region._on_close.append(lambda: drv.host_free(mirror))
        handle, offset = bytes(64), 0
        try:
            base, _ = drv.address_range(cp.ptr)
            handle, offset = drv.ipc_handle(base), cp.ptr - base
        except cuda.CudaError:
            pass  # VMM / expandable-segment memory: no legacy handle; the NIC path serves it
        ext = CudaExt(self.mode, cp.device, token, self._boot, self._pid, drv.device_uuid(cp.device), handle,
                      offset)
        region._descriptor = replace(region._descriptor, cuda=ext)
        region.cuda = _GpuInfo(cp.device, cp.ptr, mirror, token)
        region.device = cp.device
        self._by_token[token] = region
        region._on_close.append(lambda: self._by_token.pop(token, None))
        return region

    def local_region(self, token: int) -> MemoryRegion | None:
        return self._by_token.get(token)

    # -- copies --------------------------------------------------------------------

    def _stream(self, device: int) -> int:
        s = self._streams.get(device)
        if s is None:
            self._drv.use_device(device)
            s = self._streams[device] = self._drv.stream()
        return s

    def _after_torch(self, device: int, stream: int) -> None:
        """Order our copy after work already queued on torch's current stream."""
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return
        ts = torch.cuda.current_stream(device).cuda_stream
        ev = self._drv.event()
        self._drv.record(ev, ts)
        self._drv.call("cuStreamWaitEvent", _vp(stream), _vp(ev), 0)
        self._drv.destroy_event(ev)  # destroyed after the wait is queued: allowed by CUDA

    def _copies(self, device: int, pairs: Sequence[tuple[int, int, int]]) -> asyncio.Future[None]:
        """Queue copies (dst address, src address, n) on the device's stream; a future
        resolves when they are done."""
        drv = self._drv
        drv.use_device(device)
        stream = self._stream(device)
        for dst, src, n in pairs:
            drv.copy(dst, src, n, stream)
        if self._waiter is None:
            self._waiter = _CopyWaiter(self._engine._loop_checked())
        return self._waiter.after(device, stream)

    # -- writes --------------------------------------------------------------------

    def submit(self, src: MemoryRegion | None, elems: list[Element], imm: int | None) -> asyncio.Future[None]:
        """Writes where the source or a destination is GPU memory (bounds already checked)."""
        loop = self._engine._loop_checked()
        if src is not None and src.cuda is not None:
            self._after_torch(src.cuda.device, self._stream(src.cuda.device))
        return loop.create_task(self._run(src, elems, imm))

    async def _run(self, src: MemoryRegion | None, elems: list[Element], imm: int | None) -> None:
        groups: dict[MrDescriptor, list[Element]] = {}
        for e in elems:
            groups.setdefault(e.dst, []).append(e)
        await asyncio.gather(*(self._to_one(src, dst, es, imm) for dst, es in groups.items()))

    def _route(self, dst: MrDescriptor) -> str:
        ext = dst.cuda
        if ext is None:
            return "host"
        if self.ipc and ext.host == self._boot and (ext.pid == self._pid and ext.token in self._by_token
                                                    or ext.has_ipc and ext.pid != self._pid):
            return "ipc"
        return ext.mode  # "staged" or "direct"

    async def _to_one(self, src: MemoryRegion | None, dst: MrDescriptor, es: list[Element],
                      imm: int | None) -> None:
        route = self._route(dst)
        if route == "ipc":
            await self._ipc_write(src, dst, es, imm)
            return
        chunks = self._chunks(es)
        staged_src = src is not None and src.cuda is not None and src.cuda.mirror != 0
        # NIC writes of chunk k start when its device->host copy is done; the copies
        # of later chunks run meanwhile.
        d2h = [self._d2h(src, c) if staged_src else None for c in chunks]  # type: ignore[arg-type]
        nic_imm = imm if route != "staged" else None
        nic = [asyncio.ensure_future(self._nic_chunk(src, dst, c, f, nic_imm)) for c, f in zip(chunks, d2h)]
        try:
            if route == "staged":
                # commits in chunk order: the owner copies them to its GPU in arrival order
                # and counts an element's imm with the chunk holding its last part
                for c, f in zip(chunks, nic):
                    await f
                    count = sum(1 for p in c if p[4]) if imm is not None else 0
                    await self._commit(dst, [(p[1], p[2]) for p in c], imm, count)
            else:
                await asyncio.gather(*nic)
                nsplit = sum(1 for c in chunks for p in c if p[4] and not p[3])
                if imm is not None and nsplit:
                    # elements cut into parts: their imm follows once every part landed
                    await self._engine._imm_only(dst, imm, nsplit)
        finally:
            for f in nic:
                if not f.done():
                    f.cancel()

    def _chunks(self, es: list[Element]) -> list[list[Part]]:
        # a commit names every range of its chunk: keep it within one message
        max_ranges = max(1, min(2000, (self._engine._cfg_args["msg_size"] - 1024) // _RANGE.size))
        return chunk_elements(es, self.chunk_bytes, max_ranges)

    def _d2h(self, src: MemoryRegion, chunk: list[Part]) -> asyncio.Future[None]:
        info = src.cuda
        assert info is not None
        ranges = _merge([(p[0], p[0], p[2]) for p in chunk])
        self.stats["staged_out"] += sum(n for _, _, n in ranges)
        return self._copies(info.device, [(info.mirror + s, info.ptr + s, n) for s, _, n in ranges])

    async def _nic_chunk(self, src: MemoryRegion | None, dst: MrDescriptor,
                         chunk: list[Part], d2h: asyncio.Future[None] | None,
                         imm: int | None) -> None:
        if d2h is not None:
            await d2h
        eng = self._engine
        whole = [(p[0], p[1], p[2]) for p in chunk if p[3]]
        parts = [(p[0], p[1], p[2]) for p in chunk if not p[3]]
        futs = []
        if whole:  # whole elements carry the imm (if any); parts of cut ones don't
            futs.append(eng._write_ranges(src, dst, whole, imm))
        if parts:
            futs.append(eng._write_ranges(src, dst, parts, None))
        await asyncio.gather(*futs)

    async def _commit(self, dst: MrDescriptor, ranges: list[tuple[int, int]], imm: int | None, count: int) -> None:
        ext = dst.cuda
        assert ext is not None
        body = _COMMIT.pack(_MAGIC, ext.token, _NO_IMM if imm is None else imm, count, len(ranges))
        body += b"".join(_RANGE.pack(d, n) for d, n in ranges)
        self.stats["commits_sent"] += 1
        await self._engine._send_ctrl(dst.address, body)

    async def _ipc_write(self, src: MemoryRegion | None, dst: MrDescriptor, es: list[Element],
                         imm: int | None) -> None:
        ext = dst.cuda
        assert ext is not None
        if ext.pid == self._pid:
            local = self._by_token[ext.token]
            assert local.cuda is not None
            base = local.cuda.ptr
        else:
            key = (ext.pid, ext.ipc_handle)
            mapped = self._ipc_maps.get(key)
            if mapped is None:
                self._drv.use_device(self._device_of(src))
                mapped = self._ipc_maps[key] = self._drv.ipc_open(ext.ipc_handle)
            base = mapped + ext.ipc_offset
        src_base = src.cuda.ptr if src is not None and src.cuda is not None else (src.address if src else 0)
        ranges = _merge([(e.src_off, e.dst_off, e.length) for e in es])
        if ranges:
            self.stats["ipc_writes"] += 1
            await self._copies(self._device_of(src), [(base + d, src_base + s, n) for s, d, n in ranges])
        if imm is not None:
            await self._engine._imm_only(dst, imm, len(es))

    def _device_of(self, src: MemoryRegion | None) -> int:
        if src is not None and src.cuda is not None:
            return src.cuda.device
        return 0

    # -- the owner's side ----------------------------------------------------------

    def on_commit(self, payload: bytes) -> None:
        """A writer's bytes are in a staged region's mirror: copy them to the GPU,
        then count the imm.  Malformed or unknown commits are dropped (counted)."""
        try:
            magic, token, imm, count, nranges = _COMMIT.unpack_from(payload)
            if magic != _MAGIC or len(payload) != _COMMIT.size + nranges * _RANGE.size:
                raise ValueError("malformed commit")
            region = self._by_token.get(token)
            if region is None or region.closed or region.cuda is None or not region.cuda.mirror:
                raise ValueError("commit for an unknown region")
            info = region.cuda
            pairs = []
            for i in range(nranges):
                off, n = _RANGE.unpack_from(payload, _COMMIT.size + i * _RANGE.size)
                if off + n > region.nbytes:
                    raise ValueError("commit range out of bounds")
                if n:
                    pairs.append((info.ptr + off, info.mirror + off, n))
        except (ValueError, struct.error) as e:
            self.stats["bad_commits"] += 1
            self._engine._log.warning("gpu.bad_commit", error=str(e))
            return
        self.stats["commits_received"] += 1
        self.stats["staged_in"] += sum(n for _, _, n in pairs)
        fut = self._copies(info.device, pairs)
        if imm != _NO_IMM and count:
            eng = self._engine
            fut.add_done_callback(lambda f: None if f.exception() or eng.closed else eng._imm_arrive(imm, count))

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        if self._waiter is not None:
            self._waiter.close()
            self._waiter = None
        for base in self._ipc_maps.values():
            try:
                self._drv.ipc_close(base)
            except cuda.CudaError:
                pass
        self._ipc_maps.clear()
        for dev, s in self._streams.items():
            try:
                self._drv.use_device(dev)
                self._drv.call("cuStreamDestroy", _vp(s))
            except cuda.CudaError:
                pass
        self._streams.clear()


def _vp(x: int) -> Any:
    import ctypes

    return ctypes.c_void_p(x)


def check_elements(src_len: int | None, elems: Sequence[Element]) -> None:
    """Bounds of every element, before anything is queued (OutOfBounds names it)."""
    for i, e in enumerate(elems):
        if src_len is not None and e.src_off + e.length > src_len:
            raise OutOfBounds(f"element {i}: source range {e.src_off}+{e.length} exceeds {src_len} bytes", index=i)
        if e.dst_off + e.length > e.dst.length:
            raise OutOfBounds(f"element {i}: destination range {e.dst_off}+{e.length} exceeds {e.dst.length} bytes",
                              index=i)

