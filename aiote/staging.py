"""The host-staged GPU path's pools: bounded pinned bounce buffers, both sides.

A staged GPU region gets a full pinned mirror while the engine's mirror budget
(``staging_mirror_bytes``) lasts (aiote/gpu.py: one commit message per chunk, no
round trip); a region that doesn't fit in what is left is *pooled* (descriptor
mode ``"pooled"``) and written through the protocol below.  A GPU source without
a mirror is copied into a send slot.

Where the NIC can't reach GPU memory (tcp, shm), bytes between a GPU region and
the network pass through pinned host memory.  Each engine owns two pools of
fixed-size slots (``TransferEngine(staging_bytes=..., staging_chunk=...)``),
allocated on first use: a *send* pool (a GPU source is copied device→host into a
slot, then written from there) and a *receive* pool (a write to one of its staged
GPU regions lands in a slot, is copied host→device, and the slot is recycled).
Pinned host memory is bounded by the pools, not by the regions registered.

The receiver owns its slots; a writer may only write into a slot granted to it.
Per write to a staged GPU region (one "transfer"), as aiote control messages:

    writer                                   owner of the GPU region
    REQ(xfer, token, chunks, imm, count) ─►  queued for slots
                                        ◄─  GRANT(xfer, slot, slot_len, offset, pool descriptor)
    [WANT(xfer, chunks) if its slots are smaller than the writer's chunks]
    D2H into a send slot (GPU source), NIC write into the granted slot
    COMMIT(xfer, slot, chunk, ranges)  ─►   H2D copy from the slot; when it is done the
                                             slot is recycled (granted to the next transfer)
                                        ◄─  DONE(xfer, status) after the last chunk's copy:
                                             the imm was counted just before
    CANCEL(xfer) ─►  (writer gave up, after its NIC writes finished): slots released

Chunks are pipelined: every granted slot carries a chunk in flight, so the D2H
copy of one chunk, the NIC write of another and the owner's H2D copy of a third
overlap.  Slots are granted one at a time, round robin over the transfers that
want one, so concurrent writes share a pool fairly; no transfer holds a slot
while it waits for another, so writes larger than the pool can't deadlock.
Every message from the wire is checked; a bad one fails its transfer (DONE with
an error, counted in ``gpu_stats["bad_commits"]``) and changes no memory.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._core import lib
from .counters import IMM_MAX
from .cuda import CudaError
from .descriptor import EngineAddress, MrDescriptor
from .errors import AioteError, DescriptorError, EngineClosed, OutOfBounds, PeerUnreachable, ProviderError, RegionClosed

if TYPE_CHECKING:
    from .engine import TransferEngine
    from .gpu import Element, GpuPaths
    from .memory import MemoryRegion

__all__ = ["Staging", "MAGIC"]

MAGIC = b"AGS2"
_HDR = struct.Struct("<4sB3x")
REQ, WANT, GRANT, COMMIT, CANCEL, DONE = 1, 2, 3, 4, 5, 6
_REQ = struct.Struct("<QQIIIQ")      # xfer, region token, chunks, imm (or NO_IMM), imm count, bytes
_WANT = struct.Struct("<QI")         # xfer, chunks
_GRANT = struct.Struct("<QIIQ")      # xfer, slot, slot length, slot offset in the pool; + pool descriptor
_COMMIT = struct.Struct("<QIII")     # xfer, slot, chunk index, range count; + ranges
_RANGE = struct.Struct("<QQ")        # destination offset, length (packed in the slot in this order)
_CANCEL = struct.Struct("<Q")
_DONE = struct.Struct("<QI")         # xfer, status; + utf-8 reason
NO_IMM = 0xFFFFFFFF

# DONE statuses: the writer raises the matching error
OK, E_REGION, E_BOUNDS, E_PROTO, E_COPY, E_BUSY = 0, 1, 2, 3, 4, 5
_ERRORS: dict[int, Callable[[str], AioteError]] = {
    E_REGION: RegionClosed, E_BOUNDS: OutOfBounds, E_PROTO: DescriptorError, E_BUSY: ProviderError,
    E_COPY: CudaError,
}
_MAX_IN = 1 << 16            # transfers an owner tracks at once (more are refused: E_BUSY)
_MAX_RANGES = 2000


class _Pool:
    """Fixed-size slots of pinned host memory, registered with the NIC as one region."""

    def __init__(self, eng: TransferEngine, drv: Any, nslots: int, slot_len: int, on_release: Callable[[], None]):
        from .memory import MemoryRegion

        self.nslots, self.slot_len = nslots, slot_len
        size = nslots * slot_len
        self.ptr = ptr = drv.host_alloc(size)
        try:
            self.region = MemoryRegion._from_raw(eng, ptr, size, ("staging pool",))
        except BaseException:
            drv.host_free(ptr)
            raise
        self.region._on_close.append(lambda: drv.host_free(ptr))
        self.free: collections.deque[int] = collections.deque(range(nslots))
        self.waiters: collections.deque[asyncio.Future[int]] = collections.deque()
        self.on_release = on_release

    def off(self, slot: int) -> int:
        return slot * self.slot_len

    async def acquire(self) -> int:
        """A free slot (FIFO among waiters)."""
        if self.free and not self.waiters:
            return self.free.popleft()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(fut.result())  # handed to us as we were cancelled
            raise

    def release(self, slot: int) -> None:
        while self.waiters:
            f = self.waiters.popleft()
            if not f.done():
                f.set_result(slot)
                return
        self.free.append(slot)
        self.on_release()

    def fail(self, exc: Callable[[], AioteError]) -> None:
        while self.waiters:
            f = self.waiters.popleft()
            if not f.done():
                f.set_exception(exc())


class _Grant:
    __slots__ = ("slot", "slot_len", "off", "desc")

    def __init__(self, slot: int, slot_len: int, off: int, desc: MrDescriptor):
        self.slot, self.slot_len, self.off, self.desc = slot, slot_len, off, desc


class _Out:
    """The writer's side of one transfer."""

    def __init__(self, xfer: int, dst: MrDescriptor, peer: int, loop: asyncio.AbstractEventLoop):
        self.xfer, self.dst, self.peer = xfer, dst, peer
        self.grants: collections.deque[_Grant] = collections.deque()
        self.grant_waiter: asyncio.Future[None] | None = None
        self.done: asyncio.Future[None] = loop.create_future()
        self.inflight: set[asyncio.Future[None]] = set()   # NIC writes into granted slots
        self.cancel_pending = False

    def fail(self, exc: AioteError) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
        w = self.grant_waiter
        if w is not None and not w.done():
            w.set_exception(exc)

    async def next_grant(self) -> _Grant:
        while not self.grants:
            if self.done.done():
                self.done.result()  # raises the failure
                raise ProviderError("the owner finished the transfer early")  # never for a well-behaved peer
            self.grant_waiter = asyncio.get_running_loop().create_future()
            await self.grant_waiter
        return self.grants.popleft()


