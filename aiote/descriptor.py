"""MrDescriptor and engine addresses: versioned bytes that travel between peers.

Layout (version 1, little endian)::

    magic "AIOD" | version u8 | nnics u8 | reserved u16
    base u64 | length u64 | provider_len u8 | provider bytes
    nnics x (key u64 | addr_len u16 | addr bytes)

An engine address is the same without base/length/keys (magic "AIOA").
Parsing checks every length against the data: forged or truncated bytes raise
DescriptorError, never anything worse.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import DescriptorError

__all__ = ["MrDescriptor", "EngineAddress"]

_VERSION = 1
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


def _header(data: object, magic: bytes) -> tuple[_Reader, int]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DescriptorError(f"expected bytes, got {type(data).__name__}")
    r = _Reader(bytes(data))
    m, version, nnics, _ = r.unpack(_HDR)
    if m != magic:
        raise DescriptorError(f"bad magic {m!r} (expected {magic!r})")
    if version != _VERSION:
        raise DescriptorError(f"unsupported version {version} (this aiote reads {_VERSION})")
    if not 1 <= nnics <= _MAX_NICS:
        raise DescriptorError(f"bad NIC count {nnics}")
    return r, nnics


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
        r, nnics = _header(data, b"AIOA")
        provider = _read_provider(r)
        addrs = tuple(_read_addr(r) for _ in range(nnics))
        r.done()
        return cls(provider, addrs)


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

    def __post_init__(self) -> None:
        _check_common(self.provider, self.addrs)
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
        out = [_HDR.pack(b"AIOD", _VERSION, len(self.addrs), 0), _REGION.pack(self.base, self.length),
               bytes([len(p)]), p]
        for a, k in zip(self.addrs, self.keys):
            out += [_KEY.pack(k, len(a)), a]
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> MrDescriptor:
        r, nnics = _header(data, b"AIOD")
        base, length = r.unpack(_REGION)
        provider = _read_provider(r)
        keys, addrs = [], []
        for _ in range(nnics):
            k, n = r.unpack(_KEY)
            if not 1 <= n <= _MAX_ADDR:
                raise DescriptorError(f"bad address length {n}")
            keys.append(k)
            addrs.append(r.take(n))
        r.done()
        return cls(provider, tuple(addrs), base, length, tuple(keys))

    def __reduce__(self):
        return (MrDescriptor.from_bytes, (self.to_bytes(),))

    def __repr__(self) -> str:
        return f"MrDescriptor(provider={self.provider!r}, nics={len(self.addrs)}, length={self.length})"
