"""MoE dispatch/combine over counted one-sided writes.

Every rank owns ``num_experts / world`` experts.  Each step:

1. **dispatch** — a rank groups its (token, k) pairs by the rank that owns the chosen
   expert (on the host, one C pass: ``aiote_moe_route``, a counting sort; no per-token
   Python; GPU ids are read back once, the step's one wait for the GPU) and packs, for
   every other rank, one
   contiguous segment: the rows' local expert ids, a 16-byte header (step tag, row
   count, where the rows sit in the sender's packing, sender rank) and the rows.  Each
   segment goes out as **one write carrying the dispatch imm** into the receiver's
   fixed-capacity slot for this source (``capacity`` rows), so the imm is counted only
   once the header, ids and rows of that write are all in place.  A source with nothing
   for a rank still writes the header (count 0): every receiver waits for exactly
   ``world - 1`` imms, then reads the counts from the headers — no count round trip.
   The receiver then makes its rows contiguous: the first slot is in place, later slots
   move down behind it (a local copy; none at EP 2) and its own rows are gathered
   straight from its input behind them.

   **GPU rows** keep their ids and headers in host memory of their own (``meta``), so
   receivers read the counts without a GPU sync.  All of a rank's rows are gathered by
   one ``index_select`` into its receive buffer: its own rows at the start of its own
   slot, the rows for the others behind them (no send buffer).  For the ranks reached
   over CUDA IPC one C call (an ``IpcBatchPlan``, resolved at ``connect``) copies every
   segment's rows into its receiver's slot and, once the copies are done, writes each
   receiver's ids and header with the dispatch imm.  Rows for a rank not reached over
   IPC go as a write of their own with the *other* parity's dispatch imm (flagged in
   the header; the receiver waits for those too: a staged write's imm counts only once
   its bytes are in GPU memory).  A segment lands at its slot's end or start (the slot
   ``d`` slots before the receiver's own: end for even ``d``, start for odd), so the
   rows of the last remote slot end where the own rows start and those of the slots
   before it come in runs of two, each moved up in one copy (none at EP 2, one at EP 4;
   ``aiote_cuda_copy`` on torch's stream, as are the index uploads).
2. the receiver runs its experts on them (``expert_fn``);
3. **combine** — it writes each source's output rows straight back into the order
   that source packed them (the header said where; one write per source, imm-only when
   empty; on GPUs one C call of copies then imm-only writes for the IPC peers); a
   source awaits one from every other rank and reduces the rows with the routing
   weights in one ``embedding_bag`` (sum, the weights per sample, a bag of top_k rows
   per token) that reads each row where it is: the receive, out and combine buffers are
   one allocation, seen as one [rows, hidden] tensor, and ``dispatch`` wrote the bag
   indices (no reordering copy, no weighted temporaries, one torch call after the wait).

A dispatch or combine spins on the engine's events (``wait_spin_us``, on GPUs by
default) before it awaits the others' writes through the event loop.

Buffers are registered once and reused.  The receive slots are double-buffered by step
parity, and the dispatch imm carries the parity: a source starts step N+1 only after
every rank's combine of step N arrived, so it is at most one step ahead of any
receiver, and its writes for step N+1 go to the other half from the one a slow receiver
may still be reading (or sending back from) for step N.  (The same bound makes the
other parity's imm safe for rows written apart: no rank sends step N+1's headers before
step N is over everywhere, and step N-1's imms were all counted.)  The header's step tag checks
this on every step (``StepMismatch``).  A source with more rows for one rank than its
slot holds gets ``CapacityExceeded`` before anything is written or sent.  Within a step
only the imms of the writes to a rank gate it; the completions of its own writes are
awaited at its next ``dispatch`` (before the send and output buffers are reused), which
raises if one failed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._core import check, ffi, lib
from .descriptor import MrDescriptor
from .errors import AioteError, InvalidArgument
from .memory import host_buffer

if TYPE_CHECKING:
    import torch

    from .engine import TransferEngine

__all__ = ["ExpertParallel", "MoeBuffers", "CapacityExceeded", "StepMismatch"]

_HDR = 16  # header bytes: int32 step tag, row count, combine offset (rows), source rank
_TAG_MASK = 0x7FFFFFFF
_MAGIC = 0x4D6F0000  # "Mo" | source rank in the header's last word: a zeroed slot never passes
_APART = 0x8000  # header flag: the rows travel in a write of their own, with the other parity's imm


class CapacityExceeded(InvalidArgument):
    """A source has more rows for one rank than that rank's slot holds (``capacity``).

    Raised by ``dispatch`` before anything is written or sent: nothing is lost and the
    step counter doesn't move, so the caller can split the batch and dispatch again.
    ``dest`` is the rank, ``rows`` how many rows it would get, ``capacity`` the slot size.
    """

    def __init__(self, message: str, dest: int, rows: int, capacity: int):
        super().__init__(message)
        self.dest, self.rows, self.capacity = dest, rows, capacity


class StepMismatch(AioteError):
    """A dispatch header carries another step or source than expected: the ranks are out
    of step (a rank skipped or repeated a step, or two layers share an ``imm_base``)."""


@dataclass(frozen=True)
class MoeBuffers:
    """The descriptors a rank hands its peers (plain data: bytes, pickle)."""

    recv: MrDescriptor      # 2 (parity) x world slots of [ids | header | capacity rows] (GPU: rows only)
    combine: MrDescriptor   # outputs coming back, in this rank's packing order: [max_rows, hidden]
    meta: MrDescriptor | None = None  # GPU ranks: 2 x world host slots of [ids | header]



async def _settled_or_withdrawn(wait: asyncio.Future[None],
                                spin: Callable[[asyncio.Future[None]], None] | None = None) -> None:
    """Await an imm wait (``spin(wait)`` first, unless it is done); on any failure (timeout,
    cancellation) withdraw it, so a wait left armed can't eat the next step's imms."""
    try:
        if spin is not None and not wait.done():
            spin(wait)
        await wait
    except BaseException:
        wait.cancel()
        raise

class ExpertParallel:
    """Dispatch/combine for one rank (see the module docstring).

    ``max_tokens`` bounds the tokens of one step on this rank; ``top_k`` the experts
    per token.  ``capacity`` bounds the rows one source sends one rank in a step
    (default ``max_tokens * min(top_k, num_experts // world)``, which routing can't
    exceed); a smaller one saves memory (each rank holds ``2 * world`` slots of it) and
    makes a skewed step fail with ``CapacityExceeded``.  ``dtype`` is the hidden
    states' dtype.  ``device``: where the rows live (default host memory;
    ``"cuda:N"`` puts the rows on that GPU and moves them through the engine's GPU
    paths; the ids and headers stay in host memory).  ``timeout``: seconds a dispatch
    or combine waits for the other ranks' writes before it fails with ``ImmTimeout`` (a
    rank that died or stalled); ``None`` waits forever.  After a timeout the ranks are
    out of step: build a new ExpertParallel (with another ``imm_base``) rather than
    going on with this one.

    ``wait_spin_us``: how long a dispatch or combine spins on the engine's events (in C,
    the GIL released, this thread draining them) before it awaits the other ranks' writes
    through the event loop; the spin skips the worker → eventfd → loop wake-up, as a
    spinning host wait of NCCL's does.  Default: ``GPU_WAIT_SPIN_US`` for rows on a GPU
    (a step there is latency-bound), 0 (no spin) for host rows.  An attribute of the same
    name changes it later.
    """

    DISPATCH_IMM = 0x0E0000  # imm_base: dispatch (even steps); +1 combine; +2 dispatch (odd steps)
    COMBINE_IMM = 0x0E0001
    #: headers and ids in a host region of their own, the rows apart (always on GPUs; a
    #: subclass may set it for host rows too, which tests the GPU layout without a GPU)
    _SPLIT_META = False
    #: ``wait_spin_us``'s default for rows on a GPU
    GPU_WAIT_SPIN_US = 300

    def __init__(self, engine: TransferEngine, rank: int, world: int, num_experts: int, hidden: int,
                 max_tokens: int, top_k: int, dtype: Any = None, imm_base: int | None = None,
                 device: Any = None, capacity: int | None = None, timeout: float | None = None,
                 wait_spin_us: int | None = None):
        import torch

        if not 0 <= rank < world < _APART or num_experts % world or top_k < 1 or max_tokens < 1 or hidden < 1:
            raise InvalidArgument("need 0 <= rank < world < 32768, num_experts divisible by world, sizes >= 1")
        self.engine, self.rank, self.world = engine, rank, world
        self.num_experts, self.hidden, self.top_k = num_experts, hidden, top_k
        self.experts_per_rank = num_experts // world
        self.max_rows = max_tokens * top_k
        bound = max_tokens * min(top_k, self.experts_per_rank)
        if capacity is None:
            capacity = bound
        if not isinstance(capacity, int) or not 1 <= capacity <= self.max_rows:
            raise InvalidArgument(f"capacity must be an int in 1..{self.max_rows}, got {capacity!r}")
        self.capacity = cap = capacity
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise InvalidArgument(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        self.timeout = timeout
        if wait_spin_us is not None and (type(wait_spin_us) is not int or not 0 <= wait_spin_us <= 1_000_000):
            raise InvalidArgument(f"wait_spin_us must be an int in 0..1000000 (µs) or None, got {wait_spin_us!r}")
        self.dtype = dtype or torch.float32
        base = self.DISPATCH_IMM if imm_base is None else imm_base
        self._dispatch_imms = (base, base + 2)
        self._combine_imm = base + 1

        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        gpu = self._gpu = self.device.type == "cuda"
        self.wait_spin_us = (self.GPU_WAIT_SPIN_US if gpu else 0) if wait_spin_us is None else wait_spin_us
        self._spin_h: Any = None  # the engine's handle as the array aiote_spin takes
        split = self._split = gpu or self._SPLIT_META
        esize = torch.empty(0, dtype=self.dtype).element_size()
        rb = self._row_bytes = hidden * esize
        align = self._align = math.lcm(rb, _HDR)
        # a meta slot (split layout): [pad | ids (int32 x capacity) | header], in host memory
        self._mslot = -(-(_HDR + 4 * cap) // _HDR) * _HDR
        if split:  # a slot: capacity rows (the ids and header are in the meta slot)
            self._slot_hdr = 0
        else:  # a slot: [pad | ids (int32 x capacity) | header] ending on a row boundary, then the rows
            self._slot_hdr = -(-(_HDR + 4 * cap) // align) * align
        self._slot = self._slot_hdr + cap * rb
        # a parity's half of the receive buffer: world slots; split: then max_rows rows, where
        # dispatch gathers this rank's rows (own ones first, at the start of its own slot, the
        # rows for the other ranks behind them: one index_select for all, no send buffer)
        self._pstride = world * self._slot + (self.max_rows * rb if split else 0)

        def buf(nbytes: int, host: bool = False) -> torch.Tensor:
            if gpu and not host:
                return torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
            # huge-page host memory: shm's single-copy transfers run ~2x faster on it
            return torch.frombuffer(host_buffer(nbytes), dtype=torch.uint8)

        if not split:  # send: one [pad | ids | header | rows] segment per other rank, packed back to back
            self._send = buf(world * (self._slot_hdr + align) + self.max_rows * rb)
        # receive, out and combine buffers are one allocation (each a whole number of rows,
        # registered apart): the combine's reduction reads the rows that came back and this
        # rank's own outputs through one [rows, hidden] view of it (_all_rows)
        nrecv, nout = 2 * self._pstride, world * cap * rb
        self._rows = buf(nrecv + nout + self.max_rows * rb)
        self._recv = self._rows[:nrecv]
        self._out = self._rows[nrecv:nrecv + nout]          # expert outputs to send back, in receive order
        self._combine = self._rows[nrecv + nout:]           # outputs coming back, in this rank's packing order
        self._out_row0, self._combine_row0 = nrecv // rb, (nrecv + nout) // rb
        self._all_rows = self._rows.view(self.dtype).view(-1, hidden)
        if not split:
            self._send_rows, self._send_i32 = self._send.view(self.dtype).view(-1, hidden), self._send.view(torch.int32)
        self._recv_rows, self._recv_i32 = self._recv.view(self.dtype).view(-1, hidden), self._recv.view(torch.int32)
        self._out_rows = self._out.view(self.dtype).view(-1, hidden)
        self._combine_rows = self._combine.view(self.dtype).view(-1, hidden)
        # int32: the received rows' local expert ids, then the combine's row indices into
        # _all_rows for each (token, k) pair (two variants: own outputs sent from the receive
        # buffer, or from out_buffer), then the bags' offsets (k apart)
        m = self.max_rows
        ni = world * cap + 3 * m
        self._i32 = torch.zeros(ni, dtype=torch.int32, device=self.device)
        self._recv_ids = self._i32[:world * cap]
        self._bag_idx = (self._i32[world * cap:world * cap + m], self._i32[world * cap + m:world * cap + 2 * m])
        self._bag_off = self._i32[world * cap + 2 * m:]
        self._bag_views: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}  # per (tokens, src)
        # ids and headers are a few words: numpy views write and read them without torch's per-op cost
        if split:
            self._meta_send = buf(world * self._mslot, host=True)
            self._meta_recv = buf(2 * world * self._mslot, host=True)
            self._send_np = self._meta_send.view(torch.int32).numpy()
            self._recv_np = self._meta_recv.view(torch.int32).numpy()
        else:
            self._send_np = self._send_i32.numpy()
            self._recv_np = self._recv_i32.numpy()
        if gpu:
            # the routing is computed on the host; its indices go to the GPU in one pinned copy
            # each way (reused once the next dispatch has waited for the GPU: see _route)
            self._stage_idx = torch.empty(self.max_rows, dtype=torch.int64, pin_memory=True)
            self._stage_i32 = torch.empty(ni, dtype=torch.int32, pin_memory=True)
            self._idx_dev = torch.empty(self.max_rows, dtype=torch.int64, device=self.device)
            self._stage_idx_np = self._stage_idx.numpy()
            self._idx_views: dict[int, torch.Tensor] = {}  # _idx_dev[:n], made once per n
        i32 = (self._stage_i32 if gpu else self._i32).numpy()  # where the ids and indices are written
        self._ids_np = i32[:world * cap]
        self._bag_np = (i32[world * cap:world * cap + m], i32[world * cap + m:world * cap + 2 * m])
        i32[world * cap + 2 * m:] = np.arange(0, m * top_k, top_k, dtype=np.int32)[:m]
        if gpu:
            self._i32.copy_(self._stage_i32)
            # the step's small device-side copies (index uploads, the dispatch's move) go on
            # torch's current stream through one C call each (aiote_cuda_copy), not torch's copy_
            dev_i = self.device.index
            self._cu_ctx = engine._gpu_paths()._ctx(dev_i)
            raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
            self._cur_stream: Callable[[], int] = ((lambda: raw(dev_i)) if raw is not None
                                                   else (lambda: torch.cuda.current_stream(dev_i).cuda_stream))
            self._cps = ffi.new("aiote_copy[1]")
            self._idx_ptrs = (self._idx_dev.data_ptr(), self._stage_idx.data_ptr())
            self._i32_ptrs = (self._i32.data_ptr(), self._stage_i32.data_ptr(), self._i32.numel() * 4)
        self._arange = np.arange(m, dtype=np.int32)
        # where each other source's header sits in the receive meta words, per parity (read in one go)
        if split:
            h0s = [(p * world + 1) * self._mslot // 4 - 4 for p in (0, 1)]
            hstride = self._mslot // 4
        else:
            h0s = [(p * world * self._slot + self._slot_hdr) // 4 - 4 for p in (0, 1)]
            hstride = self._slot // 4
        self._hdr_idx = [(h0 + hstride * np.arange(world - 1)[:, None] + np.arange(4)).reshape(-1) for h0 in h0s]
        # routing tables by expert id: its destination (rotated: the next rank 0, this rank
        # world-1) and its local id
        e = np.arange(num_experts)
        self._dest_lut = ((e // self.experts_per_rank - (rank + 1)) % world).astype(np.int16)
        self._lid_lut = (e % self.experts_per_rank).astype(np.int32)
        # _route's outputs (its tokens: on GPUs the pinned staging of the index upload)
        self._order_np, self._lidout_np = np.empty(m, np.int64), np.empty(m, np.int32)
        self._counts_np = np.empty(world, np.int64)
        self._tok_np = self._stage_idx_np if gpu else np.empty(m, np.int64)
        self._route_c = tuple(ffi.from_buffer(t, a) for t, a in (
            ("int16_t[]", self._dest_lut), ("int32_t[]", self._lid_lut), ("int64_t[]", self._counts_np),
            ("int64_t[]", self._order_np), ("int32_t[]", self._lidout_np), ("int64_t[]", self._tok_np))
        ) + (ffi.new("uint64_t*"),)
        self._recv_ptr = self._recv.data_ptr()
        r = engine.register
        mine = [("recv", self._recv), ("out", self._out), ("combine", self._combine)]
        if split:
            mine += [("meta_send", self._meta_send), ("meta_recv", self._meta_recv)]
        else:
            mine.append(("send", self._send))
        self._mr = {name: r(t) for name, t in mine}
        self._peers: list[MoeBuffers] = []
        self._ipc: list[bool] = []  # per rank: reached over CUDA IPC (copies batched in one C call)
        self._step = 0
        self._last: dict[str, Any] | None = None  # what combine needs from the last dispatch
        self._pending: list = []  # this rank's writes not awaited yet (settled by the next dispatch)

    @property
    def out_buffer(self) -> torch.Tensor:
        """Registered memory for the expert outputs (``[world * capacity, hidden]``): an
        ``expert_fn`` that writes its n output rows into ``out_buffer[:n]`` and returns that
        view saves ``combine`` a copy."""
        return self._out_rows

    @property
    def buffers(self) -> MoeBuffers:
        """This rank's descriptors, for every peer's ``connect``."""
        meta = self._mr["meta_recv"].descriptor if self._split else None
        return MoeBuffers(self._mr["recv"].descriptor, self._mr["combine"].descriptor, meta)

    def connect(self, peers: Sequence[MoeBuffers]) -> None:
        """Every rank's buffers, indexed by rank (this rank's own included)."""
        if len(peers) != self.world:
            raise InvalidArgument(f"need {self.world} ranks' buffers, got {len(peers)}")
        if any((p.meta is not None) != self._split for p in peers):
            raise InvalidArgument("the ranks' buffers have different layouts: all ranks' rows on GPUs, or all "
                                  "in host memory")
        need, mneed = 2 * self._pstride, 2 * self.world * self._mslot
        if any(p.recv.length < need or (p.meta is not None and p.meta.length < mneed) for p in peers):
            raise InvalidArgument("a peer's receive buffer is smaller than this rank's: every rank needs the "
                                  "same world, hidden, dtype and capacity")
        self._peers = list(peers)
        self._ipc = [False] * self.world
        if self._gpu:
            gp, dev = self.engine._gpu_paths(), self.device.index
            self._ipc = [r != self.rank and gp.ipc_reachable(p.recv, dev) and gp.ipc_reachable(p.combine, dev)
                         for r, p in enumerate(peers)]
            # the IPC peers' batches, resolved once (in source order: rank + 1, rank + 2, ...)
            ipc_peers = [peers[r] for r in self.source_order()[:-1] if self._ipc[r]]
            self._dplan = self._cplan = None
            if ipc_peers:
                self._dplan = gp.batch_plan(dev, [p.recv for p in ipc_peers], self._mr["meta_send"],
                                            [p.meta for p in ipc_peers])
                self._cplan = gp.batch_plan(dev, [p.combine for p in ipc_peers], None,
                                            [p.combine for p in ipc_peers])
                self._imm_only = [(0, 0, 0)] * len(ipc_peers)

    def source_order(self) -> list[int]:
        """The order of the source groups in ``dispatch``'s rows: the next rank first,
        this rank's own rows last (``rank+1, rank+2, …, rank``, wrapping)."""
        return [(self.rank + 1 + j) % self.world for j in range(self.world)]

    # -- routing (host side) -----------------------------------------------------------

    def _route(self, topk_ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """(order, tok, lid, counts): the (token, k) pairs grouped by destination in
        ``source_order`` from this rank's view (the next rank first, its own last), the
        token and local expert id of each, and the count per group.  Computed on the host
        in one C pass: GPU ids are read back once (the step's one wait for the GPU).  The
        arrays are this object's buffers, valid until the next dispatch."""
        if self._gpu:
            # waiting for the GPU here (reading the ids back does) also means the last step's
            # GPU work is done: its copies out of the staging buffers, and its reads of the
            # combine buffer, which the peers write again once this step's rows reached them
            if topk_ids.device != self.device:
                import torch

                torch.cuda.current_stream(self.device).synchronize()
            f = topk_ids.cpu().numpy().reshape(-1)  # flattened by numpy: one torch call fewer
        else:
            f = topk_ids.reshape(-1).numpy()
        if f.dtype != np.int64:  # (C reads int64; a negative or too large id is out of range there)
            f = f.astype(np.int64)
        elif not f.flags.c_contiguous:
            f = np.ascontiguousarray(f)
        n, world, cap = f.size, self.world, self.capacity
        # one C pass (aiote_moe_route): the counts, the pairs grouped by rotated destination
        # (the next rank 0, this rank world-1), their local ids, and their tokens in the
        # order the rows are gathered (split: own first; on GPUs straight into the pinned
        # staging of the index upload, free again: the wait above)
        dest_c, lid_c, counts_c, order_c, lidout_c, tok_c, bad = self._route_c
        rc = lib.aiote_moe_route(ffi.from_buffer("int64_t[]", f), n, self.top_k, dest_c, lid_c, self.num_experts,
                                 world, world - 1 if self._split else 0, counts_c, order_c, lidout_c, tok_c, bad)
        if rc == -lib.AIOTE_E_INVAL:
            raise InvalidArgument(f"expert ids out of range (pair {int(bad[0])})")
        check(rc, "MoE routing")
        counts = self._counts_np.tolist()  # counts[j]: to rank (me + 1 + j) % world
        if max(counts) > cap:
            me = self.rank
            for dest in range(world):
                c = counts[(dest - me - 1) % world]
                if c > cap:
                    raise CapacityExceeded(f"{c} rows for rank {dest} exceed its slot for this rank "
                                           f"(capacity {cap})", dest, c, cap)
        return self._order_np[:n], self._tok_np[:n], self._lidout_np[:n], counts

    def _index_tensor(self, tok: np.ndarray) -> torch.Tensor:
        """tok (written by _route, in the order the rows are gathered) as a tensor on this
        rank's device (GPU: one copy from the pinned staging)."""
        import torch

        if not self._gpu:
            return torch.from_numpy(tok)
        n = tok.size
        self._dcopy(self._idx_ptrs[0], self._idx_ptrs[1], 8 * n)
        v = self._idx_views.get(n)
        if v is None:
            v = self._idx_views[n] = self._idx_dev[:n]
        return v

    def _dcopy(self, dst: int, src: int, n: int) -> None:
        """One copy of n bytes on torch's current stream (device or pinned addresses)."""
        c = self._cps[0]
        c.dst, c.src, c.len = dst, src, n
        check(lib.aiote_cuda_copy(self._cu_ctx, self._cur_stream(), self._cps, 1), "copy")

    # -- posting (in-slot headers: host rows) --------------------------------------------

    def _post_segment(self, hidden: torch.Tensor, tok: torch.Tensor, lid: np.ndarray, c: int, r: int, off: int,
                      start: int, tag: int, base: int, imm: int, waits: list) -> tuple[int, int]:
        """Pack [pad | ids | header | rows] for rank r at off in the send buffer and post it
        as one write; returns the next segment's offset and the next pair index."""
        import torch

        rb, align = self._row_bytes, self._align
        h = -(-(_HDR + 4 * c) // align) * align
        at = off + h  # rows start here
        hw = (at - _HDR) // 4  # the header's first word
        if c:
            self._send_np[hw - c:hw] = lid[start:start + c]
            torch.index_select(hidden, 0, tok[start:start + c], out=self._send_rows[at // rb:at // rb + c])
        self._send_np[hw:hw + 4] = (tag, c, start, _MAGIC | self.rank)
        slot = (self.rank - r - 1) % self.world  # the receiver's slot for this rank
        seg = _HDR + 4 * c
        waits.append(self.engine.scatter(self._mr["send"], [(self._peers[r].recv, at - seg,
                                                              base + slot * self._slot + self._slot_hdr - seg,
                                                              seg + c * rb)], imm=imm))
        return -(-(at + c * rb) // align) * align, start + c

    # -- posting (split: rows apart from their ids and headers) --------------------------

    def _post_split(self, hidden: torch.Tensor, tok: torch.Tensor, n: int, lid: np.ndarray, counts: list[int],
                    n_remote: int, tag: int, parity: int, imm: int, sent: list) -> None:
        """Gather this rank's rows (one index_select: ``tok`` has the own pairs first) to the
        start of its own slot, the rows for the other ranks behind them; write their ids and
        headers into the host meta buffer, and post them.  Ranks reached over CUDA IPC: one
        C call copies every such segment's rows into its receiver's GPU and then writes each
        receiver's [ids | header] with the imm.  The others: the rows go as writes of their
        own carrying the other parity's dispatch imm (the header says so: the receiver waits
        for those too), the headers with the imm.

        Where the rows land in the receiver's slot for this rank (slot j in its
        ``source_order``, d = world - 2 - j slots before its own): at the slot's end for even
        d, at its start for odd d, so the rows of slots d = 2i+2 and 2i+1 are contiguous, and
        those of d = 0 end where the receiver's own rows start: the receiver moves
        ``(world - 2) // 2`` runs of rows instead of ``world - 2`` (one at EP 4, none at EP 2)."""
        import torch

        me, world, rb, ms, cap = self.rank, self.world, self._row_bytes, self._mslot, self.capacity
        own_at = parity * self._pstride // rb + (world - 1) * cap  # rows: this rank's own slot
        if n:
            torch.index_select(hidden, 0, tok, out=self._recv_rows[own_at:own_at + n])
        sent_at = (own_at + n - n_remote) * rb  # bytes: the rows for the others, behind the own ones
        mn, ipc = self._send_np, self._ipc
        copies, ipc_metas, rows, metas = [], [], [], []
        start = 0
        for j in range(world - 1):
            r, c = (me + 1 + j) % world, counts[j]
            hw = (j + 1) * ms // 4 - 4  # the header's first word: the meta slot's last 16 bytes
            if c:
                mn[hw - c:hw] = lid[start:start + c]
            apart = _APART if c and not ipc[r] else 0
            mn[hw:hw + 4] = (tag, c, start, _MAGIC | apart | me)
            jr = (me - r - 1) % world  # the receiver's slot for this rank
            rslot = parity * world + jr
            seg = _HDR + 4 * c
            at = parity * self._pstride + jr * self._slot  # the slot's start; even d: its end
            if not (world - 2 - jr) % 2:
                at += (cap - c) * rb
            if ipc[r]:  # in the order of the batch plan's destinations (source order)
                copies.append((at, self._recv_ptr + sent_at + start * rb, c * rb))
                ipc_metas.append(((j + 1) * ms - seg, (rslot + 1) * ms - seg, seg))
            else:
                if c:
                    rows.append((self._peers[r].recv, sent_at + start * rb, at, c * rb))
                metas.append((self._peers[r].meta, (j + 1) * ms - seg, (rslot + 1) * ms - seg, seg))
            start += c
        eng = self.engine
        if rows:
            sent.append(eng.scatter(self._mr["recv"], rows, imm=self._dispatch_imms[1 - parity]))
        if ipc_metas:  # every IPC peer hears from us, with rows or without
            sent.append(self._dplan.submit(copies, ipc_metas, imm))
        if metas:
            sent.append(eng.scatter(self._mr["meta_send"], metas, imm=imm))

    # -- dispatch ----------------------------------------------------------------------

    async def dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  list[int]]:
        """Send each (token, k) to its expert's rank; return what this rank received:
        ``(rows, local_expert_ids, rows_per_source)``, rows contiguous and grouped by
        source in ``source_order()`` (own rows last), ``rows_per_source`` indexed by rank.

        ``rows`` and ``local_expert_ids`` are views of this rank's buffers: valid until
        this rank's ``combine`` returns (the step after next overwrites them)."""
        if topk_ids.dim() != 2 or hidden.dim() != 2:
            raise InvalidArgument("hidden must be [tokens, hidden] and topk_ids [tokens, top_k]")
        t, k = topk_ids.shape
        if t * k > self.max_rows or k != self.top_k or hidden.shape != (t, self.hidden):
            raise InvalidArgument(f"{t} tokens x top-{k} (hidden {tuple(hidden.shape)}) exceed this ExpertParallel")
        if hidden.dtype != self.dtype or hidden.device != self.device:
            raise InvalidArgument(f"hidden must be {self.dtype} on {self.device}, got {hidden.dtype} on "
                                  f"{hidden.device}")
        if not self._peers:
            raise InvalidArgument("connect() first")
        me, world, eng = self.rank, self.world, self.engine
        order_np, tok_np, lid, counts = self._route(topk_ids)  # CapacityExceeded: nothing sent
        await self.settle()  # the last step's writes out of the send and out buffers
        n_remote = sum(counts[:world - 1])
        tok = self._index_tensor(tok_np)
        step, self._step = self._step, self._step + 1
        tag, parity = step & _TAG_MASK, step % 2
        base = parity * self._pstride

        # 1. one segment per other rank (rows, ids, header) with the dispatch imm
        imm = self._dispatch_imms[parity]
        # our own writes' completions aren't awaited here: what this step returns only needs
        # the imms of the writes to us; the next dispatch settles them before reusing buffers
        arrived = None
        sent: list = []
        try:
            if self._split:
                self._post_split(hidden, tok, tok_np.size, lid, counts, n_remote, tag, parity, imm, sent)
            else:  # each posted as soon as it is packed (the transfer of one overlaps the next's packing)
                off = n_remote = 0
                for j in range(world - 1):
                    off, n_remote = self._post_segment(hidden, tok, lid, counts[j], (me + 1 + j) % world, off,
                                                       n_remote, tag, base, imm, sent)
            self._pending = sent
            if self._split:
                self._bag_before(order_np, n_remote, parity)
            if world > 1:  # armed after posting (counts are kept): the posts go out first
                arrived = eng.imms.wait(imm, world - 1, timeout=self.timeout)
                await _settled_or_withdrawn(arrived, self._spin)
        except BaseException:
            for w in [arrived, *sent]:  # a wait left armed would eat the next step's imms
                if w is not None:
                    w.cancel()
            self._pending = []
            raise

        # 2. the headers say how many rows each source sent (and whether they come apart)
        heads = self._headers(tag, parity)
        apart = sum(1 for _, c, _, a in heads if a)
        if apart:  # rows written apart from their headers: their own imms, the other parity's
            await _settled_or_withdrawn(
                eng.imms.wait(self._dispatch_imms[1 - parity], apart, timeout=self.timeout))
        # 3. make the rows and ids contiguous
        got, at_row, comb_off, total, row0 = self._assemble(heads, hidden, tok, lid, order_np, n_remote, parity)
        self._last = {"row0": row0, "got": got, "at_row": at_row, "shape": (t, k), "total": total,
                      "comb_off": comb_off}
        return self._recv_rows[row0:row0 + total], self._recv_ids[:total], got

    def _headers(self, tag: int, parity: int) -> list[tuple[int, int, int, bool]]:
        """Each other source's header (host memory), checked: (source, rows, its combine
        offset, rows written apart), in ``source_order``."""
        me, world = self.rank, self.world
        words = self._recv_np[self._hdr_idx[parity]].tolist()
        heads = []
        for j in range(world - 1):
            s = (me + 1 + j) % world
            h_tag, c, off, h_src = words[4 * j:4 * j + 4]
            if h_tag != tag or h_src & ~_APART != _MAGIC | s or not 0 <= c <= self.capacity:
                raise StepMismatch(f"dispatch header from slot {j} says step {h_tag}, source {h_src}, {c} rows; "
                                   f"expected step {tag} from rank {s} (source {_MAGIC | s:#x})")
            heads.append((s, c, off, bool(h_src & _APART)))
        return heads

    def _bag_before(self, order: np.ndarray, n_remote: int, parity: int) -> None:
        """Split layout: the combine's row indices that don't depend on what the others send
        (every row that comes back; this rank's own outputs in the receive buffer, which
        start where its own slot does), written while their rows are in flight."""
        ar, by_recv, by_out = self._arange, *self._bag_np
        if n_remote:
            back, at = order[:n_remote], ar[:n_remote] + self._combine_row0
            by_recv[back] = at
            by_out[back] = at
        own = order.size - n_remote
        if own:
            by_recv[order[n_remote:]] = ar[:own] + (parity * self._pstride // self._row_bytes
                                                    + (self.world - 1) * self.capacity)

    def _assemble(self, heads: list[tuple[int, int, int, bool]], hidden: torch.Tensor, tok: torch.Tensor,
                  lid: np.ndarray, order: np.ndarray, n_remote: int, parity: int
                  ) -> tuple[list[int], list[int], list[int], int, int]:
        """Make the received rows and ids contiguous (own rows last) and write the combine's
        row indices: (rows per source, where each source's rows start, each source's combine
        offset, total rows, the first row)."""
        import torch

        me, world, cap, rb = self.rank, self.world, self.capacity, self._row_bytes
        got, at_row, comb_off = [0] * world, [0] * world, [0] * world
        rows_t, heads_np = self._recv_rows, self._recv_np
        ids = self._ids_np  # GPU: the ids staging, free again (_route waited for the GPU)
        n = order.size
        own = n - n_remote
        if self._split:
            # own rows at the start of the last slot; the others' rows at their slot's end or
            # start (see _post_split): runs of them moved up behind each other, in front of them
            h0, hstride = (parity * world + 1) * self._mslot // 4 - 4, self._mslot // 4
            pbase = parity * self._pstride // rb
            own_at = pbase + (world - 1) * cap
            cs = [c for _, c, _, _ in heads]
            total = own + sum(cs)
            row0 = own_at - (total - own)
            pos = 0
            for j, (s, c, off, _) in enumerate(heads):
                got[s], at_row[s], comb_off[s] = c, pos, off
                if c:
                    hw = h0 + j * hstride
                    ids[pos:pos + c] = heads_np[hw - c:hw]
                pos += c
            if world > 2:
                end = own_at - cs[world - 2]  # slot d = 0 ends where the own rows start: in place
                j = world - 3
                while j >= 0:
                    if j:  # slots j - 1 (rows at its end) and j (at its start): one run
                        u, n_run = pbase + j * cap - cs[j - 1], cs[j - 1] + cs[j]
                        j -= 2
                    else:  # slot 0 alone, rows at its start
                        u, n_run = pbase, cs[0]
                        j = -1
                    end -= n_run
                    if n_run and u != end:
                        if end >= u + n_run and self._gpu:  # apart: one copy on torch's stream
                            self._dcopy(self._recv_ptr + end * rb, self._recv_ptr + u * rb, n_run * rb)
                            continue
                        src = rows_t[u:u + n_run]
                        if end < u + n_run:  # overlapping move
                            src = src.clone()
                        rows_t[end:end + n_run] = src
                assert end == row0
            pos = total - own
        else:
            slot_rows = self._slot // rb
            row0 = parity * world * slot_rows + self._slot_hdr // rb
            h0, hstride = (parity * world * self._slot + self._slot_hdr) // 4 - 4, self._slot // 4
            pos = 0
            for j, (s, c, off, _) in enumerate(heads):
                got[s], at_row[s], comb_off[s] = c, pos, off
                if c:
                    hw = h0 + j * hstride
                    ids[pos:pos + c] = heads_np[hw - c:hw]
                    u = row0 + j * slot_rows
                    if pos != j * slot_rows:
                        src = rows_t[u:u + c]
                        if row0 + pos + c > u:  # overlapping move
                            src = src.clone()
                        rows_t[row0 + pos:row0 + pos + c] = src
                pos += c
            total = pos + own
            if own:
                torch.index_select(hidden, 0, tok[n_remote:], out=rows_t[row0 + pos:row0 + total])
        got[me], at_row[me] = own, pos
        if own:
            ids[pos:total] = lid[n_remote:]
        # the combine reduces each token's top_k rows in one embedding_bag over _all_rows:
        # for the (token, k) pair that was packed i-th, the row that comes back (i < n_remote:
        # the combine buffer's row i) or its own output (in the receive buffer or out_buffer)
        # (split: written by _bag_before but for by_out's own rows, whose place depends on the counts)
        ar, by_recv, by_out = self._arange, *self._bag_np
        if n_remote and not self._split:
            back, at = order[:n_remote], ar[:n_remote] + self._combine_row0
            by_recv[back] = at
            by_out[back] = at
        if own:
            mine = order[n_remote:]
            if not self._split:
                by_recv[mine] = ar[:own] + (row0 + pos)
            by_out[mine] = ar[:own] + (self._out_row0 + pos)
        if self._gpu:  # whole (a few bytes a row): no slicing
            self._dcopy(*self._i32_ptrs)
        return got, at_row, comb_off, total, row0

    # -- combine -----------------------------------------------------------------------

    async def combine(self, outputs: torch.Tensor, rows_per_source: list[int], topk_weights: torch.Tensor
                      ) -> torch.Tensor:
        """Send the expert outputs (rows in ``dispatch``'s order) back to their sources
        and return this rank's reduced output: ``sum_k weight[t, k] * out(t, k)``."""
        import torch

        last = self._last
        if last is None:
            raise InvalidArgument("combine() needs a dispatch() first")
        me, world, eng, rb = self.rank, self.world, self.engine, self._row_bytes
        got, at_row, total = last["got"], last["at_row"], last["total"]
        if list(rows_per_source) != got:
            raise InvalidArgument("rows_per_source doesn't match the last dispatch")
        if outputs.shape != (total, self.hidden) or outputs.dtype != self.dtype:
            raise InvalidArgument(f"outputs must be [{total}, {self.hidden}] {self.dtype}, got "
                                  f"{tuple(outputs.shape)} {outputs.dtype}")
        t, k = last["shape"]
        if tuple(topk_weights.shape) != (t, k):
            raise InvalidArgument(f"topk_weights must be [{t}, {k}] like the last dispatch's topk_ids, got "
                                  f"{tuple(topk_weights.shape)}")
        # the outputs go out from registered memory: out_buffer, or the receive buffer itself
        # (an expert that works in place, or the identity); anything else is copied first
        row0 = last["row0"]
        if outputs.data_ptr() == self._recv.data_ptr() + row0 * rb and outputs.is_contiguous():
            src, src_rows, first = "recv", self._recv_rows, row0
        else:
            src, src_rows, first = "out", self._out_rows, 0
            if outputs.data_ptr() != self._out.data_ptr() or not outputs.is_contiguous():
                self._out_rows[:total] = outputs
        targets, copies = [], []
        base = src_rows.data_ptr()
        for j in range(world - 1):  # imm-only when empty: every source hears from every rank
            s = (me + 1 + j) % world
            d, so, do, nb = self._peers[s].combine, (first + at_row[s]) * rb, last["comb_off"][s] * rb, got[s] * rb
            if self._ipc[s]:  # in the order of the batch plan's destinations (source order)
                copies.append((do, base + so, nb))
            else:
                targets.append((d, so, do, nb))
        if copies:  # one C call: every copy, then an imm-only write to each of those sources
            self._pending.append(self._cplan.submit(copies, self._imm_only, self._combine_imm))
        if targets:
            self._pending.append(eng.scatter(self._mr[src], targets, imm=self._combine_imm))
        arrived = eng.imms.wait(self._combine_imm, world - 1, timeout=self.timeout) if world > 1 else None
        # out[t] = sum_k weight[t, k] * row(t, k), the rows read where they are (the combine
        # buffer for those that came back, this rank's own outputs in place): one embedding_bag
        # (no reordering copy, no weighted temporaries); its indices were written by dispatch
        w = topk_weights
        if w.dtype != self.dtype or w.device != self.device:
            w = w.to(device=self.device, dtype=self.dtype)
        # its arguments made before the wait: after it, one torch call
        key = (t, src == "out")
        bag = self._bag_views.get(key)
        if bag is None:
            bag = self._bag_views[key] = (self._bag_idx[key[1]][:t * k], self._bag_off[:t])
        w = w.reshape(-1)
        if arrived is not None:
            await _settled_or_withdrawn(arrived, self._spin)
        # (weight, indices, offsets, scale_grad_by_freq, mode 0 = sum, sparse, per_sample_weights,
        # include_last_offset, padding_idx: None, since -1 would mean the last row)
        return torch.embedding_bag(self._all_rows, bag[0], bag[1], False, 0, False, w, False, None)[0]

    def _spin(self, fut: asyncio.Future[None]) -> None:
        """Spin up to ``wait_spin_us`` on the engine's events, draining them here, until fut
        is done (the caller then awaits it: at once if it is done)."""
        budget = self.wait_spin_us * 1000
        if not budget:
            return
        eng = self.engine
        if eng._h is None or eng._closed:
            return
        if self._spin_h is None or self._spin_h[0] != eng._h:
            self._spin_h = ffi.new("aiote_engine*[]", [eng._h])
        h, now = self._spin_h, time.perf_counter_ns
        end = now() + budget
        while True:
            left = end - now()
            if left <= 0:
                return
            if lib.aiote_spin(h, 1, min(left, 50_000)):
                eng._drain()
                if eng._deferred:
                    eng._flush_deferred()
                if fut.done():
                    return

    async def settle(self) -> None:
        """Wait until this rank's own writes of the last dispatch and combine are complete.

        A step returns once the writes *to* this rank have landed; its own writes to the
        others are settled by the next ``dispatch``.  After the last step, ``await
        ep.settle()`` before closing the engine (or this object): a close cuts off writes
        still in flight (they fail EngineClosed) and the peers would wait for them.  Likewise
        before blocking the event loop between steps: a write to a peer reached through the
        staged GPU path (another host, ``cuda_ipc=False``) sends its commit from this loop,
        and the peer's step waits for it.  Raises what any of them failed with."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        eng = self.engine
        if not all(f.done() for f in pending) and eng._h is not None and not eng._closed:
            eng._drain()  # completions the loop hasn't read yet: no trip through it
        if all(f.done() for f in pending):  # the usual case: no trip through the event loop
            err: BaseException | None = None
            for f in pending:  # every outcome read (none left "never retrieved"), the first raised
                e = asyncio.CancelledError() if f.cancelled() else f.exception()
                err = err or e
            if err is not None:
                raise err
            return
        await asyncio.gather(*pending)

    async def step(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   expert_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """dispatch → ``expert_fn(rows, local_expert_ids)`` → combine."""
        rows, ids, per_src = await self.dispatch(hidden, topk_ids)
        return await self.combine(expert_fn(rows, ids), per_src, topk_weights)

    def close(self) -> None:
        for mr in self._mr.values():
            mr.close()
