"""Run a whole service on this host: the router and workers as subprocesses,
meeting through a TCPStore that this process hosts, plus a client here.

Each process is launched exactly as an operator would launch one::

    python -m examples.kvcache worker --role decode --name decode-3 \\
        --store 127.0.0.1:PORT --prefix PREFIX --log-file LOG

so adding a worker mid-run is just starting one more of those.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import aiote

from .client import Client
from .logs import get_log
from .rendezvous import Rendezvous, Settings

__all__ = ["LocalCluster", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[2]


class LocalCluster:
    def __init__(self, settings: Settings, log_file: str):
        self.settings = settings
        self.log_file = log_file
        self.log = get_log().bind(role="cluster")
        self.rdv: Rendezvous | None = None
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.roles: dict[str, str] = {}
        self._counts: dict[str, int] = {}
        self.killed: set[str] = set()
        self.eng: aiote.TransferEngine | None = None
        self.client: Client
        self._stderr: Any = None
        self._closing = False
        self._router_watch: asyncio.Task[None] | None = None

    async def start(self, prefill: int, decode: int, timeout: float = 120) -> None:
        self.rdv = Rendezvous.host(f"aiote-kvcache/{uuid.uuid4().hex[:12]}")
        self.rdv.set("settings", self.settings.to_json())
        self._stderr = open(self.log_file, "ab", buffering=0)  # children's stray output, e.g. a traceback
        await self.spawn("router", name="router")
        s = self.settings
        self.eng = aiote.TransferEngine(s.provider, host=s.host).open()
        router = await self._unless_exits("router", self.rdv.get("router", timeout))
        self.client = Client(self.eng, router, self.log)
        await self.client.start()
        self._router_watch = asyncio.get_running_loop().create_task(self._watch_router())
        names = [await self.spawn("prefill") for _ in range(prefill)]
        names += [await self.spawn("decode") for _ in range(decode)]
        await asyncio.gather(*(self.joined(n, timeout) for n in names))

    async def spawn(self, role: str, name: str | None = None) -> str:
        """Start one process of ``role``; returns its name (it joins the router on its own)."""
        assert self.rdv is not None
        if name is None:
            self._counts[role] = self._counts.get(role, 0) + 1
            name = f"{role}-{self._counts[role]}"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "examples.kvcache", "worker", "--role", role, "--name", name,
            "--store", f"127.0.0.1:{self.rdv.port}", "--prefix", self.rdv.prefix, "--log-file", self.log_file,
            cwd=str(REPO_ROOT), env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=self._stderr)
        self.procs[name] = proc
        self.roles[name] = role
        self.log.info("cluster.spawn", name=name, pid=proc.pid)
        return name

    async def joined(self, name: str, timeout: float = 120) -> None:
        await self._unless_exits(
            name, self.client.wait_event(lambda e: e["kind"] == "joined" and e["name"] == name, timeout))

    async def _unless_exits(self, name: str, aw: Any) -> Any:
        """Await ``aw``, but fail at once if process ``name`` exits first (a crash at start-up)."""
        task = asyncio.ensure_future(aw)
        exited = asyncio.ensure_future(self.procs[name].wait())
        await asyncio.wait([task, exited], return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            raise RuntimeError(f"{name} exited with code {exited.result()} (see {self.log_file})")
        exited.cancel()
        return task.result()

    async def _watch_router(self) -> None:
        code = await self.procs["router"].wait()
        if not self._closing:  # every request in flight would otherwise wait for its timeout
            self.log.error("cluster.router_exited", code=code)
            self.client.fail_all(f"router exited with code {code}")

    async def add(self, role: str, timeout: float = 120) -> str:
        name = await self.spawn(role)
        await self.joined(name, timeout)
        return name

    def kill(self, name: str) -> None:
        """SIGKILL: a crash, as far as everyone else can tell."""
        self.log.info("cluster.kill", name=name)
        self.killed.add(name)
        self.procs[name].send_signal(signal.SIGKILL)

    async def retire(self, name: str, timeout: float = 120) -> None:
        """SIGTERM: the worker drains its requests and leaves."""
        self.log.info("cluster.retire", name=name)
        self.procs[name].send_signal(signal.SIGTERM)
        await self.client.wait_event(lambda e: e["kind"] in ("left", "died") and e["name"] == name, timeout)

    def live(self, role: str | None = None) -> list[str]:
        """Processes not killed and not exited (of ``role``)."""
        return [n for n, p in self.procs.items()
                if p.returncode is None and n not in self.killed and (role is None or self.roles[n] == role)]

    async def close(self, timeout: float = 20) -> None:
        self._closing = True
        try:
            if self.eng is not None and hasattr(self, "client") and "router" in self.live():
                await self.client.shutdown(timeout)
        except (TimeoutError, aiote.AioteError) as e:
            self.log.warning("cluster.shutdown_failed", error=repr(e))
        finally:
            waits = [asyncio.wait_for(p.wait(), timeout) for p in self.procs.values() if p.returncode is None]
            for r in await asyncio.gather(*waits, return_exceptions=True):
                if isinstance(r, BaseException):
                    self.log.warning("cluster.process_stuck", error=repr(r))
            for name, p in self.procs.items():
                if p.returncode is None:
                    self.log.warning("cluster.kill_leftover", name=name)
                    p.kill()
                    await p.wait()
            if self._router_watch is not None:
                self._router_watch.cancel()
            if hasattr(self, "client"):
                await self.client.close()
            if self.eng is not None:
                await self.eng.close()
            if self._stderr is not None:
                self._stderr.close()

    async def __aenter__(self) -> LocalCluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
