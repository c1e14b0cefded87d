"""Decode worker: owns a paged KV pool, receives prefilled caches by one-sided
writes, and decodes greedily, streaming each token to the router.

Per request::

    "alloc" -> take pages for prompt + new tokens and a free imm id
            -> "alloc_ok" with the pool's descriptors, page ids, imm
    imms.wait(imm, 2 * layers * prompt_pages + 1)   # every K/V page + the first token landed
    -> token 0 (written by prefill), then one decode step per token (batch 1,
       round-robin between requests) -> "tok" messages -> "done" -> free pages, imm

Reuse safety: a request that ends normally consumed exactly the imms sent
with its id, so the id and pages go back to the free lists at once (ids are
reused oldest-first).  An aborted request (its prefill died, or timed out)
may still have writes in flight: its pages and imm rest in quarantine for
``quarantine_s``, then any late arrivals of the imm are consumed, and only
then are both reused.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Any

import torch

import aiote

from .model import TinyLM
from .worker import WorkerBase

__all__ = ["DecodeWorker", "ImmIds"]


class ImmIds:
    """Per-worker imm ids (the ImmCounter belongs to this engine, so ids only need to be unique here)."""

    def __init__(self) -> None:
        self._next = 1
        self._free: collections.deque[int] = collections.deque()

    def get(self) -> int:
        if self._free:
            return self._free.popleft()
        if self._next > aiote.IMM_MAX:
            raise RuntimeError("imm ids exhausted")
        self._next += 1
        return self._next - 1

    def put(self, imm: int) -> None:
        self._free.append(imm)  # FIFO: an id rests as long as possible before reuse


@dataclass
class _Job:
    id: int
    n_prompt: int
    max_new: int
    pages: list[int]
    imm: int
    task: asyncio.Task[None] | None = None
    phase: str = "wait"  # wait -> decode -> done


class DecodeWorker(WorkerBase):
    role = "decode"

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.model = TinyLM(self.s.model)
        self.n_pages = self.s.decode_pages
        self.pool = self.model.new_pool(self.n_pages)
        self.tok = torch.zeros(self.n_pages, dtype=torch.int64)  # first-token slot, indexed by first page
        self.free_pages = list(range(self.n_pages))
        self.imms = ImmIds()
        self.jobs: dict[int, _Job] = {}
        self.quarantined = 0

    def setup(self) -> None:
        self.kv_mr = self.eng.register(self.pool)
        self.tok_mr = self.eng.register(self.tok)

    def capacity(self) -> int:
        return self.s.decode_max_active

    def load(self) -> dict[str, Any]:
        return {"active": len(self.jobs), "free_pages": len(self.free_pages), "quarantined": self.quarantined}

    def busy(self) -> bool:
        return bool(self.jobs)

    async def teardown(self) -> None:
        for job in list(self.jobs.values()):
            if job.task:
                job.task.cancel()

    # -- messages -----------------------------------------------------------------

    def on_alloc(self, msg: dict[str, Any]) -> None:
        cfg = self.s.model
        jid, n_prompt, max_new = msg["job"], msg["n_prompt"], msg["max_new"]
        need = cfg.pages_for(n_prompt + max_new - 1)
        if len(self.jobs) >= self.capacity() or need > len(self.free_pages):
            self.ch.send(self.router, {"t": "alloc_fail", "name": self.name, "job": jid,
                                       "free_pages": len(self.free_pages)})
            self.job_finished(jid)
            return
        pages = [self.free_pages.pop() for _ in range(need)]
        job = _Job(jid, n_prompt, max_new, pages, self.imms.get())
        self.jobs[jid] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job))
        self.ch.send(self.router, {
            "t": "alloc_ok", "name": self.name, "job": jid, "imm": job.imm,
            "kv_desc": self.kv_mr.descriptor.to_bytes(), "tok_desc": self.tok_mr.descriptor.to_bytes(),
            "pages": pages[: cfg.pages_for(n_prompt)], "pool_pages": self.n_pages, "tok_index": pages[0],
        })

    def on_abort(self, msg: dict[str, Any]) -> None:
        job = self.jobs.pop(msg["job"], None)
        if job is not None:
            if job.task:
                job.task.cancel()
            self.log.info("decode.abort", job=job.id, phase=job.phase)
            if job.phase == "wait":
                self._quarantine(job)
            else:
                self._release(job)
        self.job_finished(msg["job"])

    # -- the work -------------------------------------------------------------------

    async def _run(self, job: _Job) -> None:
        try:
            await self._serve(job)
        except asyncio.CancelledError:
            raise  # aborted: on_abort cleans up
        except Exception:  # noqa: BLE001 - report it; the router retries the request elsewhere
            self.log.exception("decode.failed", job=job.id)
            if self.jobs.pop(job.id, None) is not None:
                self._quarantine(job)
                self.ch.send(self.router, {"t": "failed", "name": self.name, "job": job.id,
                                           "reason": "error"})
                self.job_finished(job.id)

    async def _serve(self, job: _Job) -> None:
        cfg = self.s.model
        t0 = time.perf_counter()
        try:
            await self.eng.imms.wait(job.imm, cfg.kv_writes(job.n_prompt), timeout=self.s.kv_timeout_s)
        except aiote.ImmTimeout:
            self.log.warning("decode.kv_timeout", job=job.id)
            self.jobs.pop(job.id, None)
            self._quarantine(job)
            self.ch.send(self.router, {"t": "failed", "name": self.name, "job": job.id,
                                       "reason": "kv timeout"})
            self.job_finished(job.id)
            return
        job.phase = "decode"
        t_kv = time.perf_counter()
        pages = torch.tensor(job.pages)
        token = int(self.tok[job.pages[0]])  # the prefill's first token, landed with the same imm
        tokens = [token]
        self.ch.send(self.router, {"t": "tok", "name": self.name, "job": job.id, "i": 0, "tok": token})
        for i in range(1, job.max_new):
            await asyncio.sleep(0)  # one step per request in turn; messages get handled between steps
            token = self.model.decode_step(self.pool, pages, job.n_prompt + i - 1, token)
            tokens.append(token)
            self.ch.send(self.router, {"t": "tok", "name": self.name, "job": job.id, "i": i, "tok": token})
        job.phase = "done"
        t_end = time.perf_counter()
        self.ch.send(self.router, {"t": "done", "name": self.name, "job": job.id, "tokens": tokens})
        self.log.info("decode.done", job=job.id, imm=job.imm, pages=len(job.pages),
                      kv_wait_s=round(t_kv - t0, 5), decode_s=round(t_end - t_kv, 5))
        self.jobs.pop(job.id, None)
        self._release(job)
        self.job_finished(job.id)

    def _release(self, job: _Job) -> None:
        self.free_pages.extend(job.pages)
        self.imms.put(job.imm)

    def _quarantine(self, job: _Job) -> None:
        self.quarantined += 1

        async def rest() -> None:
            await asyncio.sleep(self.s.quarantine_s)
            late = self.eng.imms.pending(job.imm)
            if late:  # writes of the aborted attempt that landed after all: consume them
                await self.eng.imms.wait(job.imm, late)
            self.log.info("decode.quarantine_done", job=job.id, imm=job.imm, late_imms=late)
            self._release(job)

        self.tg.start_soon(rest)
