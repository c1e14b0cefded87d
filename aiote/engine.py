"""TransferEngine: the asyncio face of one native engine."""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import glob
import itertools
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from . import _spin, cuda
from ._core import check, error_for, ffi, fi_strerror, lib
from ._log import get_logger
from .counters import IMM_MAX, ImmCounter
from .descriptor import EngineAddress, MrDescriptor
from .errors import AioteError, DescriptorError, EngineClosed, InvalidArgument, PeerUnreachable, QueueFull
from .gpu import Element, GpuPaths, check_elements
from .memory import MemoryRegion
from .watch import Prepared, Watcher

__all__ = ["TransferEngine", "PeerGroup", "PROVIDER_ALIASES"]

PROVIDER_ALIASES = {"tcp": "tcp;ofi_rxm", "verbs": "verbs;ofi_rxm"}
_ROUTING = {"round_robin": lib.AIOTE_ROUTE_ROUND_ROBIN, "pinned": lib.AIOTE_ROUTE_PINNED}
_POLLING = {"busy": lib.AIOTE_POLL_BUSY, "adaptive": lib.AIOTE_POLL_ADAPTIVE, "blocking": lib.AIOTE_POLL_BLOCKING}
_EVENT_BATCH = 256
_WR = struct.Struct("=IIQQQ")  # aiote_wr: rdesc, _pad, src_off, dst_off, len (32 bytes)
_COPY = struct.Struct("=QQQ")  # aiote_copy: dst, src, len
_U64 = 1 << 64
_engine_ids = itertools.count(1)
# await-spin default over tcp (docs/concepts.md): a batch of carried writes comes back in
# ~50 us and a one-at-a-time write in ~25 us on the dev VM; waits that run longer than half
# of this stop the spinning (the EWMA in _spin.py)
_AWAIT_SPIN_US = 500
_DONE, _AGAIN = lib.AIOTE_DONE, -lib.AIOTE_E_AGAIN
_EV_OP, _EV_IMM = lib.AIOTE_EV_OP, lib.AIOTE_EV_IMM
_poll_events = lib.aiote_poll_events  # bound once: the drain runs per wake-up


class _OpFuture(asyncio.Future):
    """An operation's future: cancelling it also withdraws what is not posted yet."""

    _engine: TransferEngine | None = None
    _op_id = 0

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        eng = self._engine
        if eng is not None and not eng._closed and self._op_id in eng._ops:
            lib.aiote_cancel(eng._h, self._op_id)
        return True


class _Op:
    __slots__ = ("future", "keep")

    def __init__(self, future: asyncio.Future[None], keep: Any):
        self.future = future
        self.keep = keep  # regions/buffers that must outlive the operation


