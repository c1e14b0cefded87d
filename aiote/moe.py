"""MoE dispatch/combine over counted one-sided writes.

Every rank owns ``num_experts / world`` experts.  Each step:

1. **dispatch** — a rank groups its (token, k) pairs by the rank that owns the chosen
   expert (torch index ops, no per-token Python) and packs, for every other rank, one
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
2. the receiver runs its experts on them (``expert_fn``);
3. **combine** — it writes each source's output rows straight back into the order
   that source packed them (the header said where; one write per source, imm-only when
   empty); a source awaits one from every other rank and reduces the rows with the
   routing weights.

Buffers are registered once and reused.  The receive slots are double-buffered by step
parity, and the dispatch imm carries the parity: a source starts step N+1 only after
every rank's combine of step N arrived, so it is at most one step ahead of any
receiver, and its writes for step N+1 go to the other half from the one a slow receiver
may still be reading (or sending back from) for step N.  The header's step tag checks
this on every step (``StepMismatch``).  A source with more rows for one rank than its
slot holds gets ``CapacityExceeded`` before anything is written or sent.  Within a step
only the imms of the writes to a rank gate it; the completions of its own writes are
awaited at its next ``dispatch`` (before the send and output buffers are reused), which
raises if one failed.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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

    recv: MrDescriptor      # 2 (parity) x world slots of [ids | header | capacity rows]
    combine: MrDescriptor   # outputs coming back, in this rank's packing order: [max_rows, hidden]


class ExpertParallel:
    """Dispatch/combine for one rank (see the module docstring).

    ``max_tokens`` bounds the tokens of one step on this rank; ``top_k`` the experts
    per token.  ``capacity`` bounds the rows one source sends one rank in a step
    (default ``max_tokens * min(top_k, num_experts // world)``, which routing can't
    exceed); a smaller one saves memory (each rank holds ``2 * world`` slots of it) and
    makes a skewed step fail with ``CapacityExceeded``.  ``dtype`` is the hidden
    states' dtype.  ``device``: where the rows live (default host memory;
    ``"cuda:N"`` puts every buffer on that GPU and moves them through the engine's GPU
    paths).  ``timeout``: seconds a dispatch or combine waits for the other ranks'
    writes before it fails with ``ImmTimeout`` (a rank that died or stalled); ``None``
    waits forever.  After a timeout the ranks are out of step: build a new
    ExpertParallel (with another ``imm_base``) rather than going on with this one.
    """

    DISPATCH_IMM = 0x0E0000  # imm_base: dispatch (even steps); +1 combine; +2 dispatch (odd steps)
    COMBINE_IMM = 0x0E0001

    def __init__(self, engine: TransferEngine, rank: int, world: int, num_experts: int, hidden: int,
                 max_tokens: int, top_k: int, dtype: Any = None, imm_base: int | None = None,
                 device: Any = None, capacity: int | None = None, timeout: float | None = None):
        import torch

        if not 0 <= rank < world or num_experts % world or top_k < 1 or max_tokens < 1 or hidden < 1:
            raise InvalidArgument("need 0 <= rank < world, num_experts divisible by world, sizes >= 1")
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
        self.dtype = dtype or torch.float32
        base = self.DISPATCH_IMM if imm_base is None else imm_base
        self._dispatch_imms = (base, base + 2)
        self._combine_imm = base + 1

        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        gpu = self.device.type == "cuda"
        esize = torch.empty(0, dtype=self.dtype).element_size()
        rb = self._row_bytes = hidden * esize
        align = self._align = math.lcm(rb, _HDR)
        # a slot: [pad | ids (int32 x capacity) | header] ending on a row boundary, then the rows
        self._slot_hdr = -(-(_HDR + 4 * cap) // align) * align
        self._slot = self._slot_hdr + cap * rb

        def buf(nbytes: int) -> torch.Tensor:
            if gpu:
                return torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
            # huge-page host memory: shm's single-copy transfers run ~2x faster on it
            return torch.frombuffer(host_buffer(nbytes), dtype=torch.uint8)

        # send: one [pad | ids | header | rows] segment per other rank, packed back to back
        self._send = buf(world * (self._slot_hdr + align) + self.max_rows * rb)
        self._recv = buf(2 * world * self._slot)
        self._out = buf(world * cap * rb)        # expert outputs to send back, in receive order
        self._combine = buf(self.max_rows * rb)  # outputs coming back, in this rank's packing order
        self._send_rows, self._send_i32 = self._send.view(self.dtype).view(-1, hidden), self._send.view(torch.int32)
        self._recv_rows, self._recv_i32 = self._recv.view(self.dtype).view(-1, hidden), self._recv.view(torch.int32)
        self._out_rows = self._out.view(self.dtype).view(-1, hidden)
        self._combine_rows = self._combine.view(self.dtype).view(-1, hidden)
        self._recv_ids = torch.zeros(world * cap, dtype=torch.int32, device=self.device)
        # headers are a few words: numpy views write and read them without torch's per-op cost
        self._send_np = None if gpu else self._send_i32.numpy()
        self._recv_np = None if gpu else self._recv_i32.numpy()
        r = engine.register
        self._mr = {name: r(t) for name, t in (("send", self._send), ("recv", self._recv), ("out", self._out),
                                               ("combine", self._combine))}
        self._peers: list[MoeBuffers] = []
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
        return MoeBuffers(self._mr["recv"].descriptor, self._mr["combine"].descriptor)

    def connect(self, peers: Sequence[MoeBuffers]) -> None:
        """Every rank's buffers, indexed by rank (this rank's own included)."""
        if len(peers) != self.world:
            raise InvalidArgument(f"need {self.world} ranks' buffers, got {len(peers)}")
        need = 2 * self.world * self._slot
        if any(p.recv.length < need for p in peers):
            raise InvalidArgument("a peer's receive buffer is smaller than this rank's: every rank needs the "
                                  "same world, hidden, dtype and capacity")
        self._peers = list(peers)

    def source_order(self) -> list[int]:
        """The order of the source groups in ``dispatch``'s rows: the next rank first,
        this rank's own rows last (``rank+1, rank+2, …, rank``, wrapping)."""
        return [(self.rank + 1 + j) % self.world for j in range(self.world)]

    def _put_header(self, at: int, words: tuple[int, int, int, int]) -> None:
        if self._send_np is not None:
            self._send_np[at:at + 4] = words
        else:
            import torch

            self._send_i32[at:at + 4] = torch.tensor(words, dtype=torch.int32, device=self.device)

    def _post_segment(self, hidden: torch.Tensor, tok: torch.Tensor, lid: torch.Tensor, c: int, r: int, off: int,
                      start: int, tag: int, base: int, imm: int, waits: list) -> tuple[int, int]:
        """Pack [pad | ids | header | rows] for rank r at off in the send buffer and post it
        as one write; returns the next segment's offset and the next pair index."""
        import torch

        rb, align = self._row_bytes, self._align
        h = -(-(_HDR + 4 * c) // align) * align
        at = off + h  # rows start here
        if c:
            self._send_i32[(at - _HDR) // 4 - c:(at - _HDR) // 4] = lid[start:start + c]
            torch.index_select(hidden, 0, tok[start:start + c], out=self._send_rows[at // rb:at // rb + c])
        self._put_header((at - _HDR) // 4, (tag, c, start, _MAGIC | self.rank))
        slot = (self.rank - r - 1) % self.world  # the receiver's slot for this rank
        seg = _HDR + 4 * c
        waits.append(self.engine.scatter(self._mr["send"], [(self._peers[r].recv, at - seg,
                                                              base + slot * self._slot + self._slot_hdr - seg,
                                                              seg + c * rb)], imm=imm))
        return -(-(at + c * rb) // align) * align, start + c

    # -- dispatch ----------------------------------------------------------------------

    async def dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  list[int]]:
        """Send each (token, k) to its expert's rank; return what this rank received:
        ``(rows, local_expert_ids, rows_per_source)``, rows contiguous and grouped by
        source in ``source_order()`` (own rows last), ``rows_per_source`` indexed by rank.

        ``rows`` and ``local_expert_ids`` are views of this rank's buffers: valid until
        this rank's ``combine`` returns (the step after next overwrites them)."""
        import torch

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
        me, world, eng, cap, rb = self.rank, self.world, self.engine, self.capacity, self._row_bytes
        epr = self.experts_per_rank
        flat = topk_ids.reshape(-1).to(device=self.device, dtype=torch.int64)
        n = flat.numel()
        if n:
            lo, hi = torch.aminmax(flat)
            if int(lo) < 0 or int(hi) >= self.num_experts:
                raise InvalidArgument("expert ids out of range")
        # destinations rotated so that the next rank comes first and this rank last
        rot = (flat // epr - (me + 1)) % world
        order = torch.argsort(rot, stable=True)
        counts = torch.bincount(rot, minlength=world).tolist()  # counts[j]: to rank (me + 1 + j) % world
        for dest in range(world):
            c = counts[(dest - me - 1) % world]
            if c > cap:
                raise CapacityExceeded(f"{c} rows for rank {dest} exceed its slot for this rank (capacity {cap})",
                                       dest, c, cap)
        await self.settle()  # the last step's writes out of the send and out buffers
        tok = order // k
        lid = (flat[order] % epr).to(torch.int32)
        step, self._step = self._step, self._step + 1
        tag, parity = step & _TAG_MASK, step % 2
        base = parity * world * self._slot

        # 1. one segment per other rank: [pad | ids | header | rows], each posted as one write
        #    as soon as it is packed (the transfer of one overlaps the packing of the next)
        imm = self._dispatch_imms[parity]
        # our own writes' completions aren't awaited here: what this step returns only needs
        # the imms of the writes to us; the next dispatch settles them before reusing buffers
        arrived = eng.imms.wait(imm, world - 1, timeout=self.timeout) if world > 1 else None
        sent: list = []
        off = start = 0
        try:
            for j in range(world - 1):
                off, start = self._post_segment(hidden, tok, lid, counts[j], (me + 1 + j) % world, off, start,
                                                tag, base, imm, sent)
            self._pending = sent
            if arrived is not None:
                await arrived
        except BaseException:
            for w in [arrived, *sent]:  # a wait left armed would eat the next step's imms
                if w is not None:
                    w.cancel()
            self._pending = []
            raise
        n_remote = start

        # 2. the headers say how many rows each source sent; make them contiguous
        slot_rows, hdr_rows = self._slot // rb, self._slot_hdr // rb
        row0 = base // rb + hdr_rows
        got = [0] * world
        at_row = [0] * world  # where each source's rows start, relative to row0
        rows_t, ids = self._recv_rows, self._recv_ids
        if world > 1:
            hw = self._slot_hdr // 4 - 4
            src_i32 = self._recv_np if self._recv_np is not None else self._recv_i32
            heads = src_i32[base // 4:base // 4 + (world - 1) * self._slot // 4].reshape(world - 1, -1)
            heads = heads[:, hw:hw + 4].tolist()
        pos = 0
        for j in range(world - 1):
            s = (me + 1 + j) % world
            h_tag, c, _, h_src = heads[j]
            if h_tag != tag or h_src != _MAGIC | s or not 0 <= c <= cap:
                raise StepMismatch(f"dispatch header from slot {j} says step {h_tag}, source {h_src}, {c} rows; "
                                   f"expected step {tag} from rank {s} (source {_MAGIC | s:#x})")
            got[s], at_row[s] = c, pos
            if c:
                u = row0 + j * slot_rows
                ib = (base + j * self._slot + self._slot_hdr - _HDR) // 4
                ids[pos:pos + c] = self._recv_i32[ib - c:ib]
                if pos != j * slot_rows:
                    src = rows_t[u:u + c]
                    if row0 + pos + c > u:  # overlapping move
                        src = src.clone()
                    rows_t[row0 + pos:row0 + pos + c] = src
            pos += c
        own = n - n_remote
        got[me], at_row[me] = own, pos
        if own:
            torch.index_select(hidden, 0, tok[n_remote:], out=rows_t[row0 + pos:row0 + pos + own])
            ids[pos:pos + own] = lid[n_remote:]
        total = pos + own
        self._last = {"row0": row0, "got": got, "at_row": at_row, "order": order, "tok": tok,
                      "n_remote": n_remote, "shape": (t, k), "total": total, "comb_off": [0] * world}
        # where each source packed the rows it sent us (its combine offset)
        for j in range(world - 1):
            s = (me + 1 + j) % world
            self._last["comb_off"][s] = heads[j][2]
        return rows_t[row0:row0 + total], ids[:total], got

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
        if outputs.data_ptr() == self._recv_rows[row0].data_ptr() and outputs.is_contiguous():
            src, src_rows, first = "recv", self._recv_rows, row0
        else:
            src, src_rows, first = "out", self._out_rows, 0
            if outputs.data_ptr() != self._out.data_ptr() or not outputs.is_contiguous():
                self._out_rows[:total] = outputs
        targets = []
        for j in range(world - 1):  # imm-only when empty: every source hears from every rank
            s = (me + 1 + j) % world
            targets.append((self._peers[s].combine, (first + at_row[s]) * rb, last["comb_off"][s] * rb,
                            got[s] * rb))
        arrived = None
        if targets:
            self._pending.append(eng.scatter(self._mr[src], targets, imm=self._combine_imm))
            arrived = eng.imms.wait(self._combine_imm, len(targets), timeout=self.timeout)
        # rows came back in the order this rank packed them; own rows reduce meanwhile
        order, tok, nr = last["order"], last["tok"], last["n_remote"]
        w = topk_weights.reshape(-1).to(self.device)[order].to(self.dtype).unsqueeze(1)
        out = torch.zeros(t, self.hidden, dtype=self.dtype, device=self.device)
        if got[me]:
            a = first + at_row[me]
            out.index_add_(0, tok[nr:], src_rows[a:a + got[me]] * w[nr:])
        if arrived is not None:
            try:
                await arrived
            except BaseException:
                arrived.cancel()
                raise
        if nr:
            out.index_add_(0, tok[:nr], self._combine_rows[:nr] * w[:nr])
        return out

    async def settle(self) -> None:
        """Wait until this rank's own writes of the last dispatch and combine are complete.

        A step returns once the writes *to* this rank have landed; its own writes to the
        others are settled by the next ``dispatch``.  After the last step, ``await
        ep.settle()`` before closing the engine (or this object): a close cuts off writes
        still in flight (they fail EngineClosed) and the peers would wait for them.
        Raises what any of them failed with."""
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)

    async def step(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   expert_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """dispatch → ``expert_fn(rows, local_expert_ids)`` → combine."""
        rows, ids, per_src = await self.dispatch(hidden, topk_ids)
        return await self.combine(expert_fn(rows, ids), per_src, topk_weights)

    def close(self) -> None:
        for mr in self._mr.values():
            mr.close()
