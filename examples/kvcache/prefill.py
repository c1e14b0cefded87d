"""Prefill worker: computes a prompt layer by layer and writes each layer's KV
pages into the decode worker's pool while the next layer computes.

Per request (a "job" of the router)::

    for each layer:  compute (in a thread, so the event loop keeps serving
                     completions and heartbeats) -> copy K,V into staging pages
                     -> write_paged(K and V pages, imm=job's imm)
    first token   -> write 8 bytes into the decode worker's token slot, same imm
    all writes done -> "prefill_done" (bytes, transfer time, exposed time) to the router

The decode worker waits for ``2 * layers * pages + 1`` imms and then knows the
whole cache and the first token are in its memory.

One engine per decode peer ("link"): on shm a write to a SIGKILLed process
never completes, and enough of them pin every transmit context of an engine,
wedging writes to live peers too.  Confining each peer to its own engine
means a dead peer costs one engine, closed as soon as the router reports the
death (or a write times out).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import aiote

from .model import TinyLM
from .worker import WorkerBase

__all__ = ["PrefillWorker"]


@dataclass
class _Link:
    decode: tuple[bytes, ...]  # the peer's engine address (a worker that rejoins is a new peer)
    eng: aiote.TransferEngine
    kv_mr: aiote.MemoryRegion
    tok_mr: aiote.MemoryRegion
    closed: bool = False


@dataclass
class _Job:
    id: int
    prompt: list[int]
    decode: str
    kv_desc: aiote.MrDescriptor
    tok_desc: aiote.MrDescriptor
    pages: list[int]
    pool_pages: int
    imm: int
    tok_index: int
    aborted: bool = False
    slots: list[int] = field(default_factory=list)


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


class PrefillWorker(WorkerBase):
    role = "prefill"

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.model = TinyLM(self.s.model)
        n = self.s.prefill_slots
        self.staging = self.model.new_pool(n)  # [layers, 2, slots, tokens, heads, dim]
        self.staging_tok = torch.zeros(n, dtype=torch.int64)
        self.free_slots = list(range(n))
        self._slots_freed = asyncio.Event()
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.jobs: dict[int, _Job] = {}
        self.links: dict[tuple[bytes, ...], _Link] = {}
        self.dead_peers: set[tuple[bytes, ...]] = set()

    def capacity(self) -> int:
        return self.s.prefill_max_jobs

    def load(self) -> dict[str, Any]:
        return {"queued": len(self.jobs)}

    def busy(self) -> bool:
        return bool(self.jobs)

    def started(self) -> None:
        self.tg.start_soon(self._compute_loop)

    async def teardown(self) -> None:
        for peer in list(self.links):
            await self._close_link(peer, "shutdown")

    # -- messages -------------------------------------------------------------

    def on_prefill(self, msg: dict[str, Any]) -> None:
        job = _Job(id=msg["job"], prompt=msg["prompt"], decode=msg["decode"],
                   kv_desc=aiote.MrDescriptor.from_bytes(msg["kv_desc"]),
                   tok_desc=aiote.MrDescriptor.from_bytes(msg["tok_desc"]), pages=msg["pages"],
                   pool_pages=msg["pool_pages"], imm=msg["imm"], tok_index=msg["tok_index"])
        self.jobs[job.id] = job
        self.queue.put_nowait(job)

    def on_abort(self, msg: dict[str, Any]) -> None:
        job = self.jobs.get(msg["job"])
        if job is None:
            self.job_finished(msg["job"])  # never arrived, or already done
        else:
            job.aborted = True  # stops issuing after the current layer

    def on_peer_gone(self, msg: dict[str, Any]) -> None:
        """A decode worker died (its link's pending writes would never end) or left (the link is idle)."""
        peer = aiote.EngineAddress.from_bytes(msg["addr"]).addrs
        self.dead_peers.add(peer)
        self.tg.start_soon(self._close_link, peer, f"{msg['name']} {'died' if msg.get('dead') else 'left'}")

    # -- links ------------------------------------------------------------------

    def _link(self, job: _Job) -> _Link:
        peer = job.kv_desc.addrs
        link = self.links.get(peer)
        if link is None or link.closed:
            eng = aiote.TransferEngine(self.s.provider, host=self.s.host).open()
            link = _Link(peer, eng, eng.register(self.staging), eng.register(self.staging_tok))
            self.links[peer] = link
            self.log.info("link.open", decode=job.decode)
        return link

    async def _close_link(self, peer: tuple[bytes, ...], reason: str) -> None:
        link = self.links.pop(peer, None)
        if link is None or link.closed:
            return
        link.closed = True
        await link.eng.close()  # fails every pending write on it with EngineClosed
        self.log.info("link.closed", reason=reason)

    # -- the work -----------------------------------------------------------------

    async def _alloc_slots(self, n: int) -> list[int]:
        while len(self.free_slots) < n:
            self._slots_freed.clear()
            await self._slots_freed.wait()
        return [self.free_slots.pop() for _ in range(n)]

    def _free_slots(self, slots: list[int]) -> None:
        self.free_slots.extend(slots)
        self._slots_freed.set()

    def _layer(self, li: int, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        x, k, v = self.model.prefill_layer(li, x)
        self.staging[li, 0].index_copy_(0, slots, self.model.to_pages(k))
        self.staging[li, 1].index_copy_(0, slots, self.model.to_pages(v))
        return x

    async def _compute_loop(self) -> None:
        while True:
            job = await self.queue.get()
            if job.aborted or job.kv_desc.addrs in self.dead_peers:
                self._report_failed(job, "aborted before start")
                continue
            try:
                await self._prefill(job)
            except aiote.AioteError as e:  # e.g. the link closed under us
                self._report_failed(job, repr(e))
                if job.slots:
                    self._free_slots(job.slots)

    async def _prefill(self, job: _Job) -> None:
        cfg = self.s.model
        n_pages = cfg.pages_for(len(job.prompt))
        job.slots = await self._alloc_slots(n_pages)
        t0 = time.perf_counter()
        slots_t = torch.tensor(job.slots)
        link = self._link(job)
        S, P = self.s.prefill_slots, job.pool_pages
        futs: list[asyncio.Future[None]] = []
        spans: list[list[float]] = []

        def track(fut: asyncio.Future[None]) -> None:
            span = [time.perf_counter(), 0.0]
            spans.append(span)

            def done(f: asyncio.Future[None]) -> None:
                span[1] = time.perf_counter()
                if not f.cancelled():
                    f.exception()  # retrieved here; _finish looks at the outcome

            fut.add_done_callback(done)
            futs.append(fut)

        x = await asyncio.to_thread(self.model.embed, job.prompt)
        for li in range(cfg.n_layers):
            if job.aborted or link.closed:
                break
            x = await asyncio.to_thread(self._layer, li, x, slots_t)
            src = [(li * 2 + kv) * S + s for kv in (0, 1) for s in job.slots]
            dst = [(li * 2 + kv) * P + p for kv in (0, 1) for p in job.pages]
            # this layer's pages travel while the next layer computes
            track(link.eng.write_paged(link.kv_mr, job.kv_desc, cfg.page_bytes, src, dst, imm=job.imm))
        else:
            token = await asyncio.to_thread(self.model.first_token, x)
            self.staging_tok[job.slots[0]] = token
            track(link.eng.write(link.tok_mr, job.tok_desc, 8, src_offset=job.slots[0] * 8,
                                 dst_offset=job.tok_index * 8, imm=job.imm))
        t_compute = time.perf_counter()
        nbytes = 2 * cfg.n_layers * n_pages * cfg.page_bytes + 8
        self.tg.start_soon(self._finish, job, link, futs, spans, t0, t_compute, nbytes)

    async def _finish(self, job: _Job, link: _Link, futs: list[asyncio.Future[None]],
                      spans: list[list[float]], t0: float, t_compute: float, nbytes: int) -> None:
        error = None
        if len(futs) < self.s.model.n_layers + 1:  # stopped early: aborted, or the link closed
            error = "aborted" if job.aborted else "link closed"
        if futs:
            done, pending = await asyncio.wait(futs, timeout=self.s.write_timeout_s)
            if pending:
                error = f"{len(pending)} writes not complete after {self.s.write_timeout_s} s"
                await self._close_link(link.decode, "write timeout")  # also frees the staging pages
            for f in done:
                if error is None and (f.cancelled() or f.exception() is not None):
                    error = "cancelled" if f.cancelled() else repr(f.exception())
        self._free_slots(job.slots)
        if error is not None:
            self._report_failed(job, error)
            return
        busy = _union_length([(a, b) for a, b in spans])
        exposed = max(0.0, max(b for _, b in spans) - t_compute)
        self.ch.send(self.router, {"t": "prefill_done", "name": self.name, "job": job.id, "bytes": nbytes,
                                   "busy_s": busy, "exposed_s": min(exposed, busy),
                                   "compute_s": t_compute - t0, "tokens": len(job.prompt)})
        self.log.info("prefill.done", job=job.id, tokens=len(job.prompt), bytes=nbytes,
                      compute_s=round(t_compute - t0, 5), transfer_s=round(busy, 5),
                      exposed_s=round(exposed, 5))
        self.jobs.pop(job.id, None)
        self.job_finished(job.id)

    def _report_failed(self, job: _Job, reason: str) -> None:
        self.log.warning("prefill.failed", job=job.id, decode=job.decode, reason=reason)
        self.ch.send(self.router, {"t": "prefill_failed", "name": self.name, "job": job.id, "reason": reason})
        self.jobs.pop(job.id, None)
        self.job_finished(job.id)