class TransferEngine:
    """One libfabric endpoint driven by a native worker thread.

    Use as ``async with TransferEngine(provider="shm") as eng:``.  Every
    operation returns an asyncio Future: await it, gather many, or cancel it.

    Cancelling an operation's future stops waiting for it and withdraws the
    elements not yet handed to the NIC; elements already posted may still
    land.  Closing the engine fails every pending future with EngineClosed
    and deregisters every region.

    Completion: a write's future resolves when the provider reports the
    write complete; with ``delivery_complete`` (the default where the
    provider offers it) that means the data is in the target's memory.  See
    docs/concepts.md for what each provider guarantees.

    Parameters:
        provider: libfabric provider: ``"shm"``, ``"tcp"`` (= ``"tcp;ofi_rxm"``),
            ``"efa"``, ``"verbs"`` (= ``"verbs;ofi_rxm"``), or any name ``fi_info`` lists.
        host: address to bind (e.g. ``"127.0.0.1"`` for tcp on loopback).
        domain: libfabric domain (NIC) name(s), comma-separated; cycled over the NICs.
        nics: how many NICs (domain + endpoint each), or a list of domain names.
        polling: ``"busy"``, ``"adaptive"`` (spin up to ``spin_us``, then sleep; on shm the
            window adapts between 2 µs and ``spin_us``, elsewhere between ``spin_us`` and
            8 x ``spin_us``, the spin lasts while a large write's bytes stream in, and after a
            wake-up of its making it yields its CPU between looks; docs/concepts.md) or
            ``"blocking"``.
        routing: ``"round_robin"`` (stripe writes >= ``stripe_threshold`` bytes over
            the NICs, spread batch elements) or ``"pinned"`` (all on ``pinned_nic``).
        msg_size: largest ``send`` payload (bytes).
        recv_slots: receive buffers kept posted for messages.
        send_slots: registered send buffers (sends beyond them wait).
        max_queued: elements submitted but not finished before submission waits.
        max_deferred: operations that may wait (in Python) for ``max_queued`` room; one
            more raises QueueFull and queues nothing.  ``await engine.drain()`` waits
            for room, like ``StreamWriter.drain``.
        delivery_complete: ask for FI_DELIVERY_COMPLETE (writes complete at the target).
        peer_timeout: seconds an operation may be refused by the provider (EAGAIN)
            before it fails with PeerUnreachable.
        max_inflight: writes/sends in flight per NIC (0: the provider's queue size).
        gpu: how CUDA buffers are registered: ``"direct"`` (the NIC reads and writes
            GPU memory: efa, verbs with GPUDirect), ``"staged"`` (through pinned host memory:
            a full mirror per region while the mirror budget lasts, else bounded bounce pools;
            copies on the copy engines; shm, tcp) or ``"auto"`` (direct on efa/verbs,
            else staged).  See docs/gpu.md.
        cuda_ipc: write GPU regions of other processes on this host through CUDA IPC
            (NVLink/PCIe copies) instead of the NIC.
        staging_mirror_bytes: the staged GPU path's mirror budget: a staged GPU region whose
            size fits in what is left of it gets a pinned host mirror of its own (the fastest
            protocol); larger ones, and all once it is spent, use the bounce pools
            (``staging_bytes``); closing a mirrored region gives its bytes back.  0: pools
            only.  ``None``: ``AIOTE_STAGING_MIRROR_BYTES`` from the environment, else 1 GiB.
            Pinned host memory is bounded by ``staging_mirror_bytes + staging_bytes``.
        staging_bytes: pinned host memory for the staged GPU path's pools (shm, tcp): half a pool
            of send slots, half a pool of receive slots, each allocated on first use; this and
            ``staging_mirror_bytes``, not the size of the GPU regions, bound the host memory
            staging pins.  ``None``:
            ``AIOTE_STAGING_BYTES`` from the environment, else 64 MiB (or two chunks, if
            more).  See docs/gpu.md.
        staging_chunk: bytes per chunk of both staged protocols and per pool slot, the unit of
            the staged path's pipeline.  ``None``:
            ``gpu_chunk`` if given, else ``AIOTE_STAGING_CHUNK``, else 4 MiB.
        gpu_chunk: the former name of ``staging_chunk`` (still accepted).
        direct_shm: on ``shm``, write to peers on this host by copying the bytes from the
            calling thread with ``process_vm_writev`` (the kernel mechanism shm itself uses)
            instead of through libfabric; imms follow as one control message per target.
            Falls back to libfabric by itself where it can't be used (a peer without it, CMA
            not permitted, GPU memory).  ``None`` (default): on unless the environment sets
            ``AIOTE_DIRECT_SHM=0``.  See docs/reliability.md, "Direct same-host path".
        direct_max: direct operations of at most this many bytes are copied on the calling
            thread and complete inside the call; this bounds how long one call holds the
            event loop.  ``None``: ``AIOTE_DIRECT_MAX`` from the environment, else 4 MiB.
        direct_workers: threads of the engine that copy larger direct operations (the call
            only queues them; the future resolves by event once the bytes are there);
            0: none, such operations go through libfabric.  ``None``:
            ``AIOTE_DIRECT_WORKERS`` from the environment, else 1.
        direct_inline: direct writes whose every element is at most this many bytes (and
            which go to one target) are carried inline: copied into the target's
            shared-memory ring and applied by the target's worker (or its spinning loop),
            instead of one ``process_vm_writev``; the future still resolves only once the
            bytes are in the target's memory (docs/concepts.md).  0: off.  ``None``:
            ``AIOTE_DIRECT_INLINE`` from the environment, else 256.  At most 4096.
        direct_assist: copy assistants: threads of the engine that help copy one large
            direct run (a write, or the consecutive elements of a batch into one target
            region, of at least 512 KiB; 2 MiB on hosts of fewer than 8 CPUs): the run is cut
            into chunks of 256 KiB or more,
            the copying thread takes them from the front and idle assistants from the back
            (one thread's ``process_vm_writev`` tops out well below memory bandwidth).  An
            assistant stays awake 200 µs after its last chunk, then sleeps; they start with
            the first large direct write.  0: none.  ``None``: ``AIOTE_DIRECT_ASSIST``
            from the environment, else 1.  At most 15.
        carry_max: carried writes (not shm; one NIC on both sides): two or more
            consecutive writes of one operation (a batch, paged writes) to one peer, each at
            most this many bytes, travel as the entries of one message instead of one RMA
            write each; the target's worker checks each entry against its own regions,
            copies it and counts its imm, then acknowledges, and the future resolves on that
            acknowledgement (the bytes are in the target's memory, as with a
            delivery-complete write).  Over tcp one write is one ``sendmsg`` a side; this
            makes it one per message.  0: off.  ``None``: ``AIOTE_CARRY_MAX`` from the
            environment, else 8192, but at most ``msg_size`` (a smaller ``msg_size`` takes
            the default down with it).  An explicit value must be at most ``msg_size``.
            See docs/concepts.md.
        loop_spin_us: latency mode (0, the default: off).  The asyncio loop's thread spins
            up to this many µs on the engine's events before it sleeps in epoll, driving the
            engine's progress itself meanwhile (the worker rests while it does), and resolves
            the futures inside ``select()``, so an awaiting coroutine resumes in the same loop
            iteration as the completion or imm is seen: no eventfd, epoll wake-up or thread
            hop.  Costs a core per spinning loop while traffic keeps coming (after
            ``loop_spin_us`` without events the loop sleeps as usual; timers and other fds keep
            working).  Needs a ``SelectorEventLoop`` (asyncio's default on Linux); under uvloop
            the engine works as without it (``loop_spinning`` is False).  Use it for
            request/response latency with a free core per process; see docs/concepts.md.
        await_spin_us: await-spin, the light form of ``loop_spin_us``: the loop spins (and
            drives the engine's progress, the worker resting) up to this many µs only while
            a coroutine awaits this engine (an operation in flight, an imm wait armed) and
            only while such waits have lately ended within half of it; otherwise it sleeps
            in epoll at once.  A write awaited over tcp then resumes its coroutine without
            the worker's hand-off and the loop's wake-up (one-at-a-time 64 B writes ~2x
            faster on a 2-core host).  0: off.  ``None``: ``AIOTE_AWAIT_SPIN_US`` from the
            environment, else 500 over ``tcp;ofi_rxm`` and 0 elsewhere (on shm the direct
            path completes small writes in the caller; a spinning loop there only took CPU
            from the copies).  Ignored under ``loop_spin_us`` (which spins whenever idle).
    """

    def __init__(
        self,
        provider: str = "shm",
        *,
        host: str | None = None,
        domain: str | None = None,
        nics: int | Sequence[str] = 1,
        polling: str = "adaptive",
        routing: str = "round_robin",
        pinned_nic: int = 0,
        stripe_threshold: int = 256 * 1024,
        spin_us: int = 50,
        msg_size: int = 64 * 1024,
        recv_slots: int = 64,
        send_slots: int = 64,
        max_queued: int = 1 << 20,
        max_deferred: int = 1 << 16,
        delivery_complete: bool = True,
        peer_timeout: float = 10.0,
        max_inflight: int = 0,
        gpu: str = "auto",
        cuda_ipc: bool = True,
        gpu_chunk: int | None = None,
        staging_bytes: int | None = None,
        staging_chunk: int | None = None,
        staging_mirror_bytes: int | None = None,
        direct_shm: bool | None = None,
        direct_max: int | None = None,
        direct_workers: int | None = None,
        loop_spin_us: int = 0,
        await_spin_us: int | None = None,
        direct_inline: int | None = None,
        direct_assist: int | None = None,
        carry_max: int | None = None,
    ):
        if isinstance(nics, int):
            if not 1 <= nics <= lib.AIOTE_MAX_NICS:
                raise InvalidArgument(f"nics must be 1..{lib.AIOTE_MAX_NICS}, got {nics}")
            nnics = nics
        else:
            names = list(nics)
            if not 1 <= len(names) <= lib.AIOTE_MAX_NICS or any(not n or "," in n for n in names):
                raise InvalidArgument(f"nics must name 1..{lib.AIOTE_MAX_NICS} domains, got {names!r}")
            if domain is not None:
                raise InvalidArgument("give either domain= or a list of NIC names, not both")
            nnics, domain = len(names), ",".join(names)
        if routing not in _ROUTING:
            raise InvalidArgument(f"routing must be one of {sorted(_ROUTING)}, got {routing!r}")
        if polling not in _POLLING:
            raise InvalidArgument(f"polling must be one of {sorted(_POLLING)}, got {polling!r}")
        if gpu not in ("auto", "staged", "direct"):
            raise InvalidArgument(f"gpu must be 'auto', 'staged' or 'direct', got {gpu!r}")
        if staging_chunk is None:
            staging_chunk = gpu_chunk if gpu_chunk is not None else _env_int("AIOTE_STAGING_CHUNK", 4 << 20)
        if type(staging_chunk) is not int or not 4096 <= staging_chunk <= 1 << 30:
            raise InvalidArgument(f"staging_chunk (gpu_chunk) must be an int in 4096..2**30, got {staging_chunk!r}")
        if staging_bytes is None:
            # the default grows with a large chunk (gpu_chunk=64 MiB worked before the pools existed)
            staging_bytes = _env_int("AIOTE_STAGING_BYTES", max(64 << 20, 2 * staging_chunk))
        if type(staging_bytes) is not int or not 2 * staging_chunk <= staging_bytes < 1 << 48:
            raise InvalidArgument(f"staging_bytes must be an int >= 2 * staging_chunk ({2 * staging_chunk}), "
                                  f"got {staging_bytes!r}")
        if staging_mirror_bytes is None:
            staging_mirror_bytes = _env_int("AIOTE_STAGING_MIRROR_BYTES", 1 << 30)
        if type(staging_mirror_bytes) is not int or not 0 <= staging_mirror_bytes < 1 << 48:
            raise InvalidArgument(f"staging_mirror_bytes must be an int >= 0, got {staging_mirror_bytes!r}")
        if direct_shm is None:
            direct_shm = os.environ.get("AIOTE_DIRECT_SHM", "1").strip().lower() not in ("0", "false", "no", "off")
        if direct_max is None:
            direct_max = _env_int("AIOTE_DIRECT_MAX", 4 << 20)
        if not isinstance(direct_max, int) or not 0 < direct_max < _U64:
            raise InvalidArgument(f"direct_max must be a positive int, got {direct_max!r}")
        if direct_workers is None:
            direct_workers = _env_int("AIOTE_DIRECT_WORKERS", 1)
        if not isinstance(direct_workers, int) or not 0 <= direct_workers <= 16:
            raise InvalidArgument(f"direct_workers must be an int 0..16, got {direct_workers!r}")
        if direct_inline is None:
            direct_inline = _env_int("AIOTE_DIRECT_INLINE", 256)
        if type(direct_inline) is not int or not 0 <= direct_inline <= 4096:
            raise InvalidArgument(f"direct_inline must be an int 0..4096, got {direct_inline!r}")
        if direct_assist is None:
            direct_assist = _env_int("AIOTE_DIRECT_ASSIST", 1)
        if type(direct_assist) is not int or not 0 <= direct_assist <= 15:
            raise InvalidArgument(f"direct_assist must be an int 0..15, got {direct_assist!r}")
        if carry_max is None:  # the default follows a small msg_size down
            carry_max = min(_env_int("AIOTE_CARRY_MAX", 8192), msg_size) if type(msg_size) is int else 8192
        if type(carry_max) is not int or not 0 <= carry_max <= msg_size:
            raise InvalidArgument(f"carry_max must be an int 0..msg_size ({msg_size}), got {carry_max!r}")
        if type(loop_spin_us) is not int or not 0 <= loop_spin_us <= 10_000_000:
            raise InvalidArgument(f"loop_spin_us must be an int in 0..10000000 (µs), got {loop_spin_us!r}")
        self._loop_spin_ns = loop_spin_us * 1000
        self._loop_spinning = False
        if await_spin_us is None and os.environ.get("AIOTE_AWAIT_SPIN_US"):
            await_spin_us = _env_int("AIOTE_AWAIT_SPIN_US", 0)  # checked as the argument is
        if await_spin_us is not None and (type(await_spin_us) is not int or not 0 <= await_spin_us <= 1_000_000):
            raise InvalidArgument(f"await_spin_us must be an int in 0..1000000 (µs) or None, got {await_spin_us!r}")
        self._await_spin_arg = await_spin_us
        self._await_spin_ns = 0  # set at open (the default depends on the provider)
        self._spin_attached = False
        self.requested_provider = PROVIDER_ALIASES.get(provider, provider)
        if gpu == "auto":
            gpu = "direct" if self.requested_provider.split(";")[0] in ("efa", "verbs") else "staged"
        self._gpu_mode, self._cuda_ipc, self._gpu_chunk = gpu, cuda_ipc, staging_chunk
        self._staging_bytes, self._mirror_bytes = staging_bytes, staging_mirror_bytes
        self._gpu: GpuPaths | None = None
        self._cfg_args = dict(host=host, domain=domain, nics=nnics, routing=routing, pinned_nic=pinned_nic,
                              stripe_threshold=stripe_threshold, polling=polling, spin_us=spin_us, msg_size=msg_size,
                              recv_slots=recv_slots, send_slots=send_slots, max_queued=max_queued,
                              delivery_complete=delivery_complete, peer_timeout=peer_timeout,
                              max_inflight=max_inflight, direct_shm=bool(direct_shm), direct_max=direct_max,
                              direct_workers=direct_workers, direct_inline=direct_inline,
                              direct_assist=direct_assist, carry_max=carry_max)
        self.id = next(_engine_ids)
        self._h: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._ops: dict[int, _Op] = {}
        self._op_ids = itertools.count(1)
        self._deferred: collections.deque[tuple[Any, int]] = collections.deque()
        if not isinstance(max_deferred, int) or max_deferred < 1:
            raise InvalidArgument(f"max_deferred must be an int >= 1, got {max_deferred!r}")
        self._max_deferred = max_deferred
        self._drainers: list[asyncio.Future[None]] = []
        self._regions: set[MemoryRegion] = set()
        self._watchers: dict[int, Watcher] = {}
        self._watch_rids: dict[int, Watcher] = {}  # armed notify reactions
        self._peers: dict[tuple[bytes, ...], int] = {}
        self._rdescs: dict[MrDescriptor, int] = {}
        self._inbox: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._recv_waiters: collections.deque[asyncio.Future[tuple[bytes, bytes]]] = collections.deque()
        self._events = ffi.new("aiote_event[]", _EVENT_BATCH)
        self._bad = ffi.new("uint64_t*")  # a failing element's index (read right after each call)
        self._wr1 = ffi.new("aiote_wr[1]")  # write()'s element (aiote_submit_writes copies it)
        self.imms = ImmCounter(self)
        self.provider = ""
        self._nic_addrs: tuple[bytes, ...] = ()
        self._log = get_logger().bind(engine=self.id)

    # -- life cycle --------------------------------------------------------------

    async def __aenter__(self) -> TransferEngine:
        self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def open(self) -> TransferEngine:
        """Open the endpoint and start the worker (``async with`` does this)."""
        if self._h is not None:
            return self
        if self._closed:
            raise EngineClosed("engine was closed")
        self._loop = asyncio.get_running_loop()
        a = self._cfg_args
        keep = [ffi.new("char[]", self.requested_provider.encode())]
        cfg = ffi.new("aiote_config*")
        cfg.provider = keep[0]
        if a["host"]:
            keep.append(ffi.new("char[]", a["host"].encode()))
            cfg.node = keep[-1]
        if a["domain"]:
            keep.append(ffi.new("char[]", a["domain"].encode()))
            cfg.domain = keep[-1]
        cfg.nics = a["nics"]
        cfg.routing = _ROUTING[a["routing"]]
        cfg.pinned_nic = a["pinned_nic"]
        cfg.stripe_threshold = a["stripe_threshold"]
        cfg.polling = _POLLING[a["polling"]]
        cfg.spin_us = a["spin_us"]
        cfg.msg_size = a["msg_size"]
        cfg.recv_slots = a["recv_slots"]
        cfg.send_slots = a["send_slots"]
        cfg.max_queued = a["max_queued"]
        cfg.delivery_complete = 1 if a["delivery_complete"] else 0
        cfg.peer_timeout_ms = max(1, int(a["peer_timeout"] * 1000))
        cfg.max_inflight = a["max_inflight"]
        cfg.hmem = 1 if self._gpu_mode == "direct" else 0
        cfg.direct_shm = 1 if a["direct_shm"] else 0
        cfg.direct_max = a["direct_max"]
        cfg.direct_workers = a["direct_workers"] if a["direct_workers"] > 0 else -1
        cfg.direct_inline = a["direct_inline"] if a["direct_inline"] > 0 else -1
        cfg.direct_assist = a["direct_assist"] if a["direct_assist"] > 0 else -1
        cfg.carry_max = a["carry_max"] if a["carry_max"] > 0 else -1
        out = ffi.new("aiote_engine**")
        _sweep_own_shm_names()
        rc = lib.aiote_engine_open(cfg, out)
        if rc == -lib.AIOTE_E_PROVIDER and "busy" in _last_error_lower():
            # shm names its region after the pid; one left by a killed process
            # whose pid came round again makes the first open fail with EBUSY
            # (and removes the stale file): the second open succeeds.
            rc = lib.aiote_engine_open(cfg, out)
        check(rc, f"opening provider {self.requested_provider!r}")
        self._h = out[0]
        info = self.info()
        self.provider = info["provider"]
        addrs = []
        for i in range(info["nics"]):
            buf = ffi.new("uint8_t[]", 256)
            n = ffi.new("size_t*", 256)
            check(lib.aiote_engine_address(self._h, i, buf, n))
            addrs.append(bytes(ffi.buffer(buf, n[0])))
        self._nic_addrs = tuple(addrs)
        self._efd = lib.aiote_engine_eventfd(self._h)
        self._loop.add_reader(self._efd, self._on_events)
        await_us = self._await_spin_arg
        if await_us is None:  # the default depends on the provider opened
            await_us = _AWAIT_SPIN_US if self.provider.startswith("tcp") else 0
        self._await_spin_ns = await_us * 1000
        if self._loop_spin_ns or self._await_spin_ns:
            self._spin_attached = _spin.attach(self)
            self._loop_spinning = self._spin_attached and bool(self._loop_spin_ns)
            if not self._spin_attached and self._loop_spin_ns:
                self._log.warning("engine.loop_spin_unavailable", loop=type(self._loop).__name__,
                                  why="loop_spin_us needs a SelectorEventLoop; using the eventfd")
        self._log = self._log.bind(provider=self.provider)
        self._log.debug("engine.open", **{k: v for k, v in info.items() if k != "provider"})
        return self

    async def close(self) -> None:
        """Close the engine: fail pending operations with EngineClosed, join the worker."""
        if self._gpu is not None and not self._closed and self._h is not None:
            await self._gpu.staging.aclose()  # peers hear of our staged transfers ending
        self._close()

    def _close(self, failure: Callable[[], AioteError] | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._h is None:
            return
        if self._spin_attached:
            self._spin_attached = self._loop_spinning = False
            _spin.detach(self)  # before shutdown: the loop must not poll the engine any more
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._efd)
        lib.aiote_engine_shutdown(self._h)  # joins the worker; queued work fails as closed
        self._drain()
        closed = failure or (lambda: EngineClosed("engine closed"))
        for op in self._ops.values():
            if not op.future.done():
                op.future.set_exception(closed())
        self._ops.clear()
        self._fail_deferred(closed)
        self.imms._fail_all(closed)
        if self._gpu is not None:
            self._gpu.close()  # after the copies in flight (shutdown waited), before the pools are freed
        while self._recv_waiters:
            f = self._recv_waiters.popleft()
            if not f.done():
                f.set_exception(closed())
        for w in list(self._watchers.values()):
            w._release()
        for r in list(self._regions):
            r._engine_closed()
        self._regions.clear()
        lib.aiote_engine_free(self._h)
        self._h = None
        self._log.debug("engine.closed")

    def __del__(self) -> None:
        if getattr(self, "_h", None) is not None and not self._closed:
            try:
                self._closed = True
                lib.aiote_engine_shutdown(self._h)
                lib.aiote_engine_free(self._h)
            except Exception:
                pass

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def await_spin_us(self) -> int:
        """The await-spin budget in µs in effect (0: off, or the loop can't be wrapped)."""
        return self._await_spin_ns // 1000 if self._spin_attached else 0

    @property
    def loop_spinning(self) -> bool:
        """True while the event loop spins on this engine (``loop_spin_us`` on a loop that allows it)."""
        return self._loop_spinning

    def _handle(self) -> Any:
        if self._closed:
            raise EngineClosed("engine is closed")
        if self._h is None:
            raise AioteError("engine is not open: use 'async with TransferEngine(...)' or open()")
        return self._h

    def _loop_checked(self) -> asyncio.AbstractEventLoop:
        self._handle()
        assert self._loop is not None
        return self._loop

    # -- information -------------------------------------------------------------

    @property
    def address(self) -> bytes:
        """This engine's address (all its NICs) as bytes, for ``send`` and rendezvous."""
        self._handle()
        return EngineAddress(self.provider, self._nic_addrs).to_bytes()

    def info(self) -> dict[str, Any]:
        """Provider facts: name, domain, mr_mode, imm size, completion semantics."""
        i = ffi.new("aiote_info*")
        check(lib.aiote_engine_info(self._handle(), i))
        return {
            "provider": ffi.string(i.provider).decode(),
            "fabric": ffi.string(i.fabric).decode(),
            "domain": ffi.string(i.domain).decode(),
            "mr_mode": int(i.mr_mode),
            "mr_key_size": int(i.mr_key_size),
            "cq_data_size": int(i.cq_data_size),
            "inject_size": int(i.inject_size),
            "max_msg_size": int(i.max_msg_size),
            "tx_size": int(i.tx_size),
            "rx_size": int(i.rx_size),
            "delivery_complete": bool(i.delivery_complete),
            "cq_wait_fd": bool(i.wait_fd),
            "hmem": bool(i.hmem),
            "nics": int(i.nics),
        }

    def stats(self) -> dict[str, int]:
        """Counters of the native engine (ops, bytes, imms, messages, retries)."""
        s = ffi.new("aiote_stats*")
        check(lib.aiote_engine_stats(self._handle(), s))
        return {name: int(getattr(s, name)) for name in dir(s)}

    def nic_stats(self) -> list[dict[str, int]]:
        """Per-NIC counters: writes posted, bytes, completions, errors, imms received, failed."""
        out = []
        c = ffi.new("aiote_nic_counters*")
        for i in range(len(self._nic_addrs)):
            check(lib.aiote_nic_stats(self._handle(), i, c))
            out.append({name: int(getattr(c, name)) for name in dir(c)})
        return out

    def fail_nic(self, nic: int) -> None:
        """Take NIC ``nic`` out of service, as a NIC failure would: what is in flight on it
        fails with a ProviderError naming it (``.nic``); later work uses the other NICs."""
        check(lib.aiote_nic_fail(self._handle(), nic), "fail_nic")

    # -- memory --------------------------------------------------------------------

    def register(self, buf: Any) -> MemoryRegion:
        """Register a writable, contiguous buffer: host memory (bytearray, memoryview,
        numpy, torch CPU) or CUDA memory (torch CUDA tensors, ``__cuda_array_interface__``;
        see ``gpu=``)."""
        self._handle()
        if getattr(buf, "is_cuda", False) or hasattr(buf, "__cuda_array_interface__"):
            cp = cuda.cuda_pointer(buf)
            if cp is not None:
                return self._gpu_paths().register(cp)
        return MemoryRegion(self, buf)

    def _gpu_paths(self) -> GpuPaths:
        if self._gpu is None:
            self._gpu = GpuPaths(self, self._gpu_mode, self._cuda_ipc, self._gpu_chunk, self._staging_bytes,
                                 self._mirror_bytes)
        return self._gpu

    @property
    def gpu_stats(self) -> dict[str, int]:
        """Bytes staged in/out, CUDA IPC writes, commits sent/received, slots granted,
        bad staging messages; pinned host memory (``mirror_pinned``, ``pool_pinned``,
        their sum ``staging_pinned``), the mirror budget left (``mirror_left``), staged
        regions open per protocol (``mirror_regions``, ``pooled_regions``) and staged
        writes per protocol (``writes_to_mirror``, ``writes_to_pool``,
        ``writes_from_mirror``, ``writes_from_pool``).  ``{}`` before the first GPU region."""
        return dict(self._gpu.stats) if self._gpu is not None else {}

    # -- peers ---------------------------------------------------------------------

    def _peer(self, addrs: tuple[bytes, ...], provider: str) -> int:
        if provider != self.provider:
            raise DescriptorError(f"descriptor is for provider {provider!r}, this engine uses {self.provider!r}")
        p = self._peers.get(addrs)
        if p is None:
            blob = _addr_blob(addrs)
            out = ffi.new("uint32_t*")
            check(lib.aiote_peer_insert(self._handle(), blob, len(blob), out), "peer address")
            p = self._peers[addrs] = int(out[0])
        return p

    def _rdesc(self, desc: MrDescriptor) -> int:
        """The native id of a remote region (resolved once per descriptor)."""
        r = self._rdescs.get(desc)
        if r is None:
            if not isinstance(desc, MrDescriptor):
                raise DescriptorError(f"expected MrDescriptor, got {type(desc).__name__}")
            peer = self._peer(desc.addrs, desc.provider)
            out = ffi.new("uint32_t*")
            keys = ffi.new("uint64_t[]", list(desc.keys))
            # a staged GPU region's keys name its owner's small stand-in registration: over the
            # NIC only imm-only writes reach it (bytes go through bounce slots, aiote/staging.py)
            length = 1 if desc.cuda is not None and desc.cuda.mode == "pooled" else desc.length
            check(lib.aiote_rdesc_insert(self._handle(), peer, desc.base, length, keys, len(desc.keys), out),
                  "descriptor")
            r = self._rdescs[desc] = int(out[0])
        return r

    # -- submission ----------------------------------------------------------------

    def _submit(self, submit, keep: Any) -> asyncio.Future[None]:
        """Run ``submit(op_id)``; queue it when the engine is saturated."""
        loop = self._loop_checked()
        op_id = next(self._op_ids)
        fut = _OpFuture(loop=loop)
        fut._engine = self
        fut._op_id = op_id
        if self._deferred:
            if len(self._deferred) >= self._max_deferred:
                raise QueueFull(f"{len(self._deferred)} operations already wait for the engine "
                                f"(max_deferred); await engine.drain()")
            rc = -lib.AIOTE_E_AGAIN
        else:
            rc = submit(op_id)
        if rc == -lib.AIOTE_E_AGAIN:
            self._deferred.append((submit, op_id))
        elif rc == lib.AIOTE_DONE:  # the direct path finished it already: no event follows
            fut.set_result(None)
            return fut
        else:
            check(rc)
        self._ops[op_id] = _Op(fut, keep)
        return fut

    async def drain(self) -> None:
        """Wait until no operation waits in Python for room in the engine's queue.

        ``write`` and friends never block: when ``max_queued`` elements are in the
        engine, further operations wait in a Python queue of at most ``max_deferred``
        (then QueueFull).  A producer that may outrun the NIC awaits ``drain()`` now
        and then to keep that queue, and its memory, bounded.
        """
        if not self._deferred:
            return
        fut = self._loop_checked().create_future()
        self._drainers.append(fut)
        await fut

    def _flush_deferred(self) -> None:
        self._flush_deferred_ops()
        if not self._deferred and self._drainers:
            drainers, self._drainers = self._drainers, []
            for f in drainers:
                if not f.done():
                    f.set_result(None)

    def _flush_deferred_ops(self) -> None:
        while self._deferred:
            submit, op_id = self._deferred[0]
            op = self._ops.get(op_id)
            if op is None or op.future.cancelled():
                self._deferred.popleft()
                self._ops.pop(op_id, None)
                continue
            rc = submit(op_id)
            if rc == -lib.AIOTE_E_AGAIN:
                return
            self._deferred.popleft()
            if rc == lib.AIOTE_DONE:
                self._ops.pop(op_id, None)
                if not op.future.done():
                    op.future.set_result(None)
            elif rc < 0:
                self._ops.pop(op_id, None)
                try:
                    check(rc)
                except AioteError as e:
                    op.future.set_exception(e)

    def _fail_deferred(self, exc_factory) -> None:
        while self._deferred:
            _, op_id = self._deferred.popleft()
            op = self._ops.pop(op_id, None)
            if op is not None and not op.future.done():
                op.future.set_exception(exc_factory())
        drainers, self._drainers = self._drainers, []
        for f in drainers:
            if not f.done():
                f.set_result(None)  # nothing waits any more: the ops failed with the engine

    @staticmethod
    def _check_imm(imm: int | None) -> tuple[int, int]:
        if imm is None:
            return 0, 0
        if not isinstance(imm, int) or not 0 <= imm <= IMM_MAX:
            raise InvalidArgument(f"imm must be an int in 0..{IMM_MAX}, got {imm!r}")
        return 1, imm

    def _submit_wrs(self, src: MemoryRegion | None, wrs: Any, n: int, imm: int | None,
                    keep: Any) -> asyncio.Future[None]:
        has_imm, imm_v = self._check_imm(imm)
        h = self._handle()
        mr_id = src._mr_id() if src is not None else self._scratch()._mr_id()
        if not self._deferred:  # fast path: one C call (the direct path may finish it there)
            op_id = next(self._op_ids)
            bad = self._bad
            rc = lib.aiote_submit_writes(h, op_id, mr_id, wrs, n, has_imm, imm_v, bad)
            if rc == lib.AIOTE_DONE:
                fut = self._loop.create_future()
                fut.set_result(None)
                return fut
            if rc >= 0:
                return self._track(op_id, (src, wrs, keep))
            if rc != -lib.AIOTE_E_AGAIN:
                check(rc, index=int(bad[0]))
        if wrs is self._wr1:  # the retry below needs its own copy of the shared element
            wrs = ffi.new("aiote_wr[1]")
            ffi.memmove(wrs, self._wr1, ffi.sizeof("aiote_wr"))
        bad = ffi.new("uint64_t*")

        def submit(op_id: int) -> int:
            rc = lib.aiote_submit_writes(h, op_id, mr_id, wrs, n, has_imm, imm_v, bad)
            if rc < 0 and rc != -lib.AIOTE_E_AGAIN:
                check(rc, index=int(bad[0]))
            return rc

        return self._submit(submit, (src, wrs, keep))

    def _track(self, op_id: int, keep: Any) -> asyncio.Future[None]:
        """The future of an op the engine took (its event resolves it)."""
        fut = _OpFuture(loop=self._loop)
        fut._engine = self
        fut._op_id = op_id
        self._ops[op_id] = _Op(fut, keep)
        return fut

    def _scratch(self) -> MemoryRegion:
        """A tiny region used as the local side of imm-only writes."""
        r = getattr(self, "_scratch_mr", None)
        if r is None or r.closed:
            r = self._scratch_mr = self.register(bytearray(64))
        return r

    def _fill(self, w: Any, desc: MrDescriptor, src_off: int, dst_off: int, length: int) -> None:
        if not (type(src_off) is int and type(dst_off) is int and type(length) is int
                and 0 <= src_off < _U64 and 0 <= dst_off < _U64 and 0 <= length < _U64):
            for name, v in (("src_offset", src_off), ("dst_offset", dst_off), ("length", length)):
                if not isinstance(v, int) or v < 0 or v >= _U64:
                    raise InvalidArgument(f"{name} must be a non-negative int, got {v!r}")
        w.rdesc = self._rdesc(desc)
        w.src_off = src_off
        w.dst_off = dst_off
        w.len = length

    def write(self, src: MemoryRegion, dst: MrDescriptor, length: int | None = None, src_offset: int = 0,
              dst_offset: int = 0, imm: int | None = None) -> asyncio.Future[None]:
        """Write ``length`` bytes (default: the rest of ``src``) into the peer's region.

        With ``imm`` the target's ImmCounter counts one arrival of it once the
        bytes are there.  Bounds of both regions are checked before posting
        (OutOfBounds).
        """
        if not isinstance(src, MemoryRegion):
            raise TypeError(f"src must be a MemoryRegion, got {type(src).__name__}")
        if length is None:
            length = src.nbytes - src_offset
        # The latency path (docs/benchmarks.md, issue 2): host memory on both sides, a
        # descriptor resolved before, plain ints, nothing deferred: one C call with scalars.
        # Anything else, or anything the C call refuses as an argument, takes the checked path.
        if (type(dst) is MrDescriptor and dst.cuda is None and src.cuda is None and not self._deferred
                and type(src_offset) is int and type(dst_offset) is int and type(length) is int
                and (imm is None or (type(imm) is int and 0 <= imm <= IMM_MAX)) and not self._closed
                and not src._closed):
            r = self._rdescs.get(dst)
            h = self._h
            if r is not None and h is not None:
                op_id = next(self._op_ids)
                try:
                    rc = lib.aiote_submit_write(h, op_id, src._id, r, src_offset, dst_offset, length,
                                                imm is not None, imm or 0, self._bad)
                except OverflowError:  # negative or >= 2**64: the checked path names it
                    rc = None
                if rc is not None:
                    if rc == _DONE:  # copied (and its imm published) inside the call
                        fut = self._loop.create_future()
                        fut.set_result(None)
                        return fut
                    if rc >= 0:
                        return self._track(op_id, (src, None, None))
                    if rc != _AGAIN:
                        check(rc, index=int(self._bad[0]))
                    # the engine is full: the checked path defers it
        if self._gpu is not None and type(dst) is MrDescriptor and dst.cuda is not None:
            fut = self._gpu.ipc_write_one(src, dst, length, src_offset, dst_offset, imm)
            if fut is not None:  # the common GPU->GPU case on one host, checked and queued
                return fut
        wrs = self._wr1  # C copies the element: one buffer serves every call (see _submit_wrs)
        self._fill(wrs[0], dst, src_offset, dst_offset, length)
        if src.cuda is not None or dst.cuda is not None:
            return self._gpu_submit(src, [(dst, src_offset, dst_offset, length)], imm)
        return self._submit_wrs(src, wrs, 1, imm, None)

    # -- watchers: transfers fired by a word in memory (aiote/watch.py) ------------------

    def watcher(self, *, cuda: bool = False, device: int = 0, buffer: Any = None, offset: int = 0) -> Watcher:
        """A watched 64-bit word: in device-mapped pinned memory (``cuda=True``, for kernels
        and CUDA graphs), in ``buffer`` at ``offset`` (e.g. shared memory another process
        writes), or in a fresh page."""
        self._handle()
        return Watcher(self, cuda=cuda, device=device, buffer=buffer, offset=offset)

    def prepare_write(self, src: MemoryRegion, dst: MrDescriptor, length: int | None = None, src_offset: int = 0,
                      dst_offset: int = 0, imm: int | None = None) -> Prepared:
        """A write checked now, posted by C each time a watcher reaction fires or ``post()`` is called."""
        if length is None:
            length = src.nbytes - src_offset
        return self.prepare_scatter(src, [(dst, src_offset, dst_offset, length)], imm)

    def prepare_scatter(self, src: MemoryRegion, targets: Sequence[tuple[MrDescriptor, int, int, int]],
                        imm: int | None = None) -> Prepared:
        """Like ``scatter``, prepared: checked and resolved once, then ``post()`` (or a watcher
        reaction) sends the whole batch with one C call — a repeated batch costs no Python
        per element (see ``Prepared.post``)."""
        self._check_prepared_src(src, [t[0] for t in targets])
        n = len(targets)
        if n == 0:
            raise InvalidArgument("a prepared transfer needs at least one element")
        wrs = ffi.new("aiote_wr[]", n)
        for i, (desc, so, do, ln) in enumerate(targets):
            self._fill(wrs[i], desc, so, do, ln)
        has_imm, imm_v = self._check_imm(imm)
        bad, out = ffi.new("uint64_t*"), ffi.new("uint32_t*")
        check(lib.aiote_prepare_writes(self._handle(), src._mr_id(), wrs, n, has_imm, imm_v, bad, out),
              "prepare", index=int(bad[0]))
        return Prepared(self, int(out[0]), src, n)

    def prepare_barrier(self, targets: Iterable[MrDescriptor], imm: int) -> Prepared:
        """Like ``barrier``, prepared: an imm-only write to each target's owner."""
        if imm is None:
            raise InvalidArgument("a barrier needs an imm")
        return self.prepare_scatter(self._scratch(), [(d, 0, 0, 0) for d in targets], imm)

    def prepare_paged(self, src: MemoryRegion, dst: MrDescriptor, page_len: int, src_pages: Any, dst_pages: Any,
                      src_stride: int | None = None, dst_stride: int | None = None, src_offset: int = 0,
                      dst_offset: int = 0, imm: int | None = None) -> Prepared:
        """Like ``write_paged``, prepared (see ``prepare_write``)."""
        self._check_prepared_src(src, [dst])
        sp, dp, n, src_stride, dst_stride, keep = _paged_args(page_len, src_pages, dst_pages, src_stride,
                                                             dst_stride, src_offset, dst_offset)
        has_imm, imm_v = self._check_imm(imm)
        bad, out = ffi.new("uint64_t*"), ffi.new("uint32_t*")
        check(lib.aiote_prepare_paged(self._handle(), src._mr_id(), self._rdesc(dst), page_len, sp, src_stride,
                                      src_offset, dp, dst_stride, dst_offset, n, has_imm, imm_v, bad, out),
              "prepare", index=int(bad[0]))
        return Prepared(self, int(out[0]), (src, keep), n)

    @staticmethod
    def _check_prepared_src(src: MemoryRegion, dsts: Sequence[MrDescriptor]) -> None:
        if not isinstance(src, MemoryRegion):
            raise TypeError(f"src must be a MemoryRegion, got {type(src).__name__}")
        staged = (src.cuda is not None and src.cuda.staged) or any(
            getattr(d, "cuda", None) is not None and d.cuda.mode in ("staged", "pooled")  # non-descriptors: _fill
            for d in dsts)
        if staged:
            raise InvalidArgument("prepared transfers need host memory or GPUDirect regions: a staged GPU "
                                  "region's bytes must be copied by Python first (write it instead)")

    @staticmethod
    def _op_record(fut: asyncio.Future[None], keep: Any) -> _Op:
        return _Op(fut, keep)

    # -- GPU paths (aiote/gpu.py) -------------------------------------------------------

    def _gpu_submit(self, src: MemoryRegion, elems: Sequence[tuple[MrDescriptor, int, int, int]],
                    imm: int | None) -> asyncio.Future[None]:
        self._check_imm(imm)
        src._mr_id()
        es = [Element(d, so, do, ln) for d, so, do, ln in elems]
        check_elements(src.nbytes, es)
        return self._gpu_paths().submit(src, es, imm)

    def _write_ranges(self, src: MemoryRegion | None, dst: MrDescriptor, ranges: Sequence[tuple[int, int, int]],
                      imm: int | None) -> asyncio.Future[None]:
        """NIC writes (src_off, dst_off, len) of one source region into one descriptor."""
        wrs = ffi.new("aiote_wr[]", len(ranges))
        for i, (so, do, ln) in enumerate(ranges):
            self._fill(wrs[i], dst, so, do, ln)
        return self._submit_wrs(src, wrs, len(ranges), imm, None)

    def _imm_only(self, dst: MrDescriptor, imm: int, count: int) -> asyncio.Future[None]:
        """count imm-only writes to dst's owner."""
        wrs = ffi.new("aiote_wr[]", count)
        for i in range(count):
            self._fill(wrs[i], dst, 0, 0, 0)
        return self._submit_wrs(None, wrs, count, imm, None)

    def _submit_cuda(self, ctx: int, stream: int, wait: tuple[int, int], copies: Sequence[tuple[int, int, int]],
                     src: MemoryRegion | None, dst: MrDescriptor | None, ranges: Sequence[tuple[int, int, int]],
                     imm: int | None) -> asyncio.Future[None]:
        """Copies (dst address, src address, n) on stream, then NIC writes (src_off,
        dst_off, len) of src into dst, posted by the worker once the copies are done."""
        return self._submit_cuda_to(ctx, stream, wait, copies, src, [(dst, so, do, ln) for so, do, ln in ranges],
                                    imm)

    def _submit_cuda_to(self, ctx: int, stream: int, wait: tuple[int, int], copies: Sequence[tuple[int, int, int]],
                        src: MemoryRegion | None, targets: Sequence[tuple[MrDescriptor | int, int, int, int]],
                        imm: int | None, lanes: tuple[bytes, Any, int, int] | None = None) -> asyncio.Future[None]:
        """Like ``_submit_cuda``, the writes to any descriptors: (dst, src_off, dst_off, len), dst
        a descriptor or its rdesc (an int).
        ``lanes``: (lane of each copy, the (stream, event) pairs, how many, the fork event):
        the copies on those streams (``aiote_submit_cuda_lanes``)."""
        has_imm, imm_v = self._check_imm(imm)
        h = self._handle()
        mr_id = src._mr_id() if src is not None else self._scratch()._mr_id()
        n = len(targets)
        wrs: Any = ffi.NULL
        if n:  # packed straight into aiote_wr layout, as scatter does; the slow path names a bad value
            buf = bytearray(_WR.size * n)
            try:
                for i, (d, so, do, ln) in enumerate(targets):
                    # an int: the rdesc already resolved (ipc_batch)
                    r = d if type(d) is int else self._rdescs.get(d) if type(d) is MrDescriptor else None
                    _WR.pack_into(buf, i * _WR.size, self._rdesc(d) if r is None else r, 0, so, do, ln)
                wrs = ffi.from_buffer("aiote_wr[]", buf)
            except struct.error:
                wrs = ffi.new("aiote_wr[]", n)
                for i, (d, so, do, ln) in enumerate(targets):
                    self._fill(wrs[i], d, so, do, ln)
        cps: Any = ffi.NULL
        ncopies = len(copies)
        if copies:  # one pack call for the whole list ((dst, src, len) = aiote_copy)
            cps = ffi.from_buffer("aiote_copy[]", bytearray(struct.pack(f"={3 * ncopies}Q",
                                                                        *[x for c in copies for x in c])))
        w, ws = wait
        bad = ffi.new("uint64_t*")
        if lanes is not None:
            lane_of, arr, nlanes, fork = lanes

            def submit(op_id: int) -> int:
                rc = lib.aiote_submit_cuda_lanes(h, op_id, ctx, stream, w, ws, cps, lane_of, ncopies, arr, nlanes,
                                                 fork, mr_id, wrs, n, has_imm, imm_v, bad)
                if rc < 0 and rc != -lib.AIOTE_E_AGAIN:
                    check(rc, index=int(bad[0]))
                return rc

            return self._submit(submit, (src, wrs, cps, lane_of, arr))

        def submit(op_id: int) -> int:
            rc = lib.aiote_submit_cuda(h, op_id, ctx, stream, w, ws, cps, ncopies, mr_id, wrs, n, has_imm, imm_v,
                                       bad)
            if rc < 0 and rc != -lib.AIOTE_E_AGAIN:
                check(rc, index=int(bad[0]))
            return rc

        return self._submit(submit, (src, wrs, cps))

    def _cuda_arrive(self, ctx: int, stream: int, copies: Sequence[tuple[int, int, int]], imm: int,
                     count: int) -> None:
        """Copies on stream; then the worker counts count arrivals of imm (mirror commits)."""
        cps = ffi.new("aiote_copy[]", len(copies)) if copies else ffi.NULL
        for i, (d, s_, ln) in enumerate(copies):
            c = cps[i]
            c.dst, c.src, c.len = d, s_, ln
        check(lib.aiote_cuda_arrive(self._handle(), ctx, stream, cps, len(copies), imm, count), "commit")

    def _send_ctrl(self, peer: EngineAddress, body: bytes) -> asyncio.Future[None]:
        return self._send(peer, body, lib.AIOTE_MSG_CTRL)

    def _imm_arrive(self, imm: int, count: int) -> None:
        check(lib.aiote_imm_arrive(self._handle(), imm, count), "imm")

    def write_imm(self, dst: MrDescriptor, imm: int) -> asyncio.Future[None]:
        """A 0-byte write that only delivers ``imm`` to the region's owner."""
        if imm is None:
            raise InvalidArgument("write_imm needs an imm")
        wrs = ffi.new("aiote_wr[1]")
        self._fill(wrs[0], dst, 0, 0, 0)
        return self._submit_wrs(None, wrs, 1, imm, None)

    def scatter(self, src: MemoryRegion, targets: Sequence[tuple[MrDescriptor, int, int, int]],
                imm: int | None = None) -> asyncio.Future[None]:
        """One source region to many (descriptor, src_offset, dst_offset, length) targets.

        One C submission; every element is bounds-checked before anything is
        posted; an error names the failing element (``.index``).
        """
        if not isinstance(src, MemoryRegion):
            raise TypeError(f"src must be a MemoryRegion, got {type(src).__name__}")
        n = len(targets)
        if n == 0:
            raise InvalidArgument("scatter needs at least one target")
        # packed straight into aiote_wr layout: small batches are common and every
        # microsecond of Python per element shows (docs/benchmarks.md, direct path)
        buf = bytearray(_WR.size * n)
        pack, rdescs = _WR.pack_into, self._rdescs
        last, r, cuda_dst = None, 0, False
        try:
            for i, (desc, so, do, ln) in enumerate(targets):
                if desc is not last:
                    r = rdescs.get(desc) if type(desc) is MrDescriptor else None
                    if r is None:
                        r = self._rdesc(desc)
                    cuda_dst = cuda_dst or desc.cuda is not None
                    last = desc
                if type(so) is not int or type(do) is not int or type(ln) is not int:
                    raise struct.error("not an int")
                pack(buf, i * _WR.size, r, 0, so, do, ln)
            wrs = ffi.from_buffer("aiote_wr[]", buf)
        except struct.error:  # out of range or not an int: the slow path names it (or copes)
            wrs = ffi.new("aiote_wr[]", n)
            for i, (desc, so, do, ln) in enumerate(targets):
                self._fill(wrs[i], desc, so, do, ln)
            cuda_dst = any(t[0].cuda is not None for t in targets)
        if src.cuda is not None or cuda_dst:
            return self._gpu_submit(src, list(targets), imm)
        return self._submit_wrs(src, wrs, n, imm, buf)

    def barrier(self, targets: Iterable[MrDescriptor] | PeerGroup, imm: int) -> asyncio.Future[None]:
        """An imm-only write to each target (each target's owner counts one ``imm``)."""
        group = targets if isinstance(targets, PeerGroup) else self.peer_group(targets)
        return group.barrier(imm)

    def peer_group(self, descs: Iterable[MrDescriptor]) -> PeerGroup:
        """Validate and resolve a list of peer regions once, for repeated scatter/barrier rounds."""
        return PeerGroup(self, list(descs))

    def write_paged(self, src: MemoryRegion, dst: MrDescriptor, page_len: int, src_pages: Any, dst_pages: Any,
                    src_stride: int | None = None, dst_stride: int | None = None, src_offset: int = 0,
                    dst_offset: int = 0, imm: int | None = None) -> asyncio.Future[None]:
        """One write per page: page i goes from ``src_offset + src_pages[i]*src_stride``
        to ``dst_offset + dst_pages[i]*dst_stride``, ``page_len`` bytes.

        Page lists may be sequences of ints, numpy arrays or torch integer
        tensors; the loop over pages runs in C.  With ``imm`` every page
        carries it: the receiver waits for ``len(pages)`` imms.
        """
        if not isinstance(src, MemoryRegion):
            raise TypeError(f"src must be a MemoryRegion, got {type(src).__name__}")
        sp, dp, n, src_stride, dst_stride, keep = _paged_args(page_len, src_pages, dst_pages, src_stride,
                                                             dst_stride, src_offset, dst_offset)
        has_imm, imm_v = self._check_imm(imm)
        rd = self._rdesc(dst)
        if src.cuda is not None or dst.cuda is not None:
            sl, dl = [int(x) for x in keep[0]], [int(x) for x in keep[1]]
            if any(p < 0 for p in sl) or any(p < 0 for p in dl):
                raise InvalidArgument("page numbers must be >= 0")
            return self._gpu_submit(src, [(dst, src_offset + a * src_stride, dst_offset + b * dst_stride, page_len)
                                          for a, b in zip(sl, dl)], imm)
        h = self._handle()
        mr_id = src._mr_id()
        bad = ffi.new("uint64_t*")

        def submit(op_id: int) -> int:
            rc = lib.aiote_submit_paged(h, op_id, mr_id, rd, page_len,
                                        sp, src_stride, src_offset, dp, dst_stride, dst_offset, n,
                                        has_imm, imm_v, bad)
            if rc < 0 and rc != -lib.AIOTE_E_AGAIN:
                check(rc, index=int(bad[0]))
            return rc

        return self._submit(submit, (src, keep))

    # -- messages ------------------------------------------------------------------

    def send(self, peer: bytes | EngineAddress, data: bytes | bytearray | memoryview) -> asyncio.Future[None]:
        """Send a small two-sided message (at most ``msg_size`` bytes) to an engine address."""
        return self._send(peer, data, 0)

    def _send(self, peer: bytes | EngineAddress, data: bytes | bytearray | memoryview,
              flags: int) -> asyncio.Future[None]:
        h = self._handle()
        addr = peer if isinstance(peer, EngineAddress) else EngineAddress.from_bytes(peer)
        p = self._peer(addr.addrs, addr.provider)
        payload = bytes(data)

        def submit(op_id: int) -> int:
            rc = lib.aiote_submit_send(h, op_id, p, payload, len(payload), flags)
            if rc < 0 and rc != -lib.AIOTE_E_AGAIN:
                check(rc, "send")
            return rc

        return self._submit(submit, None)

    async def recv(self) -> tuple[bytes, bytes]:
        """Wait for the next message: returns (payload, sender address)."""
        loop = self._loop_checked()
        if self._inbox:
            return self._inbox.popleft()
        fut: asyncio.Future[tuple[bytes, bytes]] = loop.create_future()
        self._recv_waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._inbox.appendleft(fut.result())  # delivered as we were cancelled: keep it
            raise

    # -- events ----------------------------------------------------------------------

    def _on_events(self) -> None:
        try:
            os.read(self._efd, 8)
        except BlockingIOError:
            pass
        self._drain()
        if self._deferred:
            self._flush_deferred()

    def _drain(self) -> None:
        h, evs = self._h, self._events
        fired = self.imms._fired
        while True:
            n = _poll_events(h, evs, _EVENT_BATCH)
            for i in range(n):
                ev = evs[i]
                kind = ev.kind
                if kind == _EV_IMM:
                    fired(ev.id)
                elif kind == _EV_OP:
                    self._op_event(ev)
                elif kind == lib.AIOTE_EV_RECV:
                    self._recv_event(ev)
                elif kind == lib.AIOTE_EV_PEER_DOWN:
                    self._peer_down(ev)
                elif kind == lib.AIOTE_EV_WATCH:
                    w = self._watch_rids.pop(int(ev.id), None)
                    if w is not None:
                        w._event(ev)
                elif kind == lib.AIOTE_EV_WEDGED:
                    self._loop_checked().call_soon(self._wedged, int(ev.id))
            if n < _EVENT_BATCH:
                return

    def _op_event(self, ev: Any) -> None:
        op = self._ops.pop(int(ev.id), None)
        if op is None or op.future.done():
            return
        if ev.status == 0:
            op.future.set_result(None)
        else:
            index = int(ev.index)
            if ev.status == -lib.AIOTE_E_CLOSED:
                exc: AioteError = EngineClosed("engine closed" if self._closed else "operation withdrawn")
            else:
                nic = int(ev.nic) if ev.nic >= 0 else None
                where = f"element {index}" + (f" on NIC {nic}" if nic is not None else "")
                exc = error_for(ev.status, f"{where} failed", fi_errno=ev.fi_errno,
                                prov_errno=ev.prov_errno, index=index, nic=nic)
            op.future.set_exception(exc)

    def _wedged(self, peer: int) -> None:
        """The worker is stuck for good inside the provider (see aiote_engine's watchdog)."""
        if self._closed:
            return
        self._log.error("engine.wedged", peer=peer)
        self._close(lambda: PeerUnreachable(
            f"engine unusable: libfabric shm is stuck on dead peer {peer} (its process died holding a "
            "lock in its shared region); open a new engine"))

    def _peer_down(self, ev: Any) -> None:
        idx = int(ev.id)
        if ev.index:  # its process exited: forget it, so its address resolves afresh
            gone = [a for a, p in self._peers.items() if p == idx]
            for a in gone:
                del self._peers[a]
            for d in [d for d in self._rdescs if d.addrs in gone]:
                del self._rdescs[d]
            if self._gpu is not None:
                self._gpu.forget_plans()
        why = "its process exited" if ev.index else f"it stopped answering: {fi_strerror(int(ev.fi_errno))}"
        if self._gpu is not None:
            self._gpu.staging.peer_down(idx, why)
        self._log.info("peer.down", peer=idx, fi_errno=int(ev.fi_errno), exited=bool(ev.index))
        self.imms._peer_down(idx, lambda: PeerUnreachable(f"peer is down ({why})", fi_errno=int(ev.fi_errno),
                                                           prov_errno=int(ev.prov_errno)))

    def _recv_event(self, ev: Any) -> None:
        raw = ffi.buffer(ev.data, ev.payload_off + ev.len)
        src = raw[ev.src_off:ev.src_off + ev.src_len]
        payload = raw[ev.payload_off:ev.payload_off + ev.len]
        lib.aiote_free(ev.data)
        if ev.index & lib.AIOTE_MSG_CTRL:  # aiote's own: the GPU staging protocol
            if self._gpu is not None:
                self._gpu.on_ctrl(payload, _parse_addr_blob(src))
            return
        sender = EngineAddress(self.provider, _parse_addr_blob(src)).to_bytes()  # checked in C
        while self._recv_waiters:
            f = self._recv_waiters.popleft()
            if not f.done():
                f.set_result((payload, sender))
                return
        self._inbox.append((payload, sender))


