"""Registered memory: MemoryRegion and the buffer types it accepts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._core import check, ffi, lib
from .descriptor import MrDescriptor
from .errors import RegionClosed, RegistrationError

if TYPE_CHECKING:
    from .engine import TransferEngine

__all__ = ["MemoryRegion", "buffer_address"]


def _is_torch_tensor(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "data_ptr") and hasattr(obj, "is_cuda")


def buffer_address(obj: Any, writable: bool = True) -> tuple[int, int, Any]:
    """Return (address, nbytes, keepalive) of a contiguous host buffer.

    Accepts bytearray, writable memoryview, numpy arrays, anything with the
    buffer protocol, and torch CPU tensors.  ``keepalive`` must outlive every
    use of the address.
    """
    if _is_torch_tensor(obj):
        if obj.is_cuda:
            raise RegistrationError("CUDA tensors are not supported yet (host memory only)")
        if not obj.is_contiguous():
            raise RegistrationError("tensor must be contiguous")
        nbytes = obj.numel() * obj.element_size()
        if nbytes == 0:
            raise RegistrationError("cannot register an empty tensor")
        return int(obj.data_ptr()), nbytes, obj
    try:
        mv = memoryview(obj)
    except TypeError as e:
        raise RegistrationError(f"{type(obj).__name__} does not export a buffer") from e
    if writable and mv.readonly:
        raise RegistrationError(f"{type(obj).__name__} is read-only; registration needs writable memory")
    if not mv.c_contiguous:
        raise RegistrationError("buffer must be C-contiguous")
    if mv.nbytes == 0:
        raise RegistrationError("cannot register an empty buffer")
    cbuf = ffi.from_buffer("uint8_t[]", obj, require_writable=writable)
    return int(ffi.cast("uintptr_t", cbuf)), mv.nbytes, (obj, cbuf)


class MemoryRegion:
    """A buffer registered with an engine.

    Local operations name the region itself; peers get ``descriptor``.
    ``close()`` deregisters it: refused with RegionInUse while an operation
    uses it; afterwards writes with its old descriptor fail and change nothing.
    """

    def __init__(self, engine: TransferEngine, obj: Any):
        addr, nbytes, keep = buffer_address(obj)
        mr_id = ffi.new("uint64_t*")
        keys = ffi.new("uint64_t[]", lib.AIOTE_MAX_NICS)
        base = ffi.new("uint64_t*")
        check(lib.aiote_mr_register(engine._handle(), ffi.cast("void*", addr), nbytes,
                                    lib.AIOTE_ACCESS_LOCAL | lib.AIOTE_ACCESS_REMOTE, mr_id, keys, base),
              "register")
        self._engine = engine
        self._keep = keep
        self._id = int(mr_id[0])
        self.address = addr
        self.nbytes = nbytes
        nnics = len(engine._nic_addrs)
        self._descriptor = MrDescriptor(engine.provider, engine._nic_addrs, int(base[0]), nbytes,
                                        tuple(int(keys[i]) for i in range(nnics)))
        self._closed = False
        engine._regions.add(self)

    @property
    def obj(self) -> Any:
        """The registered object."""
        return self._keep[0] if isinstance(self._keep, tuple) else self._keep

    @property
    def descriptor(self) -> MrDescriptor:
        return self._descriptor

    @property
    def closed(self) -> bool:
        return self._closed

    def _mr_id(self) -> int:
        if self._closed:
            raise RegionClosed("memory region is closed")
        return self._id

    def close(self) -> None:
        """Deregister (idempotent).  Raises RegionInUse while operations use it."""
        if self._closed:
            return
        if not self._engine.closed:
            check(lib.aiote_mr_deregister(self._engine._handle(), self._id), "deregister")
        self._closed = True
        self._engine._regions.discard(self)
        self._keep = None

    def _engine_closed(self) -> None:
        self._closed = True
        self._keep = None

    def __enter__(self) -> MemoryRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.nbytes

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<MemoryRegion {self.nbytes} bytes {state}>"
