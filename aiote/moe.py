"""MoE dispatch/combine over counted one-sided writes.

Every rank owns ``num_experts / world`` experts.  Each step:

1. **counts** — a rank groups its (token, k) pairs by the rank that owns the chosen
   expert (torch index ops, no per-token Python) and writes its row counts to every
   rank (one small write each, carrying the counts imm).  Once ``world - 1`` have
   arrived every rank knows the whole count matrix: who sends how many rows to whom.
2. **dispatch** — from it each source computes where its rows go in each receiver's
   buffer (after the rows of lower source ranks), and writes rows and local expert
   ids there in one C batch each (rows for itself are copied locally).  A receiver
   awaits one rows write and one ids write per source that sends it anything: its
   rows are then contiguous, grouped by source, with no unpacking copy.
3. the receiver runs its experts on them (``expert_fn``);
4. **combine** — it writes each source's output rows straight back into the order
   that source packed them (one write per source, imm-only when empty); a source
   awaits one from every other rank and reduces the rows with the routing weights.

Buffers are registered once and reused every step.  A rank starts the next step's
counts only after every rank's combine arrived, and a rank combines only after it has
read its count matrix and its receive buffer: so reused buffers are never overwritten
while in use, without any extra synchronisation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .descriptor import MrDescriptor
from .errors import InvalidArgument
from .memory import host_buffer

if TYPE_CHECKING:
    import torch

    from .engine import TransferEngine

__all__ = ["ExpertParallel", "MoeBuffers"]


@dataclass(frozen=True)
class MoeBuffers:
    """The descriptors a rank hands its peers (plain data: bytes, pickle)."""

    recv: MrDescriptor      # rows from every source, contiguous by source: [world * max_rows, hidden]
    meta: MrDescriptor      # their local expert ids: [world * max_rows] int32
    counts: MrDescriptor    # the count matrix: [world, world] int64, row s written by source s
    combine: MrDescriptor   # outputs coming back, in this rank's packing order: [max_rows, hidden]


class ExpertParallel:
    """Dispatch/combine for one rank (see the module docstring).

    ``max_tokens`` bounds the tokens of one step on this rank; ``top_k`` the experts
    per token.  ``dtype`` is the hidden states' dtype.  ``device``: where the rows live
    (default host memory; ``"cuda:N"`` puts the row and id buffers on that GPU and moves
    them through the engine's GPU paths — the counts stay in host memory).
    """

    DISPATCH_IMM = 0x0E0000  # imm_base: dispatch; +1 combine; +2 counts
    COMBINE_IMM = 0x0E0001

    def __init__(self, engine: TransferEngine, rank: int, world: int, num_experts: int, hidden: int,
                 max_tokens: int, top_k: int, dtype: Any = None, imm_base: int | None = None,
                 device: Any = None):
        import torch

        if not 0 <= rank < world or num_experts % world or top_k < 1 or max_tokens < 1 or hidden < 1:
            raise InvalidArgument("need 0 <= rank < world, num_experts divisible by world, sizes >= 1")
        self.engine, self.rank, self.world = engine, rank, world
        self.num_experts, self.hidden, self.top_k = num_experts, hidden, top_k
        self.experts_per_rank = num_experts // world
        self.max_rows = max_tokens * top_k
        self.dtype = dtype or torch.float32
        base = self.DISPATCH_IMM if imm_base is None else imm_base
        self._dispatch_imm, self._combine_imm, self._counts_imm = base, base + 1, base + 2
        rows = self.max_rows

        self.device = torch.device(device) if device is not None else torch.device("cpu")
        gpu = self.device.type == "cuda"

        def buf(*shape: int, dtype: Any = self.dtype, host: bool = False) -> torch.Tensor:
            if gpu and not host:
                return torch.zeros(*shape, dtype=dtype, device=self.device)
            # huge-page host memory: shm's single-copy transfers run ~2x faster on it
            n = 1
            for d in shape:
                n *= d
            nbytes = n * torch.empty(0, dtype=dtype).element_size()
            return torch.frombuffer(host_buffer(nbytes), dtype=dtype).view(*shape)

        self._send = buf(rows, hidden)
        self._send_meta = buf(rows, dtype=torch.int32)
        self._send_counts = buf(world, dtype=torch.int64, host=True)
        self._matrix = buf(world, world, dtype=torch.int64, host=True)   # [source, receiver] rows
        self._recv = buf(world * rows, hidden)
        self._recv_meta = buf(world * rows, dtype=torch.int32)
        self._out = buf(world * rows, hidden)  # expert outputs to send back, in receive order
        self._combine = buf(rows, hidden)
        r = engine.register
        self._mr = {name: r(t) for name, t in (
            ("send", self._send), ("send_meta", self._send_meta), ("send_counts", self._send_counts),
            ("matrix", self._matrix), ("recv", self._recv), ("recv_meta", self._recv_meta),
            ("out", self._out), ("combine", self._combine))}
        self._row_bytes = hidden * self._send.element_size()
        self._peers: list[MoeBuffers] = []
        self._order: torch.Tensor | None = None  # packing order of the last dispatch
        self._m: list[list[int]] = []  # the last dispatch's count matrix

    @property
    def out_buffer(self) -> torch.Tensor:
        """Registered memory for the expert outputs (``[world * max_rows, hidden]``): an
        ``expert_fn`` that writes its n output rows into ``out_buffer[:n]`` and returns that
        view saves ``combine`` a copy."""
        return self._out

    @property
    def buffers(self) -> MoeBuffers:
        """This rank's descriptors, for every peer's ``connect``."""
        m = self._mr
        return MoeBuffers(m["recv"].descriptor, m["recv_meta"].descriptor, m["matrix"].descriptor,
                          m["combine"].descriptor)

    def connect(self, peers: Sequence[MoeBuffers]) -> None:
        """Every rank's buffers, indexed by rank (this rank's own included)."""
        if len(peers) != self.world:
            raise InvalidArgument(f"need {self.world} ranks' buffers, got {len(peers)}")
        self._peers = list(peers)

    # -- dispatch ----------------------------------------------------------------------

    async def dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  list[int]]:
        """Send each (token, k) to its expert's rank; return what this rank received:
        ``(rows, local_expert_ids, rows_per_source)``, rows grouped by source rank.

        ``rows`` and ``local_expert_ids`` are views of this rank's receive buffer: valid
        until this rank's ``combine`` returns (the next step overwrites them)."""
        import torch

        t, k = topk_ids.shape
        if t * k > self.max_rows or k != self.top_k or hidden.shape != (t, self.hidden):
            raise InvalidArgument(f"{t} tokens x top-{k} (hidden {tuple(hidden.shape)}) exceed this ExpertParallel")
        if not self._peers:
            raise InvalidArgument("connect() first")
        flat = topk_ids.reshape(-1).to(torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_experts):
            raise InvalidArgument("expert ids out of range")
        dest = flat // self.experts_per_rank
        order = torch.argsort(dest, stable=True)  # (token, k) pairs grouped by destination rank
        n = flat.numel()
        torch.index_select(hidden, 0, order // k, out=self._send[:n])
        self._send_meta[:n] = (flat[order] % self.experts_per_rank).to(torch.int32)
        self._send_counts.copy_(torch.bincount(dest, minlength=self.world))
        self._order = order
        me, world, eng = self.rank, self.world, self.engine

        # 1. counts: our row of everyone's count matrix
        self._matrix[me].copy_(self._send_counts)
        others = [r for r in range(world) if r != me]
        if others:
            cb = 8 * world
            await eng.scatter(self._mr["send_counts"], [(self._peers[r].counts, 0, me * cb, cb) for r in others],
                              imm=self._counts_imm)
            await eng.imms.wait(self._counts_imm, len(others))
        m = self._matrix.tolist()
        self._m = m

        # 2. rows and ids, each source's after those of lower ranks
        rb = self._row_bytes
        rows_t, meta_t = [], []
        start = 0
        for r in range(world):
            c = m[me][r]
            at = sum(m[s][r] for s in range(me))
            if c and r == me:
                self._recv[at:at + c] = self._send[start:start + c]
                self._recv_meta[at:at + c] = self._send_meta[start:start + c]
            elif c:
                rows_t.append((self._peers[r].recv, start * rb, at * rb, c * rb))
                meta_t.append((self._peers[r].meta, start * 4, at * 4, c * 4))
            start += c
        sent = []
        if rows_t:
            sent = [eng.scatter(self._mr["send"], rows_t, imm=self._dispatch_imm),
                    eng.scatter(self._mr["send_meta"], meta_t, imm=self._dispatch_imm)]
        expect = 2 * sum(1 for s in range(world) if s != me and m[s][me])
        if expect:
            sent.append(eng.imms.wait(self._dispatch_imm, expect))
        if sent:
            await asyncio.gather(*sent)
        got = [m[s][me] for s in range(world)]
        total = sum(got)
        return self._recv[:total], self._recv_meta[:total], got

    # -- combine -----------------------------------------------------------------------

    async def combine(self, outputs: torch.Tensor, rows_per_source: list[int], topk_weights: torch.Tensor
                      ) -> torch.Tensor:
        """Send the expert outputs (rows in ``dispatch``'s order) back to their sources
        and return this rank's reduced output: ``sum_k weight[t, k] * out(t, k)``."""
        import torch

        if self._order is None:
            raise InvalidArgument("combine() needs a dispatch() first")
        m, me, world, eng = self._m, self.rank, self.world, self.engine
        if list(rows_per_source) != [m[s][me] for s in range(world)]:
            raise InvalidArgument("rows_per_source doesn't match the last dispatch")
        total = sum(rows_per_source)
        if outputs.shape != (total, self.hidden):
            raise InvalidArgument(f"outputs must be [{total}, {self.hidden}], got {tuple(outputs.shape)}")
        # the outputs go out from registered memory: out_buffer, or the receive buffer itself
        # (an expert that works in place, or the identity); anything else is copied first
        src, src_t = "out", self._out
        if outputs.data_ptr() == self._recv.data_ptr() and outputs.is_contiguous():
            src, src_t = "recv", self._recv
        elif outputs.data_ptr() != self._out.data_ptr() or not outputs.is_contiguous():
            self._out[:total] = outputs
        rb = self._row_bytes
        targets = []
        start = 0
        for s in range(world):
            c = m[s][me]
            at = sum(m[s][r] for r in range(me))  # where source s packed the rows it sent us
            if s == me:
                self._combine[at:at + c] = src_t[start:start + c]
            else:  # imm-only when empty: every source hears from every rank (see the module notes)
                targets.append((self._peers[s].combine, start * rb, at * rb, c * rb))
            start += c
        waits = []
        if targets:
            waits.append(eng.scatter(self._mr[src], targets, imm=self._combine_imm))
            waits.append(eng.imms.wait(self._combine_imm, len(targets)))
        if waits:
            await asyncio.gather(*waits)
        # rows came back in the order this rank packed them
        n = self._order.numel()
        t, k = topk_weights.shape
        w = topk_weights.reshape(-1)[self._order].to(self.dtype).unsqueeze(1)
        out = torch.zeros(t, self.hidden, dtype=self.dtype, device=self.device)
        out.index_add_(0, self._order // k, self._combine[:n] * w)
        return out

    async def step(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   expert_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """dispatch → ``expert_fn(rows, local_expert_ids)`` → combine."""
        rows, ids, per_src = await self.dispatch(hidden, topk_ids)
        return await self.combine(expert_fn(rows, ids), per_src, topk_weights)

    def close(self) -> None:
        for mr in self._mr.values():
            mr.close()