class PeerGroup:
    """Peer regions resolved once: repeated rounds skip validation and address lookups.

    ``barrier(imm)`` posts the group's prebuilt batch as it is; ``scatter``
    only fills in offsets and lengths.
    """

    def __init__(self, engine: TransferEngine, descs: list[MrDescriptor]):
        if not descs:
            raise InvalidArgument("a peer group needs at least one descriptor")
        self._engine = engine
        self.descriptors = tuple(descs)
        n = len(descs)
        self._template = ffi.new("aiote_wr[]", n)
        for i, d in enumerate(descs):
            engine._fill(self._template[i], d, 0, 0, 0)

    def __len__(self) -> int:
        return len(self.descriptors)

    def barrier(self, imm: int) -> asyncio.Future[None]:
        """An imm-only write to every member."""
        if imm is None:
            raise InvalidArgument("barrier needs an imm")
        return self._engine._submit_wrs(None, self._template, len(self.descriptors), imm, None)

    def scatter(self, src: MemoryRegion, length: int | Sequence[int], src_offsets: int | Sequence[int] = 0,
                dst_offsets: int | Sequence[int] = 0, imm: int | None = None) -> asyncio.Future[None]:
        """Write to every member: member i gets ``length[i]`` bytes from ``src_offsets[i]``
        at ``dst_offsets[i]`` (scalars apply to all members)."""
        n = len(self.descriptors)
        wrs = ffi.new("aiote_wr[]", n)
        ffi.memmove(wrs, self._template, ffi.sizeof("aiote_wr") * n)
        cols = []
        for name, v in (("length", length), ("src_offsets", src_offsets), ("dst_offsets", dst_offsets)):
            col = [v] * n if isinstance(v, int) else list(v)
            if len(col) != n:
                raise InvalidArgument(f"{name} has {len(col)} entries for {n} members")
            if any(not isinstance(x, int) or x < 0 or x >= 1 << 64 for x in col):
                raise InvalidArgument(f"{name} must hold non-negative ints")
            cols.append(col)
        for i, (ln, so, do) in enumerate(zip(*cols)):
            w = wrs[i]
            w.len = ln
            w.src_off = so
            w.dst_off = do
        if src.cuda is not None or any(d.cuda is not None for d in self.descriptors):
            return self._engine._gpu_submit(src, [(d, so, do, ln) for d, (ln, so, do) in
                                                  zip(self.descriptors, zip(*cols))], imm)
        return self._engine._submit_wrs(src, wrs, n, imm, None)


