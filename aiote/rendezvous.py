"""Rendezvous: exchange engine addresses and descriptors through torch.distributed's ``TCPStore``.

Processes of one job need each other's engine addresses
(``TransferEngine.address``) and region descriptors (``MrDescriptor``)
before they can write to each other.  torchrun already runs a key-value
store for its ranks (``MASTER_ADDR:MASTER_PORT``); this module uses it, or
any store with torch's ``set`` / ``get`` / ``check`` methods
(``TCPStore``, ``FileStore``, ``HashStore``), so a multi-process or multi-host
program needs no hand-written exchange::

    group = aiote.rendezvous.from_env()          # under torchrun (blocking: connects the store)
    async with aiote.TransferEngine("efa") as eng:
        addrs = await group.exchange_addresses(eng)            # every rank's engine address
        descs = await group.exchange_descriptors("kv", mr.descriptor)

Store calls block, so they run in a thread executor and never hold up the
event loop; waiting for keys polls ``check`` with a short backoff (up to
20 ms), so an awaiting coroutine can be cancelled at once and leaves no
thread stuck in the store.

Keys: ``exchange(store, key, ...)`` writes ``{key}/{rank}``.  A key is for
one round: values stay in the store, so a second exchange under the same key
would read the first round's values.  :class:`Group` numbers its rounds
(``{prefix}/{key}/{round}/{rank}``), like collectives: every rank must make
the same calls in the same order.

torch is optional for aiote; it is imported only when a ``TCPStore`` is
created here (:func:`create_store`, :func:`from_env`).
"""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .descriptor import MrDescriptor
from .errors import AioteError, InvalidArgument

if TYPE_CHECKING:
    from .engine import TransferEngine

__all__ = [
    "Group",
    "RendezvousTimeout",
    "create_store",
    "from_env",
    "put",
    "get",
    "wait_keys",
    "exchange",
    "publish_engine",
    "peer_addresses",
    "exchange_addresses",
    "exchange_descriptors",
]

DEFAULT_TIMEOUT = 300.0
_POLL_FIRST = 0.0005
_POLL_MAX = 0.02


class RendezvousTimeout(AioteError, TimeoutError):
    """Keys did not appear in the store in time (``.missing`` names them)."""

    def __init__(self, message: str, missing: Sequence[str] = ()):
        super().__init__(message)
        self.missing = list(missing)


# ---------------------------------------------------------------- stores


def _tcpstore() -> Any:
    try:
        from torch.distributed import TCPStore
    except ImportError as e:  # torch missing, or built without distributed support
        raise ImportError(
            "aiote.rendezvous creates stores with torch.distributed.TCPStore, and torch is not installed "
            "(or lacks torch.distributed): pip install torch — or pass any store with set/get/check"
        ) from e
    return TCPStore


def create_store(host: str, port: int, *, is_master: bool, world_size: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> Any:
    """A ``torch.distributed.TCPStore``: ``is_master=True`` serves it on ``port`` (0: a free one,
    see ``store.port``); otherwise connect to ``host:port``, retrying until ``timeout``.

    Blocking: from a coroutine use ``await asyncio.to_thread(create_store, ...)``.
    """
    TCPStore = _tcpstore()
    return TCPStore(host, port, world_size=world_size, is_master=is_master, wait_for_workers=False,
                    timeout=datetime.timedelta(seconds=timeout))


# ---------------------------------------------------------------- primitives


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f"key must be a non-empty str, got {key!r}")
    return key


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise InvalidArgument(f"value must be bytes or str, got {type(value).__name__}")


