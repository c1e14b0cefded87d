"""Test helpers for code that uses aiote, and a pytest plugin.

* :class:`PeerProcess` — a TransferEngine in another process, driven from
  async tests (``async with PeerProcess("shm") as peer: await peer.call(...)``).
* :func:`loopback_host` — the bind address of a provider on this host.
* :class:`Faults` — kill or pause a peer, take a NIC out of service.
* :mod:`aiote.testing.plugin` — pytest fixtures (``aiote_engine_pair``,
  ``aiote_peer``, ``aiote_faults``, ...), loaded automatically when aiote is
  installed; see docs/testing.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from ._peer import PeerProcess, RemoteError, loopback_host

if TYPE_CHECKING:
    from ..engine import TransferEngine

__all__ = ["PeerProcess", "RemoteError", "loopback_host", "EnginePair", "Faults", "PROVIDERS", "open_engine"]

#: The providers the fixtures run on by default: both exist on any Linux host with libfabric.
PROVIDERS = ("shm", "tcp")


class EnginePair(NamedTuple):
    """Two open engines of one process (``a, b = aiote_engine_pair``)."""

    a: TransferEngine
    b: TransferEngine


class Faults:
    """Fault injection for tests: a crashed or stalled peer, a failed NIC.

    The ``aiote_faults`` fixture gives one; paused peers are resumed when the
    test ends, whatever happened.
    """

    def __init__(self) -> None:
        self._paused: list[PeerProcess] = []

    def kill(self, peer: PeerProcess) -> None:
        """SIGKILL ``peer``: a crash, as its peers see it.  Its pending calls fail with RemoteError;
        writes and sends to it fail with PeerUnreachable (tcp: the provider reports it; shm: the
        engine sees the process exit; see docs/reliability.md)."""
        peer.kill()

    def pause(self, peer: PeerProcess) -> None:
        """SIGSTOP ``peer``: its engine stops progressing, writes to it stay in flight."""
        peer.pause()
        self._paused.append(peer)

    def resume(self, peer: PeerProcess) -> None:
        peer.resume()
        if peer in self._paused:
            self._paused.remove(peer)

    async def fail_nic(self, target: TransferEngine | PeerProcess, nic: int) -> None:
        """Take NIC ``nic`` of an engine (this process's, or a PeerProcess's) out of service:
        what is in flight on it fails with a ProviderError naming it (``.nic``); later work
        uses the engine's other NICs."""
        if isinstance(target, PeerProcess):
            await target.fail_nic(nic)
        else:
            target.fail_nic(nic)

    def _cleanup(self) -> None:
        for p in self._paused:
            p.resume()
        self._paused.clear()


async def open_engine(provider: str, **kwargs: Any) -> TransferEngine:
    """Open a TransferEngine on ``provider``, bound to loopback unless ``host=`` says otherwise."""
    from ..engine import TransferEngine

    kwargs.setdefault("host", loopback_host(provider))
    eng = TransferEngine(provider, **kwargs)
    return eng.open()
