"""The router: admits requests, places them, retries them, streams tokens back.

Placement of one request (one "job" per attempt)::

    least-loaded active decode worker  --"alloc"-->  pages + imm + descriptors
    least-loaded active prefill worker --"prefill"--> layer-by-layer write_paged into those pages
    decode worker --"tok"...--> router --"tok"...--> client;  --"done"--> "end" to the client

Every request runs in its own task of an anyio task group.  Workers join by
message at any time; a leaving worker is drained (no new jobs, the ones it has
finish); a dead worker (its pidfd fires when it is on this host, or its
heartbeats stop) fails the jobs that still needed it, and those requests run
again elsewhere.  Tokens a client already has are not sent twice: a retried
attempt is deterministic, so its first tokens are checked against them and
dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import anyio

import aiote

from .protocol import Channel, watch_pid
from .rendezvous import Rendezvous, Settings

__all__ = ["Router"]


class JobFailed(Exception):
    """This attempt of a request can't finish; the request is tried again."""


@dataclass
class _Worker:
    name: str
    role: str
    addr: bytes
    pid: int
    host: str
    capacity: int
    state: str = "active"  # active | draining | gone | dead
    jobs: set[int] = field(default_factory=set)
    last_seen: float = 0.0
    blocked: bool = False  # decode said it is out of pages: skip until one of its jobs ends
    silent: bool = False  # same host, alive, but no heartbeat for dead_after_s: no new jobs until heard
    pending_allocs: int = 0
    served: int = 0
    unwatch: Any = None
    load: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Request:
    rid: int
    client: bytes
    prompt: list[int]
    max_new: int
    delivered: list[int] = field(default_factory=list)
    attempts: int = 0
    job: int | None = None
    t_submit: float = 0.0


@dataclass
class _Job:
    id: int
    req: _Request
    reply: asyncio.Future[dict[str, Any]]
    outcome: asyncio.Future[dict[str, Any]]
    decode: str | None = None
    prefill: str | None = None
    phase: str = "alloc"  # alloc -> prefill -> decode -> done | failed
    allocated: bool = False
    ahead: dict[int, int] = field(default_factory=dict)  # tokens that overtook earlier ones


