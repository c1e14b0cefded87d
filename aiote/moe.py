"""MoE dispatch/combine over counted one-sided writes.

Every rank owns ``num_experts / world`` experts.  Each step:

1. **dispatch** — a rank packs the hidden states of its (token, k) pairs by the
   rank that owns the chosen expert (torch index ops, no per-token Python) and
   writes, to every rank, in one C batch: its row count, the rows, and their
   local expert ids, each element carrying the dispatch imm.  A receiver awaits
   ``3 × world`` dispatch imms — then every source's count, rows and ids are there.
2. the receiver runs its experts on what it got (``expert_fn``);
3. **combine** — it writes each source's output rows back into that source's
   combine buffer (one write per source, imm-only when empty); a source awaits
   ``world`` combine imms and reduces the rows with the routing weights.

Buffers are registered once and reused every step.  A rank starts the next
dispatch only after every rank's combine arrived, and a rank combines only
after it has finished reading its receive buffer: so reused buffers are never
overwritten while in use, without any extra synchronisation.
"""

from __future__ import annotations

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

    recv: MrDescriptor      # rows from every source: [world, max_rows, hidden]
    meta: MrDescriptor      # their local expert ids: [world, max_rows] int32
    counts: MrDescriptor    # rows per source: [world] int64
    combine: MrDescriptor   # outputs coming back: [world, max_rows, hidden]


