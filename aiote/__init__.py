"""aiote: asyncio-native one-sided RDMA WRITE with immediates, over libfabric."""

from . import rendezvous  # TCPStore exchange of addresses/descriptors (imports torch lazily)
from .counters import IMM_MAX, ImmCounter
from .descriptor import EngineAddress, MrDescriptor
from .engine import PeerGroup, TransferEngine
from .errors import (
    AioteError,
    DescriptorError,
    EngineClosed,
    ImmTimeout,
    InvalidArgument,
    MessageTooLarge,
    OutOfBounds,
    PeerUnreachable,
    ProviderError,
    QueueFull,
    RegionClosed,
    RegionInUse,
    RegistrationError,
    UpdateFailed,
    UpdateInProgress,
)
from .memory import MemoryRegion, host_buffer
from .topology import GpuInfo, NicDevice, NicInfo, Topology, nics, topology
from .watch import Prepared, Watcher

__version__ = "0.1.0"

__all__ = [
    "Prepared",
    "Watcher",
    "host_buffer",
    "TransferEngine",
    "PeerGroup",
    "MemoryRegion",
    "MrDescriptor",
    "EngineAddress",
    "ImmCounter",
    "IMM_MAX",
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
    "nics",
    "topology",
    "NicInfo",
    "NicDevice",
    "GpuInfo",
    "Topology",
    "rendezvous",
]
