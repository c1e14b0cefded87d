"""Registered memory: MemoryRegion and the buffer types it accepts."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._core import check, ffi, lib
from .descriptor import MrDescriptor
from .errors import RegionClosed, RegionInUse, RegistrationError

if TYPE_CHECKING:
    from .engine import TransferEngine

__all__ = ["MemoryRegion", "buffer_address", "host_buffer"]


_HUGE = 2 << 20


def host_buffer(nbytes: int, *, huge_pages: bool = True) -> memoryview:
    """Zeroed, page-aligned host memory for registration: a writable memoryview.

    With ``huge_pages`` (default) the memory is 2 MiB-aligned and advised for
    transparent huge pages (``MADV_HUGEPAGE``).  That matters on ``shm``: large
    writes are single copies by the kernel (CMA), which run markedly faster
    on 2 MiB pages than on 4 KiB ones (1.6–1.7x here; docs/benchmarks.md).  numpy arrays
    of 4 MiB or more get the same advice from numpy itself; bytearrays and torch
    CPU tensors don't.
    """
    if not isinstance(nbytes, int) or nbytes <= 0:
        raise RegistrationError(f"nbytes must be a positive int, got {nbytes!r}")
    pad = _HUGE if huge_pages else 0
    m = mmap.mmap(-1, nbytes + pad, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    off = 0
    if huge_pages:
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        off = -base % _HUGE
        start = off - off % mmap.PAGESIZE
        if hasattr(mmap, "MADV_HUGEPAGE"):
            m.madvise(mmap.MADV_HUGEPAGE, start, nbytes + off - start)
    return memoryview(m)[off:off + nbytes]


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
            raise RegistrationError("CUDA tensor given where host memory is needed")
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

    #: GPU regions: the device ordinal (None for host memory) and aiote.gpu's bookkeeping
    device: int | None = None
    cuda: Any = None
    #: staged GPU transfers using it right now (their chunks are copied in Python's time, not C's)
    _busy = 0

    def __init__(self, engine: TransferEngine, obj: Any, *, _raw: tuple[int, int, Any] | None = None,
                 _cuda_device: int | None = None):
        addr, nbytes, keep = _raw if _raw is not None else buffer_address(obj)
        mr_id = ffi.new("uint64_t*")
        keys = ffi.new("uint64_t[]", lib.AIOTE_MAX_NICS)
        base = ffi.new("uint64_t*")
        access = lib.AIOTE_ACCESS_LOCAL | lib.AIOTE_ACCESS_REMOTE
        if _cuda_device is None:
            rc = lib.aiote_mr_register(engine._handle(), ffi.cast("void*", addr), nbytes, access, mr_id, keys, base)
        else:
            rc = lib.aiote_mr_register_cuda(engine._handle(), ffi.cast("void*", addr), nbytes, access, _cuda_device,
                                            mr_id, keys, base)
        check(rc, "register")
        self._on_close: list[Callable[[], None]] = []
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

    @classmethod
    def _from_raw(cls, engine: TransferEngine, addr: int, nbytes: int, keep: Any) -> MemoryRegion:
        """Register host memory aiote allocated itself (the staged path's bounce pools)."""
        return cls(engine, None, _raw=(addr, nbytes, keep))

    @classmethod
    def _from_device(cls, engine: TransferEngine, cp: Any) -> MemoryRegion:
        """Register device memory with the NIC itself (GPUDirect)."""
        return cls(engine, None, _raw=(cp.ptr, cp.nbytes, cp.keep), _cuda_device=cp.device)

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
        if self._busy and not self._engine.closed:
            raise RegionInUse(f"memory region is in use by {self._busy} staged GPU transfer(s)")
        if not self._engine.closed:
            check(lib.aiote_mr_deregister(self._engine._handle(), self._id), "deregister")
        self._closed = True
        self._engine._regions.discard(self)
        self._keep = None
        self._run_on_close()

    def _engine_closed(self) -> None:
        self._closed = True
        self._keep = None
        self._run_on_close()

    def _run_on_close(self) -> None:
        hooks, self._on_close = self._on_close, []
        for h in hooks:
            h()

    def __enter__(self) -> MemoryRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.nbytes

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        where = f" cuda:{self.device}" if self.device is not None else ""
        return f"<MemoryRegion {self.nbytes} bytes{where} {state}>"
