"""What prefill and decode workers share: joining, heartbeats, draining, exit.

Life of a worker::

    start engine -> publish address in the store -> "join" to the router
    -> "welcome" (router's pid: if the router dies, we exit)
    -> heartbeats every Settings.heartbeat_s, role-specific work ...
    SIGTERM or "drain" -> "leaving" -> router stops routing to us and answers
    "leave_ok" with the jobs it gave us -> we finish those -> "bye" -> exit
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from typing import Any

import anyio

import aiote

from .protocol import Channel, watch_pid
from .rendezvous import Rendezvous, Settings

__all__ = ["WorkerBase"]


class WorkerBase:
    role = ""

    def __init__(self, name: str, settings: Settings, rdv: Rendezvous, log: Any):
        self.name = name
        self.s = settings
        self.rdv = rdv
        self.log = log.bind(worker=name, role=self.role)
        self.eng: aiote.TransferEngine
        self.ch: Channel
        self.router = b""
        self.tg: Any = None
        self.finished: set[int] = set()  # jobs this worker is done with (served, failed or aborted)
        self._exit = asyncio.Event()
        self._welcomed = asyncio.Event()
        self._leaving = False
        self._leave_jobs: set[int] | None = None
        self._unwatch: Any = None

    # -- for subclasses ----------------------------------------------------------

    def setup(self) -> None:
        """Register memory (the engine is open)."""

    async def teardown(self) -> None:
        """Release what setup() made, before the engine closes."""

    def busy(self) -> bool:
        return False

    def load(self) -> dict[str, Any]:
        return {}

    def capacity(self) -> int:
        return 1

    def started(self) -> None:
        """The task group (self.tg) is running: start background tasks."""

    def job_finished(self, job: int) -> None:
        self.finished.add(job)
        self.check_drained()

    # -- life cycle --------------------------------------------------------------

    async def run(self) -> None:
        s = self.s
        async with aiote.TransferEngine(s.provider, host=s.host) as eng:
            self.eng = eng
            self.ch = Channel(eng, self.log)
            self.setup()
            self.rdv.set(f"worker/{self.name}", eng.address)
            self.router = await self.rdv.get("router")
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, self.leave)
            self.ch.send(self.router, {"t": "join", "name": self.name, "role": self.role, "addr": eng.address,
                                       "pid": os.getpid(), "host": socket.gethostname(),
                                       "capacity": self.capacity(), **self.load()})
            self.log.info("worker.join", provider=eng.provider)
            try:
                async with anyio.create_task_group() as tg:
                    self.tg = tg
                    tg.start_soon(self._recv_loop)
                    tg.start_soon(self._heartbeat_loop)
                    self.started()
                    await self._exit.wait()
                    tg.cancel_scope.cancel()
            finally:
                loop.remove_signal_handler(signal.SIGTERM)
                if self._unwatch:
                    self._unwatch()
                await self.teardown()
                await self.ch.flush()
        self.log.info("worker.exit")

    def leave(self) -> None:
        """Graceful exit (SIGTERM or the router's "drain"): finish what we have, take nothing new."""
        if self._leaving:
            return
        self._leaving = True
        self.log.info("worker.leaving")
        self.ch.send(self.router, {"t": "leaving", "name": self.name})

    def check_drained(self) -> None:
        if self._leave_jobs is None or self._exit.is_set():
            return
        if self._leave_jobs <= self.finished and not self.busy():
            self.log.info("worker.drained")
            self.ch.send(self.router, {"t": "bye", "name": self.name})
            self._exit.set()

    async def _heartbeat_loop(self) -> None:
        try:
            with anyio.fail_after(60):
                await self._welcomed.wait()
        except TimeoutError:
            self.log.error("worker.no_welcome")
            self._exit.set()
            return
        while True:
            self.ch.send(self.router, {"t": "hb", "name": self.name, **self.load()})
            await anyio.sleep(self.s.heartbeat_s)

    async def _recv_loop(self) -> None:
        while True:
            msg, _sender = await self.ch.recv()
            handler = getattr(self, "on_" + str(msg["t"]), None)
            if handler is None:
                self.log.warning("worker.unknown_message", msg_type=msg["t"])
                continue
            try:
                handler(msg)
            except Exception:  # noqa: BLE001 - one bad message must not take the worker down
                self.log.exception("worker.handler_failed", msg_type=msg["t"])

    # -- messages every worker understands -------------------------------------------

    def on_welcome(self, msg: dict[str, Any]) -> None:
        self.log.info("worker.welcome")
        self._welcomed.set()
        if msg.get("host") == socket.gethostname():
            self._unwatch = watch_pid(int(msg["pid"]), self._router_gone)

    def _router_gone(self) -> None:
        self.log.error("worker.router_gone")
        self._exit.set()

    def on_drain(self, msg: dict[str, Any]) -> None:
        self.leave()

    def on_leave_ok(self, msg: dict[str, Any]) -> None:
        self._leave_jobs = set(msg["jobs"])
        self.log.info("worker.leave_ok", outstanding=len(self._leave_jobs - self.finished))
        self.check_drained()

        async def deadline() -> None:  # never hang in "draining"
            await anyio.sleep(self.s.job_timeout_s)
            if not self._exit.is_set():
                self.log.warning("worker.drain_timeout")
                self.ch.send(self.router, {"t": "bye", "name": self.name})
                self._exit.set()

        self.tg.start_soon(deadline)

    def on_exit(self, msg: dict[str, Any]) -> None:
        self.ch.send(self.router, {"t": "bye", "name": self.name})
        self._exit.set()
