"""Finding each other through torch.distributed's TCPStore.

Keys live under a per-run prefix::

    {prefix}/settings        JSON of Settings (the model and the service's knobs)
    {prefix}/router          the router's aiote engine address
    {prefix}/worker/{name}   each worker's engine address (for operators; the
                             router learns workers from their join messages)

Locally the demo hosts the store itself (``Rendezvous.host``).  Under
torchrun the elastic agent hosts it at MASTER_ADDR:MASTER_PORT
(TORCHELASTIC_USE_AGENT_STORE=True); without an agent rank 0 hosts it.
Stores and waits come from ``aiote.rendezvous`` (store calls run off the
event loop); this class only adds the demo's key prefix and settings.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import aiote.rendezvous

from .model import ModelConfig

__all__ = ["Settings", "Rendezvous"]


@dataclass(frozen=True)
class Settings:
    """Everything every process of one run must agree on."""

    provider: str = "shm"
    host: str | None = None  # bind address for tcp (None on shm)
    model: ModelConfig = field(default_factory=ModelConfig)
    decode_pages: int = 384  # KV pool of one decode worker, in pages (per layer, per K/V)
    decode_max_active: int = 8  # requests one decode worker decodes at once
    prefill_slots: int = 160  # staging pages of one prefill worker
    prefill_max_jobs: int = 2  # prefills the router queues on one worker
    heartbeat_s: float = 0.25
    dead_after_s: float = 5.0  # missing heartbeats for this long: the worker is dead
    kv_timeout_s: float = 30.0  # decode gives up waiting for a request's KV pages
    write_timeout_s: float = 20.0  # prefill gives up on its writes to a decode worker
    quarantine_s: float = 1.0  # an aborted request's pages and imm rest this long before reuse
    job_timeout_s: float = 90.0  # the router retries a request attempt that takes longer
    max_attempts: int = 4

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d)

    @classmethod
    def from_json(cls, s: str) -> Settings:
        d = json.loads(s)
        d["model"] = ModelConfig(**d["model"])
        return cls(**d)

    def with_(self, **kw: Any) -> Settings:
        return replace(self, **kw)


class Rendezvous:
    """A TCPStore and a key prefix."""

    def __init__(self, store: Any, prefix: str):
        self.store = store
        self.prefix = prefix.rstrip("/")

    @property
    def port(self) -> int:
        return int(self.store.port)

    @classmethod
    def host(cls, prefix: str, host: str = "127.0.0.1", port: int = 0) -> Rendezvous:
        """Host the store in this process (port 0: a free port)."""
        return cls(aiote.rendezvous.create_store(host, port, is_master=True, timeout=60), prefix)

    @classmethod
    def connect(cls, host: str, port: int, prefix: str, timeout: float = 60) -> Rendezvous:
        return cls(aiote.rendezvous.create_store(host, port, is_master=False, timeout=timeout), prefix)

    @classmethod
    def from_torchrun_env(cls, prefix: str | None = None) -> Rendezvous:
        """The store torchrun set up (or rank 0's, when launched by hand with the same variables)."""
        run = os.environ.get("TORCHELASTIC_RUN_ID", "manual")
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        group = aiote.rendezvous.from_env(prefix or f"aiote-kvcache/{run}/{restart}", timeout=120)
        return cls(group.store, group.prefix)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def set(self, name: str, value: bytes | str) -> None:
        self.store.set(self.key(name), value)

    def get_now(self, name: str) -> bytes | None:
        k = self.key(name)
        return self.store.get(k) if self.store.check([k]) else None

    async def get(self, name: str, timeout: float = 60) -> bytes:
        """Wait until ``name`` is set (without blocking the event loop); return it."""
        return await aiote.rendezvous.get(self.store, self.key(name), timeout)

    async def settings(self, timeout: float = 60) -> Settings:
        return Settings.from_json((await self.get("settings", timeout)).decode())