class _In:
    """The owner's side of one transfer."""

    __slots__ = ("key", "xfer", "addr", "peer", "region", "imm", "count", "want", "granted", "slots",
                 "committed", "copied", "dead", "queued")

    def __init__(self, key: tuple[tuple[bytes, ...], int], addr: EngineAddress, peer: int, region: MemoryRegion,
                 imm: int, count: int, want: int):
        self.key, self.xfer = key, key[1]
        self.addr, self.peer, self.region = addr, peer, region
        self.imm, self.count, self.want = imm, count, want
        self.granted = 0
        self.slots: dict[int, bool] = {}  # slot -> its H2D copy is queued
        self.committed: set[int] = set()
        self.copied = 0
        self.dead = False
        self.queued = False


class Staging:
    """One engine's bounce pools and both sides of the slot-grant protocol."""

    def __init__(self, paths: GpuPaths, staging_bytes: int, chunk: int):
        self._paths = paths
        self._eng: TransferEngine = paths._engine
        self.chunk = chunk
        self.nslots = max(1, staging_bytes // 2 // chunk)  # per pool
        self._send: _Pool | None = None
        self._recv: _Pool | None = None
        self._xfer_ids = itertools.count(1)
        self._out: dict[int, _Out] = {}
        self._in: dict[tuple[tuple[bytes, ...], int], _In] = {}
        self._want: collections.deque[_In] = collections.deque()
        self._watched: collections.Counter[int] = collections.Counter()
        self._descs: dict[bytes, MrDescriptor] = {}
        self._idlers: list[asyncio.Future[None]] = []
        self._closed = False

    def idle(self) -> bool:
        """No staged transfer open on either side, every slot free."""
        return (not self._in and not self._out
                and all(p is None or len(p.free) == p.nslots for p in (self._send, self._recv)))

    async def wait_idle(self) -> None:
        """Until idle() (e.g. after a failed or cancelled write, once its cleanup is done)."""
        while not self.idle() and not self._closed:
            f = self._eng._loop_checked().create_future()
            self._idlers.append(f)
            await f

    def _poke(self) -> None:
        if self._idlers and self.idle():
            idlers, self._idlers = self._idlers, []
            for f in idlers:
                if not f.done():
                    f.set_result(None)

    @property
    def stats(self) -> dict[str, int]:
        return self._paths.stats

    def pinned_bytes(self) -> int:
        return sum(p.nslots * p.slot_len for p in (self._send, self._recv) if p is not None)

    def _pool(self, which: str) -> _Pool:
        p = self._send if which == "send" else self._recv
        if p is None:
            p = _Pool(self._eng, self._paths._drv, self.nslots, self.chunk, self._poke)
            if which == "send":
                self._send = p
            else:
                self._recv = p
            self._paths.pinned_changed()
        return p

    def ensure_recv_pool(self) -> None:
        self._pool("recv")

    # -- peers -------------------------------------------------------------------

    def _watch(self, peer: int, delta: int) -> None:
        """Watch a peer while transfers with it are open (its death fails them)."""
        if self._eng.closed:
            return
        self._watched[peer] += delta
        if self._watched[peer] <= 0:
            del self._watched[peer]
        gone = lib.aiote_peer_watch(self._eng._handle(), peer, delta)
        if delta > 0 and gone == 1:
            self._eng._loop_checked().call_soon(self.peer_down, peer, "its process exited")

    def peer_down(self, peer: int, why: str) -> None:
        for x in [x for x in self._out.values() if x.peer == peer]:
            x.fail(PeerUnreachable(f"staged write: the owner of the GPU region is down ({why})"))
        for x in [x for x in self._in.values() if x.peer == peer]:
            self._drop_in(x)  # the writer is gone: its slots go back to the pool

    def _ctrl(self, addr: EngineAddress, body: bytes) -> None:
        """Send a protocol message, not awaited; a failure shows up as a dead peer."""
        if self._eng.closed:
            return
        try:
            fut = self._eng._send_ctrl(addr, body)
        except AioteError as e:
            self._eng._log.warning("staging.send_failed", error=str(e))
            return
        fut.add_done_callback(_retrieve)

    # -- the writer's side -------------------------------------------------------

    async def to_staged(self, src: MemoryRegion | None, dst: MrDescriptor, es: list[Element],
                        imm: int | None) -> None:
        """Write elements into a staged GPU region of a peer, through its bounce slots."""
        from .gpu import chunk_elements

        eng = self._eng
        ext = dst.cuda
        assert ext is not None
        addr = EngineAddress(dst.provider, dst.addrs)
        peer = eng._peer(dst.addrs, dst.provider)
        xfer = next(self._xfer_ids)
        x = self._out[xfer] = _Out(xfer, dst, peer, eng._loop_checked())
        count = len(es) if imm is not None else 0
        chunks = chunk_elements(es, self.chunk, _MAX_RANGES)
        tasks: list[asyncio.Task[None]] = []
        self._watch(peer, 1)
        try:
            await eng._send_ctrl(addr, _HDR.pack(MAGIC, REQ) + _REQ.pack(
                xfer, ext.token, len(chunks), NO_IMM if imm is None else imm, count,
                sum(e.length for e in es)))
            i = 0
            while i < len(chunks):
                g = await x.next_grant()
                if i == 0 and g.slot_len < self.chunk:  # the owner's slots are smaller: chunk to fit
                    chunks = chunk_elements(es, g.slot_len, _MAX_RANGES)
                    self._ctrl(addr, _HDR.pack(MAGIC, WANT) + _WANT.pack(xfer, len(chunks)))
                tasks.append(asyncio.ensure_future(self._chunk_out(x, addr, src, i, chunks[i], g)))
                i += 1
            await x.done  # the owner's DONE: the last chunk is in its GPU memory, the imm counted
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            self._out.pop(xfer, None)
            if not x.done.done() or x.done.cancelled() or x.done.exception() is not None:
                self._abort(x, addr)
            if not x.done.done():
                x.done.cancel()
            elif not x.done.cancelled():
                x.done.exception()  # retrieved
            self._watch(peer, -1)
            self._poke()

    async def _chunk_out(self, x: _Out, addr: EngineAddress, src: MemoryRegion | None, i: int,
                         parts: Sequence[tuple[int, int, int, bool, bool]], g: _Grant) -> None:
        try:
            ranges, pos, packed = [], 0, []
            for so, do, n, _, _ in parts:
                packed.append((so, pos, n))
                ranges.append((do, n))
                pos += n
            if pos > g.slot_len or g.off + g.slot_len > g.desc.length:
                raise ProviderError(f"staged write: chunk of {pos} bytes for a slot of {g.slot_len}")
            fut = self._post(src, packed, g.desc, g.off)
            x.inflight.add(fut)
            fut.add_done_callback(lambda f: self._op_done(x, addr, f))
            await asyncio.shield(fut)
            body = _HDR.pack(MAGIC, COMMIT) + _COMMIT.pack(x.xfer, g.slot, i, len(ranges))
            body += b"".join(_RANGE.pack(d, n) for d, n in ranges)
            self.stats["commits_sent"] += 1
            await self._eng._send_ctrl(addr, body)
        except asyncio.CancelledError:
            raise
        except AioteError as e:
            x.fail(e)

    def _post(self, src: MemoryRegion | None, packed: list[tuple[int, int, int]], dst: MrDescriptor,
              base: int) -> asyncio.Future[None]:
        """NIC writes of (src_off, offset, n) to base + offset of dst; a GPU source is first
        copied into a send slot (released when the C operation has finished, cancelled or not)."""
        eng = self._eng
        if src is None or src.cuda is None or not src.cuda.staged:
            return eng._write_ranges(src, dst, [(so, base + o, n) for so, o, n in packed], None)
        if src.cuda.mirror:  # a mirrored source: copied into its own mirror, written from there
            return self._paths.mirror_out(src, dst, [(so, base + o, n) for so, o, n in packed], None)
        return self._gpu_out(src, packed, dst, [(o, base + o, n) for _, o, n in packed], None)

    def _gpu_out(self, src: MemoryRegion, packed: list[tuple[int, int, int]], dst: MrDescriptor,
                 ranges: list[tuple[int, int, int]], imm: int | None) -> asyncio.Future[None]:
        """D2H of (src_off, slot offset, n) into a send slot, then NIC writes of (slot offset,
        dst_off, n) ranges into dst: one C operation, its future."""
        pool = self._pool("send")
        loop = self._eng._loop_checked()
        out: asyncio.Future[None] = loop.create_future()

        async def run() -> None:
            slot = await pool.acquire()
            try:
                info = src.cuda
                base = pool.off(slot)
                copies = [(pool.ptr + base + o, info.ptr + so, n) for so, o, n in packed if n]
                self.stats["staged_out"] += sum(n for _, _, n in copies)
                fut = self._paths._gated(info.device, (0, 0), copies, pool.region, dst,
                                         [(base + so, do, n) for so, do, n in ranges], imm)
            except BaseException:
                pool.release(slot)
                raise
            fut.add_done_callback(lambda _: pool.release(slot))
            _chain(fut, out)

        task = loop.create_task(run())

        def on_task(t: asyncio.Task[None]) -> None:
            if t.cancelled():
                if not out.done():
                    out.cancel()
            elif t.exception() is not None and not out.done():
                out.set_exception(t.exception())  # type: ignore[arg-type]

        task.add_done_callback(on_task)
        out._aiote_task = task  # type: ignore[attr-defined]  # withdraw() reaches the slot wait through it
        return out

    def _op_done(self, x: _Out, addr: EngineAddress, f: asyncio.Future[None]) -> None:
        x.inflight.discard(f)
        if not f.cancelled() and f.exception() is not None:
            x.fail(f.exception())  # type: ignore[arg-type]
        if x.cancel_pending and not x.inflight:
            x.cancel_pending = False
            self._ctrl(addr, _HDR.pack(MAGIC, CANCEL) + _CANCEL.pack(x.xfer))

    def _abort(self, x: _Out, addr: EngineAddress) -> None:
        """The writer gives up: withdraw what is not posted; once nothing of ours can still
        land in the owner's slots, tell it (CANCEL) so it recycles them."""
        for f in list(x.inflight):
            withdraw(self._eng, f)
        if x.inflight:
            x.cancel_pending = True
        else:
            self._ctrl(addr, _HDR.pack(MAGIC, CANCEL) + _CANCEL.pack(x.xfer))

    async def from_gpu(self, src: MemoryRegion, dst: MrDescriptor, es: list[Element], imm: int | None) -> None:
        """A staged GPU source to host memory (or a GPUDirect region) of a peer: chunks
        copied into send slots and written from there, pipelined over the pool."""
        from .gpu import chunk_elements

        chunks = chunk_elements(es, self.chunk, _MAX_RANGES)
        futs: list[asyncio.Future[None]] = []
        try:
            for c in chunks:
                packed, pos = [], 0
                for so, _, n, _, _ in c:
                    packed.append((so, pos, n))
                    pos += n
                whole = c[0][3]
                futs.append(self._gpu_out(src, packed, dst, [(o, p[1], n) for (_, o, n), p in zip(packed, c)],
                                          imm if whole else None))
            await asyncio.gather(*futs)
            nsplit = sum(1 for c in chunks for p in c if p[4] and not p[3])
            if imm is not None and nsplit:
                # elements cut into parts: their imm follows once every part landed
                await self._eng._imm_only(dst, imm, nsplit)
        finally:
            for f in futs:
                if not f.done():
                    withdraw(self._eng, f)

    # -- the owner's side ------------------------------------------------------------

    def on_message(self, payload: bytes, sender: tuple[bytes, ...]) -> None:
        """A protocol message.  Malformed ones are dropped and counted (the transfer they
        name, if any, fails); nothing they say is trusted before it is checked."""
        try:
            magic, kind = _HDR.unpack_from(payload)
            if magic != MAGIC:
                raise ValueError("not a staging message")
            body = payload[_HDR.size:]
            if kind == REQ:
                self._on_req(body, sender)
            elif kind == WANT:
                self._on_want(body, sender)
            elif kind == GRANT:
                self._on_grant(body)
            elif kind == COMMIT:
                self._on_commit(body, sender)
            elif kind == CANCEL:
                (xfer,) = _CANCEL.unpack(body)
                x = self._in.get((sender, xfer))
                if x is not None:
                    self._drop_in(x)
            elif kind == DONE:
                self._on_done(body)
            else:
                raise ValueError(f"unknown staging message {kind}")
        except (ValueError, struct.error, AioteError) as e:
            self.stats["bad_commits"] += 1
            self._eng._log.warning("staging.bad_message", error=str(e))

    def _on_req(self, body: bytes, sender: tuple[bytes, ...]) -> None:
        xfer, token, want, imm, count, _nbytes = _REQ.unpack(body)
        addr = EngineAddress(self._eng.provider, sender)
        key = (sender, xfer)
        region = self._paths.local_region(token)
        status, why = OK, ""
        if region is None or region.closed or region.cuda is None or not region.cuda.pooled:
            status, why = E_REGION, "no open pooled GPU region has that token"
        elif key in self._in:
            status, why = E_PROTO, "transfer id reused"
        elif want == 0 or (imm != NO_IMM and imm > IMM_MAX) or (imm == NO_IMM and count):
            status, why = E_PROTO, "bad transfer request"
        elif len(self._in) >= _MAX_IN:
            status, why = E_BUSY, "too many staged transfers in flight at the owner"
        if status != OK:
            self.stats["bad_commits"] += status == E_PROTO
            self._ctrl(addr, _HDR.pack(MAGIC, DONE) + _DONE.pack(xfer, status) + why.encode())
            return
        peer = self._eng._peer(sender, self._eng.provider)
        assert region is not None
        x = self._in[key] = _In(key, addr, peer, region, imm, count if imm != NO_IMM else 0, want)
        self._pool("recv")
        self._watch(peer, 1)
        self._queue(x)
        self._grant()

    def _on_want(self, body: bytes, sender: tuple[bytes, ...]) -> None:
        xfer, want = _WANT.unpack(body)
        x = self._in.get((sender, xfer))
        if x is None:
            return  # cancelled or failed meanwhile
        if want < x.want or want == 0:
            self._fail_in(x, E_PROTO, "transfer chunk count lowered")
            raise ValueError("WANT lowers the chunk count")
        x.want = want
        self._queue(x)
        self._grant()

    def _queue(self, x: _In) -> None:
        if not x.queued and not x.dead and x.granted < x.want:
            x.queued = True
            self._want.append(x)

    def _grant(self) -> None:
        """Free receive slots to waiting transfers, one at a time, round robin."""
        pool = self._recv
        if pool is None:
            return
        while pool.free and self._want:
            x = self._want.popleft()
            x.queued = False
            if x.dead or x.granted >= x.want:
                continue
            slot = pool.free.popleft()
            x.granted += 1
            x.slots[slot] = False
            self.stats["grants"] = self.stats.get("grants", 0) + 1
            self._ctrl(x.addr, _HDR.pack(MAGIC, GRANT) + _GRANT.pack(x.xfer, slot, pool.slot_len, pool.off(slot))
                       + pool.region.descriptor.to_bytes())
            self._queue(x)

    def _on_commit(self, body: bytes, sender: tuple[bytes, ...]) -> None:
        xfer, slot, chunk, nranges = _COMMIT.unpack_from(body)
        x = self._in.get((sender, xfer))
        if x is None:
            return  # a transfer that failed or was cancelled meanwhile: its slot was released
        pool = self._recv
        assert pool is not None
        try:
            if x.slots.get(slot, True) or chunk >= x.want or chunk in x.committed:
                raise ValueError("commit for a slot or chunk not granted")
            if nranges > _MAX_RANGES or len(body) != _COMMIT.size + nranges * _RANGE.size:
                raise ValueError("malformed commit")
            region = x.region
            if region.closed:
                self._fail_in(x, E_REGION, "the GPU region was closed")
                return
            info = region.cuda
            copies, pos = [], pool.ptr + pool.off(slot)
            for k in range(nranges):
                off, n = _RANGE.unpack_from(body, _COMMIT.size + k * _RANGE.size)
                if off + n > region.nbytes:
                    self._fail_in(x, E_BOUNDS, f"range {off}+{n} exceeds the region's {region.nbytes} bytes")
                    return
                if pos + n > pool.ptr + pool.off(slot) + pool.slot_len:
                    raise ValueError("commit ranges exceed the slot")
                if n:
                    copies.append((info.ptr + off, pos, n))
                pos += n
        except ValueError:
            self._fail_in(x, E_PROTO, "malformed commit")
            raise
        x.committed.add(chunk)
        x.slots[slot] = True
        self.stats["commits_received"] += 1
        self.stats["staged_in"] += sum(n for _, _, n in copies)
        region._busy += 1  # its close waits for (refuses during) our copies into it
        try:
            fut = self._paths._gated(info.device, (0, 0), copies, pool.region, None, (), None, h2d=True)
        except AioteError as e:
            region._busy -= 1
            self._slot_back(x, slot)
            self._fail_in(x, E_COPY, f"host-to-device copy refused: {e}")
            return
        fut.add_done_callback(lambda f: self._copied(x, slot, f))

    def _copied(self, x: _In, slot: int, f: asyncio.Future[None]) -> None:
        """A chunk's H2D copy finished: recycle its slot; after the last, count the imm."""
        x.region._busy -= 1
        self._slot_back(x, slot)
        err = f.exception() if not f.cancelled() else EngineClosed("engine closed")
        if x.dead:
            return
        if err is not None:
            self._fail_in(x, E_COPY, f"host-to-device copy failed: {err}")
            return
        x.copied += 1
        if x.copied == x.want:
            if x.count:
                self._eng._imm_arrive(x.imm, x.count)  # the bytes are in GPU memory now
            self._ctrl(x.addr, _HDR.pack(MAGIC, DONE) + _DONE.pack(x.xfer, OK))
            self._drop_in(x)
        self._grant()

    def _slot_back(self, x: _In, slot: int) -> None:
        if x.slots.pop(slot, None) is not None and self._recv is not None:
            self._recv.free.append(slot)
            self._poke()

    def _fail_in(self, x: _In, status: int, why: str) -> None:
        self._eng._log.warning("staging.transfer_failed", status=status, why=why)
        self._ctrl(x.addr, _HDR.pack(MAGIC, DONE) + _DONE.pack(x.xfer, status) + why.encode())
        self._drop_in(x)

    def _drop_in(self, x: _In) -> None:
        """Forget a transfer: its granted slots go back now, those with a copy queued when
        the copy is done (_copied); its imm is never counted."""
        if x.dead:
            return
        x.dead = True
        self._in.pop(x.key, None)
        for slot, copying in list(x.slots.items()):
            if not copying:
                self._slot_back(x, slot)
        self._watch(x.peer, -1)
        self._grant()
        self._poke()

    def region_closed(self, token: int) -> None:
        """A staged GPU region was closed: transfers into it fail (RegionClosed at the writer)."""
        for x in [x for x in self._in.values() if x.region.cuda is not None and x.region.cuda.token == token]:
            self._fail_in(x, E_REGION, "the GPU region was closed")

    # -- the writer receives ---------------------------------------------------------

    def _on_grant(self, body: bytes) -> None:
        xfer, slot, slot_len, off = _GRANT.unpack_from(body)
        raw = body[_GRANT.size:]
        x = self._out.get(xfer)
        if x is None:
            return  # we gave up on it: the owner frees the slot on our CANCEL
        d = self._descs.get(raw)
        if d is None:
            try:
                d = MrDescriptor.from_bytes(raw)
            except DescriptorError:
                x.fail(DescriptorError("staged write: the owner granted a slot with a bad descriptor"))
                raise
            if len(self._descs) > 256:
                self._descs.clear()
            self._descs[raw] = d
        if slot_len == 0 or off + slot_len > d.length or d.addrs != x.dst.addrs or d.cuda is not None:
            x.fail(DescriptorError("staged write: the owner granted a slot outside its pool"))
            raise ValueError("bad grant")
        x.grants.append(_Grant(slot, slot_len, off, d))
        w = x.grant_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _on_done(self, body: bytes) -> None:
        xfer, status = _DONE.unpack_from(body)
        x = self._out.get(xfer)
        if x is None or x.done.done():
            return
        if status == OK:
            x.done.set_result(None)
            w = x.grant_waiter
            if w is not None and not w.done():
                w.set_result(None)
            return
        why = bytes(body[_DONE.size:_DONE.size + 512]).decode("utf-8", "replace")
        x.fail(_ERRORS.get(status, ProviderError)(f"staged write refused by the owner: {why}"))

    # -- closing -------------------------------------------------------------------

    async def aclose(self) -> None:
        """A graceful close, while the engine still runs: writers stop, and once none of
        their NIC writes can still land, the owners hear (CANCEL) and recycle the slots;
        writers into our regions hear that we are going (DONE with an error).  Without it
        a peer on shm whose process lives on would never learn of it."""
        sends: list[asyncio.Future[None]] = []
        for x in list(self._out.values()):
            x.fail(EngineClosed("engine closed"))
            for f in list(x.inflight):
                withdraw(self._eng, f)
            if x.inflight:
                await asyncio.gather(*x.inflight, return_exceptions=True)
            x.cancel_pending = False
            sends.append(self._eng._send_ctrl(EngineAddress(x.dst.provider, x.dst.addrs),
                                              _HDR.pack(MAGIC, CANCEL) + _CANCEL.pack(x.xfer)))
        for x in list(self._in.values()):
            body = _HDR.pack(MAGIC, DONE) + _DONE.pack(x.xfer, E_REGION) + b"the owner's engine is closing"
            sends.append(self._eng._send_ctrl(x.addr, body))
        if sends:
            await asyncio.gather(*sends, return_exceptions=True)

    def close(self) -> None:
        """The engine closed (its operations have failed already): fail what waits."""
        self._closed = True
        for x in list(self._out.values()):
            x.fail(EngineClosed("engine closed"))
        for p in (self._send, self._recv):
            if p is not None:
                p.fail(lambda: EngineClosed("engine closed"))
        self._in.clear()
        self._want.clear()
        for f in self._idlers:
            if not f.done():
                f.set_result(None)
        self._idlers.clear()


def withdraw(eng: TransferEngine, f: asyncio.Future[None]) -> None:
    """Withdraw an operation's unposted writes without dropping its future: it still
    completes by event (the send slot it holds is released then)."""
    task = getattr(f, "_aiote_task", None)
    if task is not None and not task.done():
        task.cancel()  # still waiting for a send slot: nothing was queued
        return
    inner = getattr(f, "_aiote_inner", f)
    op_id = getattr(inner, "_op_id", 0)
    if op_id and not eng.closed and op_id in eng._ops:
        lib.aiote_cancel(eng._h, op_id)


def _chain(src: asyncio.Future[None], dst: asyncio.Future[None]) -> None:
    dst._aiote_inner = src  # type: ignore[attr-defined]

    def done(f: asyncio.Future[None]) -> None:
        if dst.done():
            _retrieve(f)
        elif f.cancelled():
            dst.cancel()
        elif f.exception() is not None:
            dst.set_exception(f.exception())  # type: ignore[arg-type]
        else:
            dst.set_result(None)

    src.add_done_callback(done)


def _retrieve(f: asyncio.Future[Any]) -> None:
    if not f.cancelled():
        f.exception()
