"""MrDescriptor and engine addresses: versioned bytes that travel between peers.

Layout (version 1, little endian)::

    magic "AIOD" | version u8 | nnics u8 | reserved u16
    base u64 | length u64 | provider_len u8 | provider bytes
    nnics x (key u64 | addr_len u16 | addr bytes)

An engine address is the same without base/length/keys (magic "AIOA").
Version 2 descriptors (GPU regions) append one extension::

    ext_type u8 (1 = CUDA) | ext_len u16 | CudaExt (see there)

Parsing checks every length against the data: forged or truncated bytes raise
DescriptorError, never anything worse.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import DescriptorError

__all__ = ["MrDescriptor", "EngineAddress", "CudaExt"]

_VERSION = 1
_VERSION_EXT = 2
_MAX_NICS = 16
_MAX_ADDR = 256
_HDR = struct.Struct("<4sBBH")
_REGION = struct.Struct("<QQ")
_KEY = struct.Struct("<QH")
_ADDR = struct.Struct("<H")


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise DescriptorError(f"truncated: need {n} bytes at offset {self.pos}, have {len(self.data) - self.pos}")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.take(st.size))

    def done(self) -> None:
        if self.pos != len(self.data):
            raise DescriptorError(f"{len(self.data) - self.pos} unexpected trailing bytes")


def _header(data: object, magic: bytes) -> tuple[_Reader, int, int]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DescriptorError(f"expected bytes, got {type(data).__name__}")
    r = _Reader(bytes(data))
    m, version, nnics, _ = r.unpack(_HDR)
    if m != magic:
        raise DescriptorError(f"bad magic {m!r} (expected {magic!r})")
    if version != _VERSION and not (magic == b"AIOD" and version == _VERSION_EXT):
        raise DescriptorError(f"unsupported version {version} (this aiote reads {_VERSION}, {_VERSION_EXT})")
    if not 1 <= nnics <= _MAX_NICS:
        raise DescriptorError(f"bad NIC count {nnics}")
    return r, nnics, version


def _read_provider(r: _Reader) -> str:
    (n,) = r.unpack(struct.Struct("<B"))
    if n == 0:
        raise DescriptorError("empty provider name")
    try:
        return r.take(n).decode("ascii")
    except UnicodeDecodeError as e:
        raise DescriptorError("provider name is not ASCII") from e


def _read_addr(r: _Reader) -> bytes:
    (n,) = r.unpack(_ADDR)
    if not 1 <= n <= _MAX_ADDR:
        raise DescriptorError(f"bad address length {n}")
    return r.take(n)


def _check_common(provider: str, addrs: tuple[bytes, ...]) -> None:
    if not provider or len(provider) > 255 or not provider.isascii():
        raise DescriptorError(f"bad provider name {provider!r}")
    if not 1 <= len(addrs) <= _MAX_NICS:
        raise DescriptorError(f"bad NIC count {len(addrs)}")
    for a in addrs:
        if not isinstance(a, bytes) or not 1 <= len(a) <= _MAX_ADDR:
            raise DescriptorError("bad NIC address")


@dataclass(frozen=True)
class EngineAddress:
    """Where an engine can be reached: its provider and one address per NIC."""

    provider: str
    addrs: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_common(self.provider, self.addrs)

    def to_bytes(self) -> bytes:
        p = self.provider.encode()
        out = [_HDR.pack(b"AIOA", _VERSION, len(self.addrs), 0), bytes([len(p)]), p]
        for a in self.addrs:
            out += [_ADDR.pack(len(a)), a]
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> EngineAddress:
        r, nnics, _ = _header(data, b"AIOA")
        provider = _read_provider(r)
        addrs = tuple(_read_addr(r) for _ in range(nnics))
        r.done()
        return cls(provider, addrs)


_CUDA_EXT = struct.Struct("<BBHIQQ16s16s64s")
_CUDA_MODES = {1: "staged", 2: "direct", 3: "pooled"}


@dataclass(frozen=True)
class CudaExt:
    """What a peer needs to know of a GPU region.

    ``mode``: ``"staged"`` — the NIC keys address a pinned host mirror of the
    region; bytes written there reach the GPU when the owner copies them after a
    commit message (the writer sends it); ``"pooled"`` — staged too, but the
    region has no mirror (the owner's mirror budget was spent): writes reach it
    through bounce slots its owner grants (aiote/staging.py), the keys name a
    stand-in that only imm-only writes reach; ``"direct"`` — the keys address
    the GPU memory itself (GPUDirect).  A writer must use the protocol the
    mode names; aiote versions without ``"pooled"`` refuse such a descriptor.
    ``token`` names the region in commit messages (random 64-bit, as secret as
    a key).  ``host``, ``pid``, ``device_uuid``,
    ``ipc_handle`` (all zero if none) and ``ipc_offset`` let a process on the
    same host map the memory with CUDA IPC instead.  ``ipc_kind`` says what
    ``ipc_handle`` holds: 0 a legacy ``cuIpcGetMemHandle`` handle (``cudaMalloc``
    memory), 1 where to fetch the VMM shareable handles of the memory (torch's
    ``expandable_segments``; aiote.cuda.vmm_export), in the reserved u16 of the
    block (0 in descriptors of earlier aiote versions).
    """

    mode: str
    device: int
    token: int
    host: bytes
    pid: int
    device_uuid: bytes
    ipc_handle: bytes
    ipc_offset: int
    ipc_kind: int = 0  # 0: legacy cudaIpc handle; 1: VMM shareable handles (see aiote.cuda.vmm_export)

    def __post_init__(self) -> None:
        if self.mode not in _CUDA_MODES.values():
            raise DescriptorError(f"bad CUDA region mode {self.mode!r}")
        if not 0 <= self.device < 256 or not 0 <= self.pid < 1 << 32:
            raise DescriptorError("bad CUDA device or pid")
        if len(self.host) != 16 or len(self.device_uuid) != 16 or len(self.ipc_handle) != 64:
            raise DescriptorError("bad CUDA extension field sizes")
        if not 0 <= self.token < 1 << 64 or not 0 <= self.ipc_offset < 1 << 64:
            raise DescriptorError("bad CUDA token or IPC offset")
        if self.ipc_kind not in (0, 1):
            raise DescriptorError(f"bad CUDA IPC handle kind {self.ipc_kind!r}")

    @property
    def has_ipc(self) -> bool:
        return any(self.ipc_handle)

    def pack(self) -> bytes:
        mode = {v: k for k, v in _CUDA_MODES.items()}[self.mode]
        return _CUDA_EXT.pack(mode, self.device, self.ipc_kind, self.pid, self.token, self.ipc_offset, self.host,
                              self.device_uuid, self.ipc_handle)

    @classmethod
    def unpack(cls, b: bytes) -> CudaExt:
        if len(b) != _CUDA_EXT.size:
            raise DescriptorError(f"CUDA extension of {len(b)} bytes (expected {_CUDA_EXT.size})")
        mode, device, kind, pid, token, ipc_offset, host, duuid, handle = _CUDA_EXT.unpack(b)
        if mode not in _CUDA_MODES:
            raise DescriptorError(f"bad CUDA region mode {mode}")
        return cls(_CUDA_MODES[mode], device, token, host, pid, duuid, handle, ipc_offset, kind)


@dataclass(frozen=True)
class MrDescriptor:
    """What a peer needs to write into a registered region.

    Plain data: ``to_bytes()``/``from_bytes()`` and pickle both work.  Giving
    a descriptor to a peer is what allows it to write the region; the key
    dies when the region is closed.
    """

    provider: str
    addrs: tuple[bytes, ...]
    base: int
    length: int
    keys: tuple[int, ...]
    cuda: CudaExt | None = None  # set for GPU regions

    def __post_init__(self) -> None:
        _check_common(self.provider, self.addrs)
        if self.cuda is not None and not isinstance(self.cuda, CudaExt):
            raise DescriptorError("cuda must be a CudaExt")
        if len(self.keys) != len(self.addrs):
            raise DescriptorError("one key per NIC address is required")
        if not 0 <= self.base < 1 << 64 or not 0 < self.length < 1 << 64:
            raise DescriptorError(f"bad region base/length ({self.base}, {self.length})")
        if any(not 0 <= k < 1 << 64 for k in self.keys):
            raise DescriptorError("bad key")

    @property
    def address(self) -> EngineAddress:
        return EngineAddress(self.provider, self.addrs)

    def to_bytes(self) -> bytes:
        p = self.provider.encode()
        version = _VERSION if self.cuda is None else _VERSION_EXT
        out = [_HDR.pack(b"AIOD", version, len(self.addrs), 0), _REGION.pack(self.base, self.length),
               bytes([len(p)]), p]
        for a, k in zip(self.addrs, self.keys):
            out += [_KEY.pack(k, len(a)), a]
        if self.cuda is not None:
            ext = self.cuda.pack()
            out += [struct.pack("<BH", 1, len(ext)), ext]
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> MrDescriptor:
        r, nnics, version = _header(data, b"AIOD")
        base, length = r.unpack(_REGION)
        provider = _read_provider(r)
        keys, addrs = [], []
        for _ in range(nnics):
            k, n = r.unpack(_KEY)
            if not 1 <= n <= _MAX_ADDR:
                raise DescriptorError(f"bad address length {n}")
            keys.append(k)
            addrs.append(r.take(n))
        cuda = None
        if version == _VERSION_EXT:
            ext_type, ext_len = r.unpack(struct.Struct("<BH"))
            if ext_type != 1:
                raise DescriptorError(f"unknown descriptor extension {ext_type}")
            cuda = CudaExt.unpack(r.take(ext_len))
        r.done()
        return cls(provider, tuple(addrs), base, length, tuple(keys), cuda)

    def __reduce__(self):
        return (MrDescriptor.from_bytes, (self.to_bytes(),))

    def __repr__(self) -> str:
        gpu = f", cuda={self.cuda.mode}:{self.cuda.device}" if self.cuda else ""
        return f"MrDescriptor(provider={self.provider!r}, nics={len(self.addrs)}, length={self.length}{gpu})"