_swept_pid = 0


def _sweep_own_shm_names() -> None:
    """Remove /dev/shm files named after this process's pid, once per process.

    libfabric's shm names its regions ``<pid>:<domain>:<endpoint>`` and counts endpoints per
    process (aiote opens one per shm peer).  A killed process leaves its files behind, and a
    later process that gets the same pid collides with them (fi_enable: EBUSY), on any of its
    endpoints.  Before this process's first engine none of those files can be its own.
    """
    global _swept_pid
    pid = os.getpid()
    if _swept_pid == pid:
        return
    _swept_pid = pid
    for path in glob.glob(f"/dev/shm/{pid}:*"):
        with contextlib.suppress(OSError):
            os.unlink(path)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise InvalidArgument(f"{name} must be an int") from None


def _last_error_lower() -> str:
    return ffi.string(lib.aiote_last_error()).decode(errors="replace").lower()


def _addr_blob(addrs: tuple[bytes, ...]) -> bytes:
    """Addresses as the native layer takes them: count u8, then (u16 length, bytes) each."""
    return bytes([len(addrs)]) + b"".join(len(a).to_bytes(2, "little") + a for a in addrs)


def _parse_addr_blob(blob: bytes) -> tuple[bytes, ...]:
    out, pos = [], 1
    for _ in range(blob[0]):
        n = int.from_bytes(blob[pos:pos + 2], "little")
        out.append(blob[pos + 2:pos + 2 + n])
        pos += 2 + n
    return tuple(out)


