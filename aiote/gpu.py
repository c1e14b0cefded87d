"""GPU memory in every operation: direct (GPUDirect), host-staged, or CUDA IPC.

A CUDA buffer is registered one of two ways (``TransferEngine(gpu=...)``):

* ``direct``: the NIC registers the device memory itself (``FI_HMEM``; efa,
  verbs with GPUDirect RDMA).  Writes are plain NIC writes.
* ``staged`` (shm, tcp and any NIC without GPUDirect): bytes pass through
  pinned host memory, one of two ways chosen per region at registration:
  - *mirror* (descriptor mode ``"staged"``), while the engine's mirror budget
    (``staging_mirror_bytes``) lasts: the region gets a pinned host mirror of
    the same size, registered with the NIC.  A GPU source is copied
    device→host into its mirror before the NIC reads it; a GPU destination
    receives into its mirror and the writer then sends a commit message
    naming the byte ranges; the owner copies them host→device and only then
    counts the imm.  Large transfers go in chunks, so the copies of one chunk
    overlap the network transfer of the next.
  - *pools* (mode ``"pooled"``), once the budget is spent: bytes pass through
    bounded pools of pinned bounce buffers, on both sides, chunks pipelined;
    the owner of a GPU region grants its slots to writers and counts the imm
    once the last chunk is in its GPU memory (aiote/staging.py).

Between processes of one host (same boot id) a GPU destination with a CUDA
IPC handle is written by mapping it (``cuIpcOpenMemHandle``) and copying with
the copy engines (NVLink between GPUs); the imm follows as an imm-only write
once the copy's event has completed, so ``imms.wait`` keeps its meaning.

Copies run on streams of their own (``cuMemcpyAsync``, the copy engines, no
kernels); a source tensor's pending work on torch's current stream is waited
for first.  The copies are queued by the C core (``aiote_submit_cuda``,
native/src/cuda_copy.c, libcuda dlopen'd there), which records an event after
them; the worker thread polls that event and then posts the operation's writes
(an IPC write's imm, a staged chunk's NIC write), or completes the operation
(a staged chunk's host->device copy on the owner's side, which then recycles
the slot and, after the last chunk, counts the imm).  For CUDA IPC no Python
runs between the copy and the imm.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from . import cuda
from ._core import check, ffi, lib
from .counters import IMM_MAX
from .descriptor import CudaExt, MrDescriptor
from .errors import AioteError, InvalidArgument, OutOfBounds
from .staging import MAGIC as _STAGING_MAGIC
from .staging import Staging, withdraw

if TYPE_CHECKING:
    from .engine import TransferEngine
    from .memory import MemoryRegion

__all__ = ["GpuPaths", "Element", "chunk_elements"]

# the mirror protocol's commit (a writer's bytes are in the owner's mirror)
_COMMIT = struct.Struct("<4sQIII")  # magic, token, imm (or NO_IMM), imm count, range count
_RANGE = struct.Struct("<QQ")
_MAGIC = b"AGC1"
_MAX_LANES = 16  # copy lanes (streams) per source device: destination GPUs beyond share
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
    mirror: int     # pinned host mirror (staged, mirror protocol), 0 if none
    token: int
    pooled: bool = False  # staged without a mirror: bytes pass through the bounce pools

    @property
    def staged(self) -> bool:
        """Bytes to and from the NIC pass through pinned host memory (mirror or pools)."""
        return self.mirror != 0 or self.pooled


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


#: every open GPU region of this process, by token: an engine writing to a GPU region
#: of another engine of this process (e.g. one per GPU) copies to its pointer directly
#: (a legacy IPC handle can't be opened in the process that made it)
_LOCAL_REGIONS: dict[int, MemoryRegion] = {}


def _local_region(token: int) -> MemoryRegion | None:
    r = _LOCAL_REGIONS.get(token)
    return r if r is not None and not r.closed and r.cuda is not None else None


class GpuPaths:
    """The GPU side of one engine: registration, routing, copies, commits."""

    #: ``ipc_batch`` puts the copies to each destination GPU on a stream of their own
    #: (False: all on this engine's stream of the device, one after another)
    copy_lanes = True

    def __init__(self, engine: TransferEngine, mode: str, ipc: bool, chunk_bytes: int, staging_bytes: int,
                 mirror_bytes: int = 0):
        self._engine = engine
        self.mode = mode              # "staged" or "direct"
        self.ipc = ipc                # use CUDA IPC for same-host GPU destinations
        self.chunk_bytes = chunk_bytes
        self._drv = cuda.driver()
        self._boot = cuda.boot_id()
        self._pid = os.getpid()
        check(lib.aiote_cuda_load(), "CUDA driver")  # the C core's own binding of libcuda
        self._streams: dict[int, int] = {}
        self._ctxs: dict[int, int] = {}
        self._by_token: dict[int, MemoryRegion] = {}
        self._ipc_maps: dict[tuple[int, bytes], int] = {}  # (pid, handle) -> mapped base
        self._ipc_unmap: list[Any] = []  # how to undo each mapping, at close
        self._ipc_broken: set[tuple[int, bytes]] = set()  # handles that could not be mapped: NIC path
        # the write fast path, per destination descriptor (by identity: hashing a
        # descriptor costs more than the rest of the call): (descriptor, mapped base, rdesc)
        self._plans: dict[int, tuple[MrDescriptor, int, int, int]] = {}
        self._dev: dict[int, tuple[int, int]] = {}  # device -> (context, aiote's stream)
        # ipc_batch's copy lanes: per source device, a stream and an event per destination GPU
        # (so one batch's copies to several peers overlap on the copy engines), the C array
        # of (stream, event) pairs, and the fork event recorded on torch's stream
        self._wr_rd: dict[int, tuple[MrDescriptor, int]] = {}  # ipc_batch's write targets: id -> (desc, rdesc)
        self._lane_of: dict[tuple[int, bytes], int] = {}
        self._lanes: dict[int, tuple[Any, list[int], int]] = {}
        self._raw_stream: Any = None  # torch._C._cuda_getCurrentRawStream, once torch is up
        self.mirror_budget = self.mirror_left = mirror_bytes  # staged regions' mirrors, engine-wide
        self.stats = {"staged_in": 0, "staged_out": 0, "ipc_writes": 0, "commits_sent": 0,
                      "commits_received": 0, "bad_commits": 0, "grants": 0, "lane_batches": 0,
                      # pinned host memory: mirrors + pools = staging_pinned
                      "staging_pinned": 0, "mirror_pinned": 0, "pool_pinned": 0, "mirror_left": mirror_bytes,
                      # staged regions open now, per protocol; staged writes per protocol (one per
                      # destination of a write, by the destination's protocol; by the source's)
                      "mirror_regions": 0, "pooled_regions": 0, "writes_to_mirror": 0, "writes_to_pool": 0,
                      "writes_from_mirror": 0, "writes_from_pool": 0}
        self.staging = Staging(self, staging_bytes, chunk_bytes)

    def pinned_changed(self) -> None:
        st = self.stats
        st["pool_pinned"] = self.staging.pinned_bytes()
        st["mirror_pinned"] = self.mirror_budget - self.mirror_left
        st["mirror_left"] = self.mirror_left
        st["staging_pinned"] = st["pool_pinned"] + st["mirror_pinned"]

    # -- registration ------------------------------------------------------------

    def register(self, cp: cuda.CudaPointer) -> MemoryRegion:
        from .memory import MemoryRegion

        eng, drv = self._engine, self._drv
        drv.use_device(cp.device)
        token = secrets.randbits(64)
        mirror, n = 0, cp.nbytes
        if self.mode == "direct":
            region = MemoryRegion._from_device(eng, cp)
            mode = "direct"
        elif self.mirror_budget and n <= self.mirror_left:
            # the mirror protocol: a pinned host mirror of the whole region, from the budget
            mirror = drv.host_alloc(n)
            try:
                region = MemoryRegion._from_raw(eng, mirror, n, cp.keep)
            except BaseException:
                drv.host_free(mirror)
                raise
            self.mirror_left -= n
            self.stats["mirror_regions"] += 1
            self.pinned_changed()
            region._on_close.append(lambda: self._mirror_freed(mirror, n))
            mode = "staged"
        else:
            # the pools: no host memory of its own, the NIC never touches the region (writes
            # to it land in the owner's bounce slots); a 64-byte stand-in gives it a key and an id
            self.staging.ensure_recv_pool()
            region = MemoryRegion(eng, bytearray(64))
            region.address, region.nbytes, region._keep = cp.ptr, n, (cp.keep, region._keep)
            region._descriptor = replace(region._descriptor, length=n)
            self.stats["pooled_regions"] += 1
            region._on_close.append(lambda: self.stats.__setitem__("pooled_regions",
                                                                   self.stats["pooled_regions"] - 1))
            mode = "pooled"
        handle, offset, kind = bytes(64), 0, 0
        try:
            base, _ = drv.address_range(cp.ptr)
            handle, offset = drv.ipc_handle(base), cp.ptr - base
        except cuda.CudaError:
            # VMM memory (torch's expandable segments) has no legacy handle: shareable
            # handles (POSIX fds) instead; memory that has neither is reached over the NIC path
            try:
                exp = drv.vmm_export(cp.ptr, cp.nbytes)
            except cuda.CudaError as e:
                eng._log.debug("gpu.no_ipc_handle", error=str(e))
            else:
                handle, offset, kind = exp.handle, exp.offset, 1
                region._on_close.append(exp.close)
        ext = CudaExt(mode, cp.device, token, self._boot, self._pid, drv.device_uuid(cp.device), handle,
                      offset, kind)
        region._descriptor = replace(region._descriptor, cuda=ext)
        region.cuda = _GpuInfo(cp.device, cp.ptr, mirror, token, mode == "pooled")
        region.device = cp.device
        self._by_token[token] = region
        _LOCAL_REGIONS[token] = region
        region._on_close.append(lambda: (self._by_token.pop(token, None), _LOCAL_REGIONS.pop(token, None),
                                         self.staging.region_closed(token)))
        return region

    def _mirror_freed(self, mirror: int, n: int) -> None:
        """A mirrored region was closed (after the copies it had in flight): its mirror is
        freed and its bytes go back to the budget."""
        self._drv.host_free(mirror)
        self.mirror_left += n
        self.stats["mirror_regions"] -= 1
        self.pinned_changed()

    def local_region(self, token: int) -> MemoryRegion | None:
        return self._by_token.get(token)

    # -- copies --------------------------------------------------------------------

    def _stream(self, device: int, h2d: bool = False) -> int:
        """aiote's stream of a device; the staged path's host->device copies have their
        own (key -1 - device), so they overlap the device->host copies of our own writes."""
        key = -1 - device if h2d else device
        s = self._streams.get(key)
        if s is None:
            self._drv.use_device(device)
            s = self._streams[key] = self._drv.stream()
        return s

    def _after_torch(self, device: int, stream: int) -> None:
        """Order our copy after work already queued on torch's current stream."""
        wait, ts = self._torch_stream(device)
        if not wait:
            return
        ev = self._drv.event()
        self._drv.record(ev, ts)
        self._drv.call("cuStreamWaitEvent", _vp(stream), _vp(ev), 0)
        self._drv.destroy_event(ev)  # destroyed after the wait is queued: allowed by CUDA

    def _ctx(self, device: int) -> int:
        c = self._ctxs.get(device)
        if c is None:
            c = self._ctxs[device] = self._drv.context(device)
        return c

    def _torch_stream(self, device: int) -> tuple[int, int]:
        """(1, torch's current stream of the device) to order copies after it, or (0, 0)."""
        raw = self._raw_stream
        if raw is not None:
            return 1, raw(device)
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_initialized():
            return 0, 0
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # 0.3 us; current_stream() takes 6
        if raw is not None:
            self._raw_stream = raw
            return 1, int(raw(device))
        return 1, int(torch.cuda.current_stream(device).cuda_stream)

    def _gated(self, device: int, wait: tuple[int, int], copies: Sequence[tuple[int, int, int]],
               src: MemoryRegion | None, dst: MrDescriptor | None, ranges: Sequence[tuple[int, int, int]],
               imm: int | None, h2d: bool = False) -> asyncio.Future[None]:
        """Copies (dst address, src address, n) on the device's stream, then NIC writes
        (src_off, dst_off, len) of src into dst, posted by the worker once the copies
        are done; one future for the whole."""
        return self._engine._submit_cuda(self._ctx(device), self._stream(device, h2d), wait, copies, src, dst,
                                         ranges, imm)

    # -- writes --------------------------------------------------------------------

    def submit(self, src: MemoryRegion | None, elems: list[Element], imm: int | None) -> asyncio.Future[None]:
        """Writes where the source or a destination is GPU memory (bounds already checked)."""
        loop = self._engine._loop_checked()
        dst = elems[0].dst
        if self._route(dst, self._device_of(src)) == "ipc" and all(e.dst is dst or e.dst == dst for e in elems):
            # the common case, no Python task: copies + imm in one C operation
            return self._ipc_write(src, dst, elems, imm, self._torch_stream(self._device_of(src)))
        if src is not None and src.cuda is not None:
            self._after_torch(src.cuda.device, self._stream(src.cuda.device))
        return loop.create_task(self._run(src, elems, imm))

    async def _run(self, src: MemoryRegion | None, elems: list[Element], imm: int | None) -> None:
        groups: dict[MrDescriptor, list[Element]] = {}
        for e in elems:
            groups.setdefault(e.dst, []).append(e)
        if src is not None:
            src._busy += 1  # deregistering it now: RegionInUse (chunks of it are still to go)
        try:
            await asyncio.gather(*(self._to_one(src, dst, es, imm) for dst, es in groups.items()))
        finally:
            if src is not None:
                src._busy -= 1

    def _route(self, dst: MrDescriptor, device: int = 0) -> str:
        """How a write reaches dst: "ipc" (copy engines, this host: dst is mapped here,
        or another engine's region of this process), else dst's mode over the NIC."""
        ext = dst.cuda
        if ext is None:
            return "host"
        if self.ipc and ext.host == self._boot:
            if ext.pid == self._pid:
                if _local_region(ext.token) is not None:
                    return "ipc"
            elif ext.has_ipc and self._map(ext, device) is not None:
                return "ipc"
        return ext.mode  # "staged" (a mirror), "pooled" or "direct"

    def _map(self, ext: CudaExt, device: int) -> int | None:
        """Where another process's region (its whole allocation) is mapped here, mapping it
        the first time: a legacy IPC handle, or VMM shareable handles; None if it can't
        be mapped (then the NIC path serves it)."""
        key = (ext.pid, ext.ipc_handle)
        base = self._ipc_maps.get(key)
        if base is not None or key in self._ipc_broken:
            return base
        drv = self._drv
        try:
            drv.use_device(device)
            if ext.ipc_kind == 1:
                base, span, mapped = drv.vmm_import(ext.pid, ext.ipc_handle, list(range(drv.device_count())))
                self._ipc_unmap.append(lambda: drv.vmm_close(base, span, mapped))
            else:
                base = drv.ipc_open(ext.ipc_handle)
                self._ipc_unmap.append(lambda: drv.ipc_close(base))
        except cuda.CudaError as e:
            if len(self._ipc_broken) >= 4096:
                self._ipc_broken.clear()
            self._ipc_broken.add(key)
            self._engine._log.warning("gpu.ipc_map_failed", pid=ext.pid, kind=ext.ipc_kind, error=str(e))
            return None
        self._ipc_maps[key] = base
        return base

    async def _to_one(self, src: MemoryRegion | None, dst: MrDescriptor, es: list[Element],
                      imm: int | None) -> None:
        route = self._route(dst, self._device_of(src))
        if route == "ipc":
            await self._ipc_write(src, dst, es, imm, (0, 0))  # ordered after torch's stream in submit
            return
        info = src.cuda if src is not None else None
        if info is not None and info.staged:
            self.stats["writes_from_mirror" if info.mirror else "writes_from_pool"] += 1
        if route == "pooled":
            self.stats["writes_to_pool"] += 1
            await self.staging.to_staged(src, dst, es, imm)
        elif route != "staged" and info is not None and info.pooled:
            await self.staging.from_gpu(src, dst, es, imm)  # type: ignore[arg-type]
        else:
            await self._nic(src, dst, es, imm, route == "staged")

    async def _nic(self, src: MemoryRegion | None, dst: MrDescriptor, es: list[Element], imm: int | None,
                   to_mirror: bool) -> None:
        """NIC writes of chunks to a host, GPUDirect or mirrored region (then a commit per
        chunk: the owner copies it to its GPU and counts the imm).  A GPU source's chunk is
        copied into its mirror, or a send slot, first."""
        chunks = self._chunks(es)
        # NIC writes of chunk k are posted by the worker when its device->host copy
        # is done; the copies of later chunks run meanwhile.
        nic_imm = imm if not to_mirror else None
        if to_mirror:
            self.stats["writes_to_mirror"] += 1
        nic = [self._nic_chunk(src, dst, c, nic_imm) for c in chunks]
        try:
            if to_mirror:
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
                    if hasattr(f, "_aiote_task"):  # a send slot's: its wait, or its C operation
                        withdraw(self._engine, f)
                    f.cancel()

    def _chunks(self, es: list[Element]) -> list[list[Part]]:
        # a commit names every range of its chunk: keep it within one message
        max_ranges = max(1, min(2000, (self._engine._cfg_args["msg_size"] - 1024) // _RANGE.size))
        return chunk_elements(es, self.chunk_bytes, max_ranges)

    def _nic_chunk(self, src: MemoryRegion | None, dst: MrDescriptor, chunk: list[Part],
                   imm: int | None) -> asyncio.Future[None]:
        """One chunk's NIC writes (after its device->host copy for a staged source).  A chunk
        holds whole elements, which carry the imm (if any), or one part of a cut element,
        which doesn't."""
        ranges = [(p[0], p[1], p[2]) for p in chunk]
        whole = chunk[0][3]
        assert all(p[3] == whole for p in chunk)
        nimm = imm if whole else None
        info = src.cuda if src is not None else None
        if info is None or not info.staged:
            return self._engine._write_ranges(src, dst, ranges, nimm)
        assert src is not None
        if info.pooled:  # packed into a send slot, written from there
            packed, pos = [], 0
            for so, _, n in ranges:
                packed.append((so, pos, n))
                pos += n
            return self.staging._gpu_out(src, packed, dst, [(o, d, n) for (_, o, n), (_, d, _) in
                                                            zip(packed, ranges)], nimm)
        return self.mirror_out(src, dst, ranges, nimm)

    def mirror_out(self, src: MemoryRegion, dst: MrDescriptor, ranges: Sequence[tuple[int, int, int]],
                   imm: int | None) -> asyncio.Future[None]:
        """(src_off, dst_off, n) ranges of a mirrored GPU source: copied device->host into its
        mirror, then NIC writes from there; one C operation."""
        info = src.cuda
        assert info is not None and info.mirror
        merged = _merge([(so, so, n) for so, _, n in ranges])
        self.stats["staged_out"] += sum(n for _, _, n in merged)
        return self._gated(info.device, (0, 0), [(info.mirror + o, info.ptr + o, n) for o, _, n in merged],
                           src, dst, ranges, imm)

    async def _commit(self, dst: MrDescriptor, ranges: list[tuple[int, int]], imm: int | None, count: int) -> None:
        ext = dst.cuda
        assert ext is not None
        body = _COMMIT.pack(_MAGIC, ext.token, _NO_IMM if imm is None else imm, count, len(ranges))
        body += b"".join(_RANGE.pack(d, n) for d, n in ranges)
        self.stats["commits_sent"] += 1
        await self._engine._send_ctrl(dst.address, body)

    def ipc_write_one(self, src: MemoryRegion, dst: MrDescriptor, length: Any, src_off: Any, dst_off: Any,
                      imm: Any) -> asyncio.Future[None] | None:
        """``write`` from a GPU region to a GPU region reached over CUDA IPC (or another
        engine's region in this process), without the general path's layers: one C
        call with plain integers; None when anything is unusual (the general path then
        handles it, errors included)."""
        info = src.cuda
        plan = self._plans.get(id(dst))
        if plan is None or plan[0] is not dst:
            if info is None:
                return None
            plan = self._plan(dst, info.device)
            if plan is None:
                return None
        eng = self._engine
        if (info is None or src._closed or eng._h is None or eng._closed or eng._deferred
                or type(length) is not int or type(src_off) is not int or type(dst_off) is not int
                or not (0 < length and 0 <= src_off and 0 <= dst_off and src_off + length <= src.nbytes
                        and dst_off + length <= dst.length)):
            return None
        if imm is None:
            has_imm = imm_v = 0
        elif type(imm) is int and 0 <= imm <= IMM_MAX:
            has_imm, imm_v = 1, imm
        else:
            return None
        device = info.device
        cs = self._dev.get(device)
        if cs is None:
            cs = self._dev[device] = (self._ctx(device), self._stream(device))
        raw = self._raw_stream
        if raw is not None:
            w, ws = 1, raw(device)
        else:
            w, ws = self._torch_stream(device)
        op_id = next(eng._op_ids)
        rc = lib.aiote_submit_cuda_one(eng._h, op_id, cs[0], cs[1], w, ws, plan[1] + dst_off, info.ptr + src_off,
                                          length, src._id, plan[2], has_imm, imm_v)
        if rc < 0:
            if rc == -lib.AIOTE_E_AGAIN:
                return None  # the engine is full: the general path queues it
            check(rc, "write")
        self.stats["ipc_writes"] += 1
        return eng._track(op_id, src)

    def _plan(self, dst: MrDescriptor, device: int) -> tuple[MrDescriptor, int, int, int] | None:
        """The fast path's facts about dst (mapped there, remote region resolved), or None
        where dst is not reached over CUDA IPC."""
        if type(dst) is not MrDescriptor or dst.cuda is None or self._route(dst, device) != "ipc":
            return None
        if dst.cuda.pid == self._pid:
            return None  # the pointer may be closed under us: the general path looks it up each time
        plan = (dst, self._ipc_base(dst, device), self._engine._rdesc(dst), self._lane(device, dst.cuda.device_uuid))
        if len(self._plans) >= 4096:
            self._plans.clear()
        self._plans[id(dst)] = plan
        return plan

    def _lane(self, device: int, uuid: bytes) -> int:
        """The copy lane of device for copies into the GPU uuid (created on first use)."""
        k = (device, uuid)
        lane = self._lane_of.get(k)
        if lane is not None:
            return lane
        arr, used, fork = self._lanes.get(device) or (ffi.new("uint64_t[]", 2 * _MAX_LANES), [0], 0)
        if not fork:
            self._drv.use_device(device)
            fork = self._drv.event()
        lane = used[0] % _MAX_LANES  # more destination GPUs than lanes: they share
        if used[0] < _MAX_LANES:
            self._drv.use_device(device)
            arr[2 * lane], arr[2 * lane + 1] = self._drv.stream(), self._drv.event()
            used[0] += 1
        self._lanes[device] = (arr, used, fork)
        self._lane_of[k] = lane
        return lane

    def ipc_reachable(self, dst: MrDescriptor, device: int) -> bool:
        """Whether ``ipc_batch`` can copy into dst: a GPU region of another process of this
        host, mapped here over CUDA IPC."""
        return self._plan(dst, device) is not None

    def ipc_batch(self, device: int, copies: Sequence[tuple[MrDescriptor, int, int, int]],
                  src: MemoryRegion | None, writes: Sequence[tuple[MrDescriptor, int, int, int]],
                  imm: int | None) -> asyncio.Future[None]:
        """Copies into GPU regions of other processes of this host, then writes: one operation.

        ``copies``: (destination descriptor, offset in it, source device address, length),
        destinations for which ``ipc_reachable`` holds; they go on this engine's stream of
        ``device`` after the work queued on torch's current stream.  ``writes``:
        (descriptor, src_offset, dst_offset, length) of ``src`` (length 0: an imm-only
        write; ``src`` None for imm-only writes alone), each with ``imm``, posted by the
        worker once every copy is done, so a peer that counts the imm sees the copied bytes
        too.  One C call, one event and one future for the whole batch (many peers)."""
        cps: list[tuple[int, int, int]] = []
        lane_of = bytearray()
        plans = self._plans
        for i, (d, off, addr, n) in enumerate(copies):
            plan = plans.get(id(d))
            if plan is None or plan[0] is not d:
                plan = self._plan(d, device)
                if plan is None:
                    raise InvalidArgument(f"copy {i}: the destination is not reached over CUDA IPC from here")
            if type(off) is not int or type(n) is not int or off < 0 or n < 0 or off + n > d.length:
                raise OutOfBounds(f"copy {i}: destination range {off}+{n} exceeds {d.length} bytes", index=i)
            if n:
                cps.append((plan[1] + off, addr, n))
                lane_of.append(plan[3])
        src_len = src.nbytes if src is not None else 0
        rds, eng = self._wr_rd, self._engine
        tw: list[tuple[int, int, int, int]] = []
        for i, (d, so, do, n) in enumerate(writes):
            if (type(so) is not int or type(do) is not int or type(n) is not int or min(so, do, n) < 0
                    or so + n > src_len or do + n > d.length):
                raise OutOfBounds(f"write {i}: {so}+{n} of the source ({src_len} bytes) to {do} of the destination "
                                  f"({d.length} bytes) is out of bounds", index=i)
            rd = rds.get(id(d))  # by identity: hashing a descriptor costs more than packing the write
            if rd is None or rd[0] is not d:
                if len(rds) >= 4096:
                    rds.clear()
                rd = rds[id(d)] = (d, eng._rdesc(d))
            tw.append((rd[1], so, do, n))
        lanes = None
        if cps:
            self.stats["ipc_writes"] += 1
            if self.copy_lanes and len(cps) > 1 and lane_of.count(lane_of[0]) != len(lane_of):
                # copies to several GPUs: each destination's on a stream of its own
                arr, used, fork = self._lanes[device]
                lanes = (bytes(lane_of), arr, min(used[0], _MAX_LANES), fork)
                self.stats["lane_batches"] += 1
        return eng._submit_cuda_to(self._ctx(device), self._stream(device), self._torch_stream(device), cps, src,
                                   tw, imm, lanes)

    def batch_plan(self, device: int, copy_dsts: Sequence[MrDescriptor], src: MemoryRegion | None,
                   write_dsts: Sequence[MrDescriptor]) -> IpcBatchPlan:
        """``ipc_batch`` for destinations known ahead (an application's peers), resolved
        once: see IpcBatchPlan."""
        return IpcBatchPlan(self, device, copy_dsts, src, write_dsts)

    def forget_plans(self) -> None:
        """A peer went away: its descriptors resolve afresh."""
        self._plans.clear()
        self._wr_rd.clear()

    def _ipc_base(self, dst: MrDescriptor, device: int) -> int:
        """Where dst's byte 0 is mapped in this process."""
        ext = dst.cuda
        assert ext is not None
        if ext.pid == self._pid:  # this engine's region or another engine's of this process
            local = _local_region(ext.token)
            if local is None:
                raise OutOfBounds("the destination GPU region of this process is closed")
            assert local.cuda is not None
            return local.cuda.ptr
        mapped = self._map(ext, device)
        if mapped is None:
            raise cuda.CudaError("the destination GPU region can't be mapped here")
        return mapped + ext.ipc_offset

    def _ipc_write(self, src: MemoryRegion | None, dst: MrDescriptor, es: Sequence[Element],
                   imm: int | None, wait: tuple[int, int]) -> asyncio.Future[None]:
        """Copies into the mapped destination, then (the worker, once they are done)
        one imm-only write per element: the owner counts the imm after the bytes landed."""
        device = self._device_of(src)
        base = self._ipc_base(dst, device)
        src_base = src.cuda.ptr if src is not None and src.cuda is not None else (src.address if src else 0)
        ranges = _merge([(e.src_off, e.dst_off, e.length) for e in es])
        if ranges:
            self.stats["ipc_writes"] += 1
        imms = [(0, 0, 0)] * len(es) if imm is not None else []
        return self._gated(device, wait, [(base + d, src_base + s, n) for s, d, n in ranges], src, dst, imms, imm)

    def _device_of(self, src: MemoryRegion | None) -> int:
        if src is not None and src.cuda is not None:
            return src.cuda.device
        return 0

    # -- the owner's side ----------------------------------------------------------

    def on_ctrl(self, payload: bytes, sender: tuple[bytes, ...]) -> None:
        """An aiote control message: a mirror commit, or the pools' protocol (aiote/staging.py)."""
        if payload[:4] == _STAGING_MAGIC:
            self.staging.on_message(payload, sender)
        elif payload[:4] == _MAGIC:
            self.on_commit(payload)
        else:
            self.stats["bad_commits"] += 1
            self._engine._log.warning("gpu.bad_control_message")

    def on_commit(self, payload: bytes) -> None:
        """A writer's bytes are in a mirrored region's mirror: copy them to the GPU,
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
        # the C core copies host->device and counts the imm once the copy's event completed
        try:
            self._engine._cuda_arrive(self._ctx(info.device), self._stream(info.device), pairs,
                                      imm if imm != _NO_IMM else 0, count if imm != _NO_IMM else 0)
        except AioteError as e:  # CUDA refused the copy: the imm is never counted (the waiter times out)
            self.stats["bad_commits"] += 1
            self._engine._log.error("gpu.commit_copy_failed", error=str(e))

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """After the engine's shutdown (which waited for the copies it had queued)."""
        self.staging.close()
        for unmap in self._ipc_unmap:
            try:
                unmap()
            except cuda.CudaError:
                pass
        self._ipc_unmap.clear()
        self._ipc_maps.clear()
        for key, s in self._streams.items():
            try:
                self._drv.use_device(key if key >= 0 else -1 - key)
                self._drv.call("cuStreamDestroy", _vp(s))
            except cuda.CudaError:
                pass
        self._streams.clear()
        for device, (arr, used, fork) in self._lanes.items():
            try:
                self._drv.use_device(device)
                for k in range(min(used[0], _MAX_LANES)):
                    self._drv.call("cuStreamDestroy", _vp(arr[2 * k]))
                    self._drv.destroy_event(arr[2 * k + 1])
                self._drv.destroy_event(fork)
            except cuda.CudaError:
                pass
        self._lanes.clear()
        self._lane_of.clear()


class IpcBatchPlan:
    """``GpuPaths.ipc_batch`` with its destinations fixed ahead: their mapped bases, copy
    lanes and write targets resolved once (``GpuPaths.batch_plan``), so that each
    ``submit`` only checks and packs the call's offsets and lengths and makes the C call
    (on a busy host each line of Python of the general path costs microseconds, on the
    path of every MoE dispatch and combine).  Same semantics as ``ipc_batch``."""

    def __init__(self, paths: GpuPaths, device: int, copy_dsts: Sequence[MrDescriptor], src: MemoryRegion | None,
                 write_dsts: Sequence[MrDescriptor]):
        bases, lens, lane_ids = [], [], []
        for i, d in enumerate(copy_dsts):
            plan = paths._plan(d, device)
            if plan is None:
                raise InvalidArgument(f"copy destination {i}: not reached over CUDA IPC from here")
            bases.append(plan[1])
            lens.append(d.length)
            lane_ids.append(plan[3])
        eng = paths._engine
        self._paths, self._eng, self._device, self._src = paths, eng, device, src
        self._bases, self._lens, self._lane_ids = bases, lens, lane_ids
        self._rds = [eng._rdesc(d) for d in write_dsts]
        self._wlens = [d.length for d in write_dsts]
        self._src_len = src.nbytes if src is not None else 0
        self._ctx, self._stream = paths._ctx(device), paths._stream(device)
        self._wfmt: dict[int, struct.Struct] = {}
        self._bad = ffi.new("uint64_t*")

    def submit(self, copies: Sequence[tuple[int, int, int]], writes: Sequence[tuple[int, int, int]],
               imm: int) -> asyncio.Future[None]:
        """``copies[i]``: (offset in copy destination i, source device address, length; 0:
        nothing to copy there); ``writes[i]``: (offset in src, offset in write destination
        i, length; 0: an imm-only write), each carrying ``imm``, posted by the worker once
        every copy is done.  One C call, one future."""
        flat: list[int] = []
        lane_of = bytearray()
        bases, lens, lane_ids = self._bases, self._lens, self._lane_ids
        for i, (off, addr, n) in enumerate(copies):
            if n:
                if type(off) is not int or type(n) is not int or off < 0 or n < 0 or off + n > lens[i]:
                    raise OutOfBounds(f"copy {i}: destination range {off}+{n} exceeds {lens[i]} bytes", index=i)
                flat += (bases[i] + off, addr, n)
                lane_of.append(lane_ids[i])
        wflat: list[int] = []
        rds, wlens, slen = self._rds, self._wlens, self._src_len
        for i, (so, do, n) in enumerate(writes):
            if (type(so) is not int or type(do) is not int or type(n) is not int or min(so, do, n) < 0
                    or so + n > slen or do + n > wlens[i]):
                raise OutOfBounds(f"write {i}: {so}+{n} of the source ({slen} bytes) to {do} of the destination "
                                  f"({wlens[i]} bytes) is out of bounds", index=i)
            wflat += (rds[i], 0, so, do, n)
        if type(imm) is not int or not 0 <= imm <= IMM_MAX:
            raise InvalidArgument(f"imm must be an int in 0..{IMM_MAX}, got {imm!r}")
        paths, eng, src = self._paths, self._eng, self._src
        h = eng._handle()
        mr_id = src._mr_id() if src is not None else eng._scratch()._mr_id()
        nw, nc = len(writes), len(lane_of)
        wrs: Any = ffi.NULL
        if nw:
            fmt = self._wfmt.get(nw)
            if fmt is None:
                fmt = self._wfmt[nw] = struct.Struct("=" + "IIQQQ" * nw)  # aiote_wr
            wrs = ffi.from_buffer("aiote_wr[]", fmt.pack(*wflat))
        cps: Any = ffi.from_buffer("aiote_copy[]", struct.pack(f"={3 * nc}Q", *flat)) if nc else ffi.NULL
        w, ws = paths._torch_stream(self._device)
        ctx, stream, bad = self._ctx, self._stream, self._bad
        if nc:
            paths.stats["ipc_writes"] += 1
            if paths.copy_lanes and nc > 1 and lane_of.count(lane_of[0]) != nc:  # copies to several GPUs
                arr, used, fork = paths._lanes[self._device]
                nl, lo = min(used[0], _MAX_LANES), bytes(lane_of)
                paths.stats["lane_batches"] += 1

                def submit_lanes(op_id: int) -> int:
                    rc = lib.aiote_submit_cuda_lanes(h, op_id, ctx, stream, w, ws, cps, lo, nc, arr, nl, fork, mr_id,
                                                     wrs, nw, 1, imm, bad)
                    if rc < 0 and rc != -lib.AIOTE_E_AGAIN:
                        check(rc, index=int(bad[0]))
                    return rc

                return eng._submit(submit_lanes, (src, wrs, cps, lo, arr))

        def submit(op_id: int) -> int:
            rc = lib.aiote_submit_cuda(h, op_id, ctx, stream, w, ws, cps, nc, mr_id, wrs, nw, 1, imm, bad)
            if rc < 0 and rc != -lib.AIOTE_E_AGAIN:
                check(rc, index=int(bad[0]))
            return rc

        return eng._submit(submit, (src, wrs, cps))


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