async def _call(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def put(store: Any, key: str, value: bytes | str) -> None:
    """``store.set(key, value)``, off the event loop."""
    await _call(store.set, _check_key(key), _as_bytes(value))


async def wait_keys(store: Any, keys: Sequence[str], timeout: float | None = DEFAULT_TIMEOUT) -> None:
    """Wait until every key of ``keys`` is set (``RendezvousTimeout`` after ``timeout`` seconds)."""
    keys = list(keys)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    delay = _POLL_FIRST
    while True:
        if await _call(store.check, keys):
            return
        if deadline is not None and loop.time() >= deadline:
            missing = [k for k in keys if not await _call(store.check, [k])]
            if not missing:
                return
            raise RendezvousTimeout(f"{len(missing)} of {len(keys)} keys not set within {timeout:g} s: "
                                    f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}", missing)
        pause = delay if deadline is None else max(0.0, min(delay, deadline - loop.time()))
        await asyncio.sleep(pause)
        delay = min(delay * 2, _POLL_MAX)


async def get(store: Any, key: str, timeout: float | None = DEFAULT_TIMEOUT) -> bytes:
    """Wait until ``key`` is set, then return its value."""
    await wait_keys(store, [_check_key(key)], timeout)
    return bytes(await _call(store.get, key))


async def _get_many(store: Any, keys: list[str]) -> list[bytes]:
    multi = getattr(store, "multi_get", None)
    if multi is not None:
        try:
            return [bytes(v) for v in await _call(multi, keys)]
        except (AttributeError, NotImplementedError, RuntimeError):
            pass  # a store without the extended API
    return [bytes(await _call(store.get, k)) for k in keys]


def _check_group(rank: int, world_size: int) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise InvalidArgument(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise InvalidArgument(f"rank must be an int in 0..{world_size - 1}, got {rank!r}")


async def exchange(store: Any, key: str, value: bytes | str, rank: int, world_size: int,
                   timeout: float | None = DEFAULT_TIMEOUT) -> list[bytes]:
    """All-gather through the store: publish ``value`` as ``{key}/{rank}``, wait for every rank's,
    return them in rank order (this rank's included).

    Raises RendezvousTimeout naming the ranks that did not publish within ``timeout`` seconds.
    Each ``key`` is for one round (see the module's notes; :class:`Group` numbers rounds).
    """
    _check_key(key)
    _check_group(rank, world_size)
    await put(store, f"{key}/{rank}", value)
    keys = [f"{key}/{r}" for r in range(world_size)]
    try:
        await wait_keys(store, keys, timeout)
    except RendezvousTimeout as e:
        ranks = [keys.index(k) for k in e.missing]
        raise RendezvousTimeout(f"rendezvous {key!r}: ranks {ranks} of {world_size} did not publish "
                                f"within {timeout:g} s", e.missing) from None
    return await _get_many(store, keys)


# ---------------------------------------------------------------- engines and descriptors


async def publish_engine(store: Any, eng: TransferEngine, rank: int, key: str = "aiote/engine") -> None:
    """Publish ``eng.address`` as rank ``rank``'s (``{key}/{rank}``), for :func:`peer_addresses`."""
    await put(store, f"{_check_key(key)}/{rank}", eng.address)


async def peer_addresses(store: Any, world_size: int, key: str = "aiote/engine",
                         timeout: float | None = DEFAULT_TIMEOUT) -> list[bytes]:
    """Every rank's engine address (as published by :func:`publish_engine`), in rank order."""
    _check_group(0, world_size)
    keys = [f"{_check_key(key)}/{r}" for r in range(world_size)]
    await wait_keys(store, keys, timeout)
    return await _get_many(store, keys)


async def exchange_addresses(store: Any, eng: TransferEngine, rank: int, world_size: int,
                             key: str = "aiote/engine", timeout: float | None = DEFAULT_TIMEOUT) -> list[bytes]:
    """Publish this engine's address and return every rank's (``eng.send(addrs[r], ...)``)."""
    return await exchange(store, key, eng.address, rank, world_size, timeout)


async def exchange_descriptors(store: Any, key: str, descriptor: MrDescriptor, rank: int, world_size: int,
                               timeout: float | None = DEFAULT_TIMEOUT) -> list[MrDescriptor]:
    """Publish one region's descriptor and return every rank's, parsed and validated."""
    if not isinstance(descriptor, MrDescriptor):
        raise InvalidArgument(f"expected an MrDescriptor, got {type(descriptor).__name__}")
    raw = await exchange(store, key, descriptor.to_bytes(), rank, world_size, timeout)
    return [MrDescriptor.from_bytes(b) for b in raw]


# ---------------------------------------------------------------- groups


class Group:
    """A store, this process's rank, the group's size and a key prefix.

    Each method call is one round under its own keys
    (``{prefix}/{key}/{round}/{rank}``, the round counted per key), so the
    same key can be exchanged again; every rank must make the same calls in
    the same order.

    ``serving`` says that this process serves the store (rank 0 without
    torchrun's agent): it must outlive the others' use of it, so end with
    ``await group.leave()`` on every rank.
    """

    def __init__(self, store: Any, rank: int, world_size: int, prefix: str = "aiote",
                 timeout: float | None = DEFAULT_TIMEOUT, serving: bool = False):
        _check_group(rank, world_size)
        self.store = store
        self.serving = serving
        self.rank = rank
        self.world_size = world_size
        self.prefix = _check_key(prefix).rstrip("/")
        self.timeout = timeout
        self._rounds: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, world_size={self.world_size}, prefix={self.prefix!r})"

    def _round_key(self, key: str) -> str:
        _check_key(key)
        n = self._rounds.get(key, 0)
        self._rounds[key] = n + 1
        return f"{self.prefix}/{key}/{n}"

    async def exchange(self, key: str, value: bytes | str, timeout: float | None = None) -> list[bytes]:
        """All-gather ``value``: every rank's, in rank order."""
        return await exchange(self.store, self._round_key(key), value, self.rank, self.world_size,
                              self.timeout if timeout is None else timeout)

    async def exchange_addresses(self, eng: TransferEngine, timeout: float | None = None) -> list[bytes]:
        """Every rank's engine address, in rank order (this rank's is ``eng.address``)."""
        return await self.exchange("engine", eng.address, timeout)

    async def exchange_descriptors(self, key: str, descriptor: MrDescriptor,
                                   timeout: float | None = None) -> list[MrDescriptor]:
        """Every rank's descriptor for ``key``, in rank order."""
        if not isinstance(descriptor, MrDescriptor):
            raise InvalidArgument(f"expected an MrDescriptor, got {type(descriptor).__name__}")
        raw = await self.exchange(key, descriptor.to_bytes(), timeout)
        return [MrDescriptor.from_bytes(b) for b in raw]

    async def barrier(self, name: str = "barrier", timeout: float | None = None) -> None:
        """Return once every rank has reached this barrier."""
        await self.exchange(name, b"", timeout)

    async def leave(self, timeout: float | None = None) -> None:
        """Say this rank is done with the store; the rank that serves it waits for every rank's
        word before returning (so its exit can't cut the others off).  Needs the store's ``add``."""
        key = f"{self.prefix}/left"
        await _call(self.store.add, key, 1)
        if not self.serving:
            return
        loop = asyncio.get_running_loop()
        limit = self.timeout if timeout is None else timeout
        deadline = None if limit is None else loop.time() + limit
        delay = _POLL_FIRST
        while (n := await _call(self.store.add, key, 0)) < self.world_size:
            if deadline is not None and loop.time() >= deadline:
                raise RendezvousTimeout(f"leave: {self.world_size - n} of {self.world_size} ranks still "
                                        f"using the store after {limit:g} s", [key])
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)