def _paged_args(page_len: Any, src_pages: Any, dst_pages: Any, src_stride: Any, dst_stride: Any,
                src_offset: Any, dst_offset: Any) -> tuple[Any, Any, int, int, int, Any]:
    """Checked arguments of a paged write: C page arrays, count, strides, and what keeps the arrays alive."""
    sp, sp_keep, n = _int64_pages(src_pages)
    dp, dp_keep, m = _int64_pages(dst_pages)
    if n != m:
        raise InvalidArgument(f"src_pages has {n} entries, dst_pages {m}")
    if n == 0:
        raise InvalidArgument("a paged write needs at least one page")
    src_stride = page_len if src_stride is None else src_stride
    dst_stride = page_len if dst_stride is None else dst_stride
    for name, v in (("page_len", page_len), ("src_stride", src_stride), ("dst_stride", dst_stride),
                    ("src_offset", src_offset), ("dst_offset", dst_offset)):
        if not isinstance(v, int) or v < 0 or v >= 1 << 64:
            raise InvalidArgument(f"{name} must be a non-negative int, got {v!r}")
    return sp, dp, n, src_stride, dst_stride, (sp_keep, dp_keep)


def _int64_pages(pages: Any) -> tuple[Any, Any, int]:
    """A C int64 array view of a page list (sequence, numpy array or torch tensor)."""
    mod = type(pages).__module__
    if mod.startswith("torch"):
        import torch

        t = pages.detach().to(device="cpu", dtype=torch.int64).contiguous()
        keep = t.numpy()
    elif mod.startswith("numpy"):
        import numpy as np

        keep = np.ascontiguousarray(pages, dtype=np.int64)
    else:
        try:
            keep = array.array("q", pages)
        except (TypeError, OverflowError) as e:
            raise InvalidArgument(f"page indices must be integers: {e}") from e
    n = len(keep)
    if n == 0:
        return ffi.NULL, keep, 0
    return ffi.from_buffer("int64_t[]", keep), keep, n
