"""A client of the router, over aiote messages: submit prompts, receive token streams."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiote

from .protocol import Channel

__all__ = ["Client", "Completion", "RequestFailed"]


class RequestFailed(Exception):
    pass


@dataclass
class Completion:
    rid: int
    prompt_len: int
    tokens: list[int]
    t_submit: float
    t_first: float
    t_done: float
    decode: str
    prefill: str
    attempts: int
    streamed: list[int] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.t_first - self.t_submit


@dataclass
class _Pending:
    prompt_len: int
    max_new: int
    t_submit: float
    done: asyncio.Future[dict[str, Any]]
    on_token: Callable[[int, int, int, str], None] | None
    streamed: list[int] = field(default_factory=list)
    t_first: float = 0.0


class Client:
    def __init__(self, eng: aiote.TransferEngine, router: bytes, log: Any):
        self.eng = eng
        self.router = router
        self.log = log.bind(role="client")
        self.ch = Channel(eng, self.log)
        self._rids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._event_waiters: list[tuple[Callable[[dict[str, Any]], bool], asyncio.Future[Any]]] = []
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        self.workers: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 60) -> None:
        self._task = asyncio.get_running_loop().create_task(self._recv_loop())
        hello = {"t": "hello", "pid": os.getpid(), "host": socket.gethostname()}
        welcome = await self._call("welcome", hello, timeout)
        for w in welcome["workers"]:
            self.workers[w["name"]] = w

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        await self.ch.flush()

    def _call(self, reply: str, msg: dict[str, Any], timeout: float) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._replies[reply] = fut
        self.ch.send(self.router, {**msg, "addr": self.eng.address})
        return asyncio.wait_for(fut, timeout)

    async def generate(self, prompt: list[int], max_new: int, timeout: float = 300,
                       on_token: Callable[[int, int, int, str], None] | None = None) -> Completion:
        """Submit one request and wait for its whole answer.

        Tokens also stream to ``on_token(rid, index, token, decode_worker)`` as they arrive.
        """
        rid = next(self._rids)
        p = _Pending(len(prompt), max_new, time.perf_counter(), asyncio.get_running_loop().create_future(),
                     on_token)
        self._pending[rid] = p
        self.ch.send(self.router, {"t": "submit", "rid": rid, "prompt": list(prompt), "max_new": max_new,
                                   "addr": self.eng.address})
        try:
            end = await asyncio.wait_for(p.done, timeout)
        finally:
            self._pending.pop(rid, None)
        t_done = time.perf_counter()
        return Completion(rid, len(prompt), list(end["tokens"]), p.t_submit, p.t_first or t_done, t_done,
                          end["decode"], end["prefill"], end["attempts"], p.streamed)

    def fail_all(self, reason: str) -> None:
        """Fail every request and call in flight (the router is gone)."""
        for p in self._pending.values():
            if not p.done.done():
                p.done.set_exception(RequestFailed(reason))
        for f in self._replies.values():
            if not f.done():
                f.set_exception(RequestFailed(reason))

    async def stats(self, timeout: float = 30) -> dict[str, Any]:
        return await self._call("stats", {"t": "stats"}, timeout)

    def retire(self, name: str) -> None:
        """Ask the router to drain ``name`` (it leaves once its requests are done)."""
        self.ch.send(self.router, {"t": "retire", "name": name})

    async def shutdown(self, timeout: float = 30) -> None:
        """Stop the router and, through it, every worker."""
        await self._call("bye", {"t": "shutdown"}, timeout)

    async def wait_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        """The first event (past or future) matching ``pred``."""
        for e in self.events:
            if pred(e):
                return e
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._event_waiters.append((pred, fut))
        return await asyncio.wait_for(fut, timeout)

    async def _recv_loop(self) -> None:
        while True:
            msg, _ = await self.ch.recv()
            try:
                self._dispatch(msg)
            except Exception:  # noqa: BLE001 - a failing callback must not stop the stream
                self.log.exception("client.dispatch_failed", msg_type=msg["t"])

    def _dispatch(self, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "tok":
            p = self._pending.get(msg["rid"])
            if p is not None and msg["i"] == len(p.streamed):
                if not p.streamed:
                    p.t_first = time.perf_counter()
                p.streamed.append(msg["tok"])
                if p.on_token:
                    p.on_token(msg["rid"], msg["i"], msg["tok"], msg["decode"])
        elif t in ("end", "error"):
            p = self._pending.get(msg["rid"])
            if p is not None and not p.done.done():
                if t == "end":
                    p.done.set_result(msg)
                else:
                    p.done.set_exception(RequestFailed(msg["reason"]))
        elif t == "event":
            self._on_event(msg)
        else:
            fut = self._replies.pop(t, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _on_event(self, e: dict[str, Any]) -> None:
        self.events.append(e)
        if e["kind"] in ("joined", "draining", "left", "died"):
            self.workers[e["name"]] = {"name": e["name"], "role": e["role"], "state": e["kind"]}
        if self.on_event:
            self.on_event(e)
        keep = []
        for pred, fut in self._event_waiters:
            if fut.done():
                continue
            if pred(e):
                fut.set_result(e)
            else:
                keep.append((pred, fut))
        self._event_waiters = keep