def from_env(prefix: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
             env: dict[str, str] | None = None) -> Group:
    """The :class:`Group` of a torchrun-launched process: the store at ``MASTER_ADDR:MASTER_PORT``,
    ``RANK`` and ``WORLD_SIZE`` from the environment.

    Under torchrun's elastic agent (``TORCHELASTIC_USE_AGENT_STORE=True``) the agent serves the
    store; otherwise (the same variables set by hand, or another launcher) rank 0 serves it (then
    ``group.serving`` is True there: end every rank with ``await group.leave()``).  The
    default prefix holds the run id and restart count (``aiote/{TORCHELASTIC_RUN_ID}/{restart}``),
    so a restarted job never reads a previous attempt's keys.  Blocking (it connects the store):
    from a coroutine use ``await asyncio.to_thread(aiote.rendezvous.from_env)``.
    """
    env = os.environ if env is None else env
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if v not in env]
    if missing:
        raise InvalidArgument(f"from_env needs {', '.join(missing)} in the environment "
                              "(torchrun sets them; or set them by hand)")
    host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    _check_group(rank, world)
    agent = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    serving = rank == 0 and not agent
    store = create_store(host, port, is_master=serving, world_size=world, timeout=timeout)
    if prefix is None:
        prefix = f"aiote/{env.get('TORCHELASTIC_RUN_ID', 'manual')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return Group(store, rank, world, prefix, timeout, serving=serving)