class Router:
    def __init__(self, settings: Settings, rdv: Rendezvous, log: Any):
        self.s = settings
        self.rdv = rdv
        self.log = log.bind(role="router")
        self.workers: dict[str, _Worker] = {}
        self.jobs: dict[int, _Job] = {}
        self.requests: dict[tuple[bytes, int], _Request] = {}
        self.clients: dict[bytes, Any] = {}  # client address -> pid unwatch function
        self._job_ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._hb_gap_logged: set[str] = set()
        self.tg: Any = None
        self.stats: dict[str, Any] = {
            "requests": 0, "completed": 0, "failed": 0, "retries": 0, "joined": 0, "left": 0, "died": 0,
            "kv_bytes": 0, "transfer_busy_s": 0.0, "transfer_exposed_s": 0.0, "prefill_compute_s": 0.0,
            "prefills": 0, "prefill_tokens": 0, "alloc_refused": 0, "served": {},
        }

    # -- main ----------------------------------------------------------------------

    async def run(self) -> None:
        s = self.s
        async with aiote.TransferEngine(s.provider, host=s.host) as eng:
            self.eng = eng
            self.ch = Channel(eng, self.log, per_peer=True, provider=s.provider, host=s.host)
            self.rdv.set("router", eng.address)
            self.log.info("router.start", provider=eng.provider)
            async with anyio.create_task_group() as tg:
                self.tg = tg
                tg.start_soon(self._recv_loop)
                tg.start_soon(self._monitor)
                await self._stop.wait()
                tg.cancel_scope.cancel()
            await self.ch.close()
        self.log.info("router.exit", **{k: v for k, v in self.stats.items() if k != "served"})

    def _notify(self) -> None:
        """Something that placement waits for changed (a worker or a job slot)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _recv_loop(self) -> None:
        while True:
            msg, sender = await self.ch.recv()
            handler = getattr(self, "on_" + str(msg["t"]), None)
            if handler is None:
                self.log.warning("router.unknown_message", msg_type=msg["t"])
                continue
            try:
                handler(msg, sender)
            except Exception:  # noqa: BLE001 - a bad message must not take the router down
                self.log.exception("router.handler_failed", msg_type=msg["t"])

    async def _monitor(self) -> None:
        """Heartbeats: a worker on another host silent for dead_after_s is dead.  On this host its
        pidfd reports its exit at once and exactly; silence there means slow, not dead (a loaded
        2-core box left live workers unheard for over 5 s), so it only gets no new jobs until it
        is heard again (a job stuck on it still ends by job_timeout_s)."""
        last = time.monotonic()
        while True:
            await anyio.sleep(self.s.heartbeat_s)
            now = time.monotonic()
            if now - last > self.s.heartbeat_s + 1.0:  # this loop itself did not run meanwhile
                self.log.warning("router.late_tick", seconds=round(now - last, 3))
            last = now
            for w in list(self.workers.values()):
                if w.state in ("active", "draining") and now - w.last_seen > self.s.dead_after_s:
                    if w.unwatch is None:
                        self._lost(w, f"no heartbeat for {now - w.last_seen:.1f} s")
                    elif not w.silent:
                        w.silent = True
                        self.log.warning("router.worker_silent", worker=w.name,
                                         seconds=round(now - w.last_seen, 3))

    # -- clients ---------------------------------------------------------------------

    def _event(self, kind: str, **kw: Any) -> None:
        self.log.info("router.event", kind=kind, **kw)
        for addr in self.clients:
            self.ch.send(addr, {"t": "event", "kind": kind, **kw})

    def _roster(self) -> list[dict[str, Any]]:
        return [{"name": w.name, "role": w.role, "state": w.state} for w in self.workers.values()]

    def on_hello(self, msg: dict[str, Any], sender: bytes) -> None:
        addr = msg["addr"]
        unwatch = None
        if msg.get("host") == socket.gethostname():
            unwatch = watch_pid(int(msg["pid"]), lambda: self._client_gone(addr))
        self.clients[addr] = unwatch
        self.ch.send(addr, {"t": "welcome", "pid": os.getpid(), "host": socket.gethostname(),
                            "workers": self._roster()})

    def _client_gone(self, addr: bytes) -> None:
        self.log.warning("router.client_gone")
        self.clients.pop(addr, None)
        self.tg.start_soon(self.ch.peer_gone, addr, True)
        if not self.clients:
            self._shutdown(None)

    def on_submit(self, msg: dict[str, Any], sender: bytes) -> None:
        req = _Request(msg["rid"], msg["addr"], list(msg["prompt"]), int(msg["max_new"]),
                       t_submit=time.monotonic())
        cfg = self.s.model
        n_total = len(req.prompt) + req.max_new - 1
        if not req.prompt or req.max_new < 1 or n_total > cfg.max_seq or \
                cfg.pages_for(n_total) > self.s.decode_pages:
            self.ch.send(req.client, {"t": "error", "rid": req.rid, "reason": "request too long or empty"})
            return
        self.stats["requests"] += 1
        self.requests[(req.client, req.rid)] = req
        self.tg.start_soon(self._serve, req)

    def on_stats(self, msg: dict[str, Any], sender: bytes) -> None:
        self.ch.send(msg["addr"], {"t": "stats", **self.stats, "workers": self._roster()})

    def on_retire(self, msg: dict[str, Any], sender: bytes) -> None:
        w = self.workers.get(msg["name"])
        if w is not None and w.state == "active":
            self.ch.send(w.addr, {"t": "drain"})

    def on_shutdown(self, msg: dict[str, Any], sender: bytes) -> None:
        self._shutdown(msg["addr"])

    def _shutdown(self, reply_to: bytes | None) -> None:
        async def stop() -> None:
            for w in self.workers.values():
                if w.state in ("active", "draining"):
                    self.ch.send(w.addr, {"t": "exit"})
            with anyio.move_on_after(10):
                while any(w.state in ("active", "draining") for w in self.workers.values()):
                    await self._changed.wait()
            if reply_to is not None:
                self.ch.send(reply_to, {"t": "bye"})
            await self.ch.flush()
            self._stop.set()

        self.tg.start_soon(stop)

    # -- workers -------------------------------------------------------------------------

    def on_join(self, msg: dict[str, Any], sender: bytes) -> None:
        old = self.workers.get(msg["name"])
        if old is not None and old.state in ("active", "draining"):
            self._lost(old, "rejoined")
        w = _Worker(msg["name"], msg["role"], msg["addr"], int(msg["pid"]), msg["host"], int(msg["capacity"]),
                    last_seen=time.monotonic())
        self.workers[w.name] = w
        if w.host == socket.gethostname():
            w.unwatch = watch_pid(w.pid, lambda: self._lost(w, "process exited"))
        self.stats["joined"] += 1
        self.ch.send(w.addr, {"t": "welcome", "pid": os.getpid(), "host": socket.gethostname()})
        self._event("joined", name=w.name, role=w.role)
        self._notify()

    def _worker(self, msg: dict[str, Any]) -> _Worker | None:
        w = self.workers.get(msg["name"])
        if w is None or w.state not in ("active", "draining"):
            return None
        w.last_seen = time.monotonic()
        if w.silent:  # heard again: it takes jobs again
            w.silent = False
            self.log.info("router.worker_heard", worker=w.name)
            self._notify()
        return w

    def on_hb(self, msg: dict[str, Any], sender: bytes) -> None:
        w = self.workers.get(msg["name"])
        if w is not None and time.monotonic() - w.last_seen > 1.0 and w.name not in self._hb_gap_logged:
            self.log.warning("router.hb_gap", worker=w.name, state=w.state,
                             seconds=round(time.monotonic() - w.last_seen, 3))
            if w.state not in ("active", "draining"):
                self._hb_gap_logged.add(w.name)  # once for a worker given up on
        w = self._worker(msg)
        if w is not None:
            w.load = {k: v for k, v in msg.items() if k not in ("t", "name")}
            if w.blocked:  # it refused for lack of pages: a heartbeat later, ask again
                w.blocked = False
                self._notify()

    def on_leaving(self, msg: dict[str, Any], sender: bytes) -> None:
        w = self._worker(msg)
        if w is None or w.state == "draining":
            return
        w.state = "draining"
        self._event("draining", name=w.name, role=w.role)
        self._notify()

        async def ack() -> None:
            while w.pending_allocs and w.state == "draining":  # their answers decide what it must finish
                await self._changed.wait()
            if w.state == "draining":
                self.ch.send(w.addr, {"t": "leave_ok", "jobs": sorted(w.jobs)})

        self.tg.start_soon(ack)

    def on_bye(self, msg: dict[str, Any], sender: bytes) -> None:
        w = self._worker(msg)
        if w is None:
            return
        w.state = "gone"
        if w.unwatch:
            w.unwatch()
        self.tg.start_soon(self.ch.peer_gone, w.addr, False)
        if w.role == "decode":
            self._tell_prefills({"t": "peer_gone", "name": w.name, "addr": w.addr})
        for jid in list(w.jobs):  # normally none: it drained
            self._fail_job(jid, w, "worker left")
        self.stats["left"] += 1
        self._event("left", name=w.name, role=w.role)
        self._notify()

    def _lost(self, w: _Worker, reason: str) -> None:
        if w.state not in ("active", "draining"):
            return
        w.state = "dead"
        if w.unwatch:
            w.unwatch()
        self.tg.start_soon(self.ch.peer_gone, w.addr, True)
        self.stats["died"] += 1
        self._event("died", name=w.name, role=w.role, reason=reason)
        if w.role == "decode":  # prefill workers close their link to it: its writes would never end (shm)
            self._tell_prefills({"t": "peer_gone", "name": w.name, "addr": w.addr, "dead": True})
        for jid in list(w.jobs):
            self._fail_job(jid, w, f"{w.role} {w.name} died")
        self._notify()

    def _tell_prefills(self, msg: dict[str, Any]) -> None:
        for p in self.workers.values():
            if p.role == "prefill" and p.state in ("active", "draining"):
                self.ch.send(p.addr, msg)

    def _fail_job(self, jid: int, w: _Worker, reason: str) -> None:
        w.jobs.discard(jid)
        job = self.jobs.get(jid)
        if job is None:
            return
        if w.role == "prefill" and job.phase != "prefill":
            return  # its KV already landed: the decode worker does not need it any more
        exc = JobFailed(reason)
        for f in (job.reply, job.outcome):
            if not f.done():
                f.set_exception(exc)

    # -- placement -----------------------------------------------------------------------

    async def _choose(self, role: str) -> _Worker:
        while True:
            cands = [w for w in self.workers.values()
                     if w.role == role and w.state == "active" and not w.blocked and not w.silent
                     and len(w.jobs) < w.capacity]
            if cands:
                return min(cands, key=lambda w: (len(w.jobs), w.served))
            await self._changed.wait()

    async def _serve(self, req: _Request) -> None:
        while req.attempts < self.s.max_attempts:
            req.attempts += 1
            job = _Job(next(self._job_ids), req, asyncio.get_running_loop().create_future(),
                       asyncio.get_running_loop().create_future())
            job.reply.add_done_callback(_retrieve)
            job.outcome.add_done_callback(_retrieve)
            self.jobs[job.id] = job
            req.job = job.id
            try:
                with anyio.fail_after(self.s.job_timeout_s):
                    done = await self._run_job(job)
            except (JobFailed, TimeoutError) as e:
                job.phase = "failed"
                self.stats["retries"] += 1
                self.log.warning("router.retry", rid=req.rid, job=job.id, reason=str(e) or "timeout")
                self._event("retry", rid=req.rid, job=job.id, reason=str(e) or "timeout")
                continue
            finally:
                self._end_job(job)
            job.phase = "done"
            self.stats["completed"] += 1
            self.log.info("request.done", rid=req.rid, job=job.id, decode=job.decode, prefill=job.prefill,
                          attempts=req.attempts, prompt=len(req.prompt), tokens=req.max_new,
                          seconds=round(time.monotonic() - req.t_submit, 4))
            self._deliver_all(job, done["tokens"])
            self.ch.send(req.client, {"t": "end", "rid": req.rid, "tokens": req.delivered,
                                      "decode": job.decode, "prefill": job.prefill, "attempts": req.attempts})
            self.requests.pop((req.client, req.rid), None)
            return
        self.stats["failed"] += 1
        self.ch.send(req.client, {"t": "error", "rid": req.rid,
                                  "reason": f"gave up after {req.attempts} attempts"})
        self.requests.pop((req.client, req.rid), None)

    async def _run_job(self, job: _Job) -> dict[str, Any]:
        req = job.req
        while True:
            dec = await self._choose("decode")
            job.decode = dec.name
            dec.jobs.add(job.id)
            dec.pending_allocs += 1
            self.ch.send(dec.addr, {"t": "alloc", "job": job.id, "n_prompt": len(req.prompt),
                                    "max_new": req.max_new})
            try:
                reply = await job.reply
            finally:
                dec.pending_allocs -= 1
                self._notify()
            if reply["t"] == "alloc_ok":
                break
            # out of pages: leave it alone until one of its requests ends
            self.stats["alloc_refused"] += 1
            dec.jobs.discard(job.id)
            dec.blocked = True
            job.reply = asyncio.get_running_loop().create_future()
            job.reply.add_done_callback(_retrieve)
        job.allocated = True
        pre = await self._choose("prefill")
        if dec.state != "active" and dec.state != "draining":
            raise JobFailed(f"decode {dec.name} gone while waiting for a prefill worker")
        job.prefill = pre.name
        job.phase = "prefill"
        pre.jobs.add(job.id)
        self.ch.send(pre.addr, {"t": "prefill", "job": job.id, "prompt": req.prompt, "decode": dec.name,
                                **{k: reply[k] for k in ("kv_desc", "tok_desc", "pages", "pool_pages", "imm",
                                                         "tok_index")}})
        return await job.outcome

    def _end_job(self, job: _Job) -> None:
        """Take the job off its workers; tell the live ones to drop a failed attempt."""
        self.jobs.pop(job.id, None)
        failed = job.phase == "failed"
        for name in (job.decode, job.prefill):
            w = self.workers.get(name) if name else None
            if w is None or job.id not in w.jobs:
                continue
            w.jobs.discard(job.id)
            if w.role == "decode":
                w.blocked = False
            if failed and w.state in ("active", "draining"):
                self.ch.send(w.addr, {"t": "abort", "job": job.id})
        self._notify()

    # -- job progress ------------------------------------------------------------------

    def _job(self, msg: dict[str, Any]) -> _Job | None:
        job = self.jobs.get(msg["job"])
        if job is None or job.req.job != job.id:
            return None  # a stale attempt
        return job

    def on_alloc_ok(self, msg: dict[str, Any], sender: bytes) -> None:
        self._worker(msg)
        job = self._job(msg)
        if job is None:  # the attempt ended meanwhile: give the pages back
            w = self.workers.get(msg["name"])
            if w is not None and w.state in ("active", "draining"):
                self.ch.send(w.addr, {"t": "abort", "job": msg["job"]})
            return
        if not job.reply.done():
            job.reply.set_result(msg)

    def on_alloc_fail(self, msg: dict[str, Any], sender: bytes) -> None:
        self._worker(msg)
        job = self._job(msg)
        if job is not None and not job.reply.done():
            job.reply.set_result(msg)

    def on_prefill_done(self, msg: dict[str, Any], sender: bytes) -> None:
        w = self._worker(msg)
        st = self.stats
        st["kv_bytes"] += msg["bytes"]
        st["transfer_busy_s"] += msg["busy_s"]
        st["transfer_exposed_s"] += msg["exposed_s"]
        st["prefill_compute_s"] += msg["compute_s"]
        st["prefill_tokens"] += msg["tokens"]
        st["prefills"] += 1
        job = self._job(msg)
        if w is not None:
            w.jobs.discard(msg["job"])
            w.served += 1
            self._notify()
        if job is not None and job.phase == "prefill":
            job.phase = "decode"

    def on_prefill_failed(self, msg: dict[str, Any], sender: bytes) -> None:
        self._worker(msg)
        job = self._job(msg)
        if job is not None and not job.outcome.done():
            job.outcome.set_exception(JobFailed(f"prefill failed: {msg['reason']}"))

    def on_failed(self, msg: dict[str, Any], sender: bytes) -> None:
        self._worker(msg)
        job = self._job(msg)
        if job is not None and not job.outcome.done():
            job.outcome.set_exception(JobFailed(f"decode failed: {msg['reason']}"))

    def on_tok(self, msg: dict[str, Any], sender: bytes) -> None:
        self._worker(msg)
        job = self._job(msg)
        if job is not None:
            self._deliver(job, int(msg["i"]), int(msg["tok"]))

    def on_done(self, msg: dict[str, Any], sender: bytes) -> None:
        w = self._worker(msg)
        job = self._job(msg)
        if w is not None:
            w.served += 1
            self.stats["served"][w.name] = self.stats["served"].get(w.name, 0) + 1
        if job is not None and not job.outcome.done():
            job.outcome.set_result(msg)

    def _deliver(self, job: _Job, i: int, tok: int) -> None:
        req = job.req
        if i < len(req.delivered):  # a retry re-deriving tokens the client already has
            if req.delivered[i] != tok:
                self.log.error("router.retry_diverged", rid=req.rid, i=i, had=req.delivered[i], got=tok)
            return
        job.ahead[i] = tok
        while len(req.delivered) in job.ahead:
            j = len(req.delivered)
            req.delivered.append(job.ahead.pop(j))
            self.ch.send(req.client, {"t": "tok", "rid": req.rid, "i": j, "tok": req.delivered[j],
                                      "decode": job.decode})

    def _deliver_all(self, job: _Job, tokens: list[int]) -> None:
        for i, t in enumerate(tokens):
            self._deliver(job, i, t)


def _retrieve(f: asyncio.Future[Any]) -> None:
    if not f.cancelled():
        f.exception()  # mark retrieved: a failed attempt nobody awaits is not an error to report
