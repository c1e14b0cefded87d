"""The exception hierarchy: every failure aiote reports is an AioteError."""

from __future__ import annotations

import asyncio

__all__ = [
    "AioteError",
    "ProviderError",
    "RegistrationError",
    "OutOfBounds",
    "DescriptorError",
    "PeerUnreachable",
    "EngineClosed",
    "RegionInUse",
    "RegionClosed",
    "MessageTooLarge",
    "ImmTimeout",
    "QueueFull",
    "InvalidArgument",
    "UpdateFailed",
    "UpdateInProgress",
]


class AioteError(Exception):
    """Base class of every aiote error."""


class ProviderError(AioteError):
    """A libfabric operation failed.

    ``fi_errno`` is libfabric's (positive) error number, ``index`` the
    failing element of a batch and ``nic`` the NIC it failed on (or None).
    """

    def __init__(self, message: str, fi_errno: int = 0, prov_errno: int = 0, index: int | None = None,
                 nic: int | None = None):
        super().__init__(message)
        self.fi_errno = fi_errno
        self.prov_errno = prov_errno
        self.index = index
        self.nic = nic


class RegistrationError(AioteError, TypeError):
    """A buffer can't be registered (wrong type, read-only, empty, not contiguous)."""


class OutOfBounds(AioteError, IndexError):
    """An offset/length falls outside a region; ``index`` names the batch element."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class DescriptorError(AioteError, ValueError):
    """Bytes that don't parse as a descriptor or address of this version."""


class PeerUnreachable(ProviderError):
    """The peer can't be reached (bad address, dead process, broken connection)."""


class EngineClosed(AioteError):
    """The engine was closed; pending operations fail with this."""


class RegionInUse(AioteError):
    """A region can't be deregistered while an operation uses it."""


class RegionClosed(AioteError):
    """The region was deregistered (or its engine closed)."""


class MessageTooLarge(AioteError, ValueError):
    """A send payload exceeds the engine's ``msg_size``."""


class ImmTimeout(AioteError, asyncio.TimeoutError):
    """``imms.wait`` ran past its timeout; no count was consumed."""


class InvalidArgument(AioteError, ValueError):
    """An argument is out of range or of the wrong kind (imm, count, offset, page list)."""


class QueueFull(AioteError):
    """Submission refused: ``max_deferred`` operations already wait for the engine.

    Nothing of the refused operation was queued or posted.  ``await engine.drain()``
    waits until the waiting operations have been handed to the engine.
    """


class UpdateFailed(AioteError):
    """A weight-update round failed (``aiote.weights``); the old weights stay in service.

    ``version`` is the round, ``peer`` the rank blamed (a trainer rank on the inference
    side, a receiver or trainer rank on the trainer side) or None; ``__cause__`` is the
    underlying error (PeerUnreachable, ImmTimeout, ...).
    """

    def __init__(self, message: str, version: int | None = None, peer: int | None = None):
        super().__init__(message)
        self.version = version
        self.peer = peer


class UpdateInProgress(AioteError):
    """A weight-update round was started while this rank's previous one is in flight: refused."""