class ExpertParallel:
    """Dispatch/combine for one rank (see the module docstring).

    ``max_tokens`` bounds the tokens of one step on this rank; ``top_k`` the experts
    per token.  ``dtype`` is the hidden states' dtype (CPU tensors; GPU tensors go
    through the engine's GPU paths the same way).
    """

    DISPATCH_IMM = 0x0E0000
    COMBINE_IMM = 0x0E0001

    def __init__(self, engine: TransferEngine, rank: int, world: int, num_experts: int, hidden: int,
                 max_tokens: int, top_k: int, dtype: Any = None, imm_base: int | None = None):
        import torch

        if not 0 <= rank < world or num_experts % world or top_k < 1 or max_tokens < 1 or hidden < 1:
            raise InvalidArgument("need 0 <= rank < world, num_experts divisible by world, sizes >= 1")
        self.engine, self.rank, self.world = engine, rank, world
        self.num_experts, self.hidden, self.top_k = num_experts, hidden, top_k
        self.experts_per_rank = num_experts // world
        self.max_rows = max_tokens * top_k
        self.dtype = dtype or torch.float32
        base = self.DISPATCH_IMM if imm_base is None else imm_base
        self._dispatch_imm, self._combine_imm = base, base + 1
        rows = self.max_rows

        def buf(*shape: int, dtype: Any = self.dtype) -> torch.Tensor:
            # huge-page host memory: shm's single-copy transfers run ~2x faster on it
            n = 1
            for d in shape:
                n *= d
            nbytes = n * torch.empty(0, dtype=dtype).element_size()
            return torch.frombuffer(host_buffer(nbytes), dtype=dtype).view(*shape)

        self._send = buf(rows, hidden)
        self._send_meta = buf(rows, dtype=torch.int32)
        self._send_counts = buf(world, dtype=torch.int64)
        self._recv = buf(world, rows, hidden)
        self._recv_meta = buf(world, rows, dtype=torch.int32)
        self._recv_counts = buf(world, dtype=torch.int64)
        self._out = buf(world, rows, hidden)  # expert outputs to send back
        self._combine = buf(world, rows, hidden)
        r = engine.register
        self._mr = {name: r(t) for name, t in (
            ("send", self._send), ("send_meta", self._send_meta), ("send_counts", self._send_counts),
            ("recv", self._recv), ("recv_meta", self._recv_meta), ("recv_counts", self._recv_counts),
            ("out", self._out), ("combine", self._combine))}
        self._row_bytes = hidden * self._send.element_size()
        self._peers: list[MoeBuffers] = []
        self._order: torch.Tensor | None = None  # packing order of the last dispatch
        self._counts: list[int] = []

    @property
    def buffers(self) -> MoeBuffers:
        """This rank's descriptors, for every peer's ``connect``."""
        m = self._mr
        return MoeBuffers(m["recv"].descriptor, m["recv_meta"].descriptor, m["recv_counts"].descriptor,
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
        ``(rows, local_expert_ids, rows_per_source)`` (rows grouped by source rank)."""
        import torch

        t, k = topk_ids.shape
        if t * k > self.max_rows or k != self.top_k or hidden.shape != (t, self.hidden):
            raise InvalidArgument(f"{t} tokens x top-{k} (hidden {tuple(hidden.shape)}) exceed this ExpertParallel")
        flat = topk_ids.reshape(-1).to(torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_experts):
            raise InvalidArgument("expert ids out of range")
        dest = flat // self.experts_per_rank
        order = torch.argsort(dest, stable=True)  # (token, k) pairs grouped by destination rank
        n = flat.numel()
        self._send[:n] = hidden[order // k]
        self._send_meta[:n] = (flat[order] % self.experts_per_rank).to(torch.int32)
        counts = torch.bincount(dest, minlength=self.world)
        self._send_counts.copy_(counts)
        self._order, self._counts = order, counts.tolist()
        rb, meta_b = self._row_bytes, 4
        targets = []
        start = 0
        for r, c in enumerate(self._counts):
            p = self._peers[r]
            slot = self.rank * self.max_rows
            targets.append((p.counts, r * 8, self.rank * 8, 8))  # our count for r, into r's slot for us
            targets.append((p.recv, start * rb, slot * rb, c * rb))
            targets.append((p.meta, start * meta_b, slot * meta_b, c * meta_b))
            start += c
        await self._scatter3(targets, self._dispatch_imm)
        await self.engine.imms.wait(self._dispatch_imm, 3 * self.world)
        got = self._recv_counts.tolist()
        rows = torch.cat([self._recv[s, :got[s]] for s in range(self.world)])
        ids = torch.cat([self._recv_meta[s, :got[s]] for s in range(self.world)])
        return rows, ids, got

    async def _scatter3(self, targets: list[tuple[MrDescriptor, int, int, int]], imm: int) -> None:
        # three source regions, so three C batches; every element carries the imm
        import asyncio

        counts = [t for i, t in enumerate(targets) if i % 3 == 0]
        rows = [t for i, t in enumerate(targets) if i % 3 == 1]
        meta = [t for i, t in enumerate(targets) if i % 3 == 2]
        m = self._mr
        await asyncio.gather(self.engine.scatter(m["send_counts"], counts, imm=imm),
                             self.engine.scatter(m["send"], rows, imm=imm),
                             self.engine.scatter(m["send_meta"], meta, imm=imm))

    # -- combine -----------------------------------------------------------------------

    async def combine(self, outputs: torch.Tensor, rows_per_source: list[int], topk_weights: torch.Tensor
                      ) -> torch.Tensor:
        """Send the expert outputs (rows in ``dispatch``'s order) back to their sources
        and return this rank's reduced output: ``sum_k weight[t, k] * out(t, k)``."""
        import torch

        rb = self._row_bytes
        targets = []
        start = 0
        for s, c in enumerate(rows_per_source):
            self._out[s, :c] = outputs[start:start + c]
            targets.append((self._peers[s].combine, s * self.max_rows * rb, self.rank * self.max_rows * rb, c * rb))
            start += c
        await self.engine.scatter(self._mr["out"], targets, imm=self._combine_imm)
        await self.engine.imms.wait(self._combine_imm, self.world)
        # rows came back per destination rank, in the order this rank packed them
        assert self._order is not None
        n = self._order.numel()
        back = torch.cat([self._combine[r, :c] for r, c in enumerate(self._counts)]) if n else \
            torch.zeros(0, self.hidden, dtype=self.dtype)
        t, k = topk_weights.shape
        w = topk_weights.reshape(-1)[self._order].to(self.dtype).unsqueeze(1)
        out = torch.zeros(t, self.hidden, dtype=self.dtype)
        out.index_add_(0, self._order // k, back * w)
        return out

    async def step(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   expert_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """dispatch → ``expert_fn(rows, local_expert_ids)`` → combine."""
        rows, ids, per_src = await self.dispatch(hidden, topk_ids)
        return await self.combine(expert_fn(rows, ids), per_src, topk_weights)

    def close(self) -> None:
        for mr in self._mr.values():
            mr.close()
