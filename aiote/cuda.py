"""The CUDA driver API, loaded at run time (ctypes on libcuda.so.1).

aiote has no build-time dependency on CUDA: this module finds the driver when a
CUDA buffer first shows up.  It covers what the GPU paths need and nothing
more: pinned host memory, streams and events for copies on the copy engines,
and legacy IPC handles to map another process's ``cudaMalloc`` memory.

Every call is checked; failures raise ``CudaError`` with the driver's name
for the error.  Calls that take a context make the device's primary context
current first (the one torch and the runtime API use).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import struct
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import AioteError, RegistrationError

__all__ = ["CudaError", "available", "driver", "CudaPointer", "cuda_pointer", "boot_id"]

_CU_POINTER_ATTRIBUTE_MEMORY_TYPE = 2
_CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9
_CU_MEMORYTYPE_DEVICE = 2
_CU_MEMHOSTALLOC_PORTABLE = 1
_CU_STREAM_NON_BLOCKING = 1
_CU_EVENT_DISABLE_TIMING = 2
_CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
IPC_HANDLE_SIZE = 64
_CUDA_ERROR_NOT_READY = 600
_CU_POINTER_ATTRIBUTE_MAPPING_SIZE = 18
_CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR = 19
_CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1
_CU_MEM_LOCATION_TYPE_DEVICE = 1
_CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
_SYS_PIDFD_GETFD = 438  # x86-64 and aarch64 (asm-generic) alike

#: the 64-byte handle of a VMM region (``CudaExt.ipc_kind == 1``): magic, the owner's
#: memfd listing the segments, their count, the whole span's size, a random nonce (fd
#: numbers are reused: the nonce keeps a later region's handle from equalling an
#: earlier one's, whose mapping a writer may have cached)
VMM_HANDLE = struct.Struct("<4sIIQQ")
VMM_MAGIC = b"AVM1"
#: one segment in that memfd: offset from the first segment's start, size, the owner's fd
VMM_SEG = struct.Struct("<QQi4x")
VMM_MAX_SEGS = 1 << 16


class _MemAccessDesc(ctypes.Structure):
    _fields_ = [("loc_type", ctypes.c_int), ("loc_id", ctypes.c_int), ("flags", ctypes.c_int)]


@dataclass(frozen=True)
class VmmExport:
    """What the owner of a VMM region keeps open while it is registered."""

    handle: bytes           # 64 bytes for the descriptor
    offset: int             # the region's start within the span
    fds: tuple[int, ...]    # the memfd and each segment's exported fd

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


def vmm_parse_handle(handle: bytes) -> tuple[int, int, int]:
    """(memfd, segment count, span) of a VMM handle; ValueError if it isn't one."""
    if len(handle) != IPC_HANDLE_SIZE:
        raise ValueError("VMM handle must be 64 bytes")
    magic, memfd, nsegs, span, _nonce = VMM_HANDLE.unpack_from(handle)
    if magic != VMM_MAGIC or not 0 < nsegs <= VMM_MAX_SEGS or span == 0 or any(handle[VMM_HANDLE.size:]):
        raise ValueError("not a VMM handle")
    return memfd, nsegs, span


def vmm_parse_segments(data: bytes, nsegs: int, span: int) -> list[tuple[int, int, int]]:
    """The (offset, size, fd) list of a memfd: in order, not overlapping, within span."""
    if len(data) != nsegs * VMM_SEG.size:
        raise ValueError("VMM segment list of the wrong size")
    out, end = [], 0
    for i in range(nsegs):
        off, size, fd = VMM_SEG.unpack_from(data, i * VMM_SEG.size)
        if off != end or size == 0 or off + size > span or fd < 0:
            raise ValueError(f"VMM segment {i} is malformed")
        out.append((off, size, fd))
        end = off + size
    if end != span:
        raise ValueError("VMM segments don't cover the span")
    return out


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    r = libc.syscall(_SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(fd), ctypes.c_uint(0))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"pidfd_getfd: {os.strerror(e)}")
    return int(r)


class CudaError(AioteError):
    """A CUDA driver call failed (``.code`` is the CUresult)."""

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.code = code


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_SIZE)]


class _Driver:
    """The few driver entry points aiote uses, bound once."""

    def __init__(self) -> None:
        try:
            self._lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise CudaError(f"the CUDA driver (libcuda.so.1) is not available: {e}") from e
        self._check(self._fn("cuInit")(0), "cuInit")
        self._ctx: dict[int, ctypes.c_void_p] = {}
        self._lock = threading.Lock()

    def _fn(self, name: str) -> Any:
        for n in (name + "_v2", name):
            f = getattr(self._lib, n, None)
            if f is not None:
                return f
        raise CudaError(f"the CUDA driver has no {name}")

    def _check(self, rc: int, what: str) -> None:
        if rc:
            s = ctypes.c_char_p()
            self._lib.cuGetErrorName(rc, ctypes.byref(s))
            raise CudaError(f"{what} failed: {(s.value or b'?').decode()} ({rc})", rc)

    def call(self, name: str, *args: Any) -> None:
        self._check(self._fn(name)(*args), name)

    # -- contexts --------------------------------------------------------------

    def use_device(self, device: int) -> None:
        """Make the device's primary context current on this thread."""
        ctx = self._ctx.get(device)
        if ctx is None:
            with self._lock:
                ctx = self._ctx.get(device)
                if ctx is None:
                    dev = ctypes.c_int()
                    self.call("cuDeviceGet", ctypes.byref(dev), device)
                    ctx = ctypes.c_void_p()
                    self.call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
                    self._ctx[device] = ctx
        self.call("cuCtxSetCurrent", ctx)

    def context(self, device: int) -> int:
        """The device's primary context (retained once), as an integer handle."""
        ctx = self._ctx.get(device)
        if ctx is None:
            self.use_device(device)
            ctx = self._ctx[device]
        return int(ctx.value or 0)

    def device_uuid(self, device: int) -> bytes:
        dev = ctypes.c_int()
        self.call("cuDeviceGet", ctypes.byref(dev), device)
        out = ctypes.create_string_buffer(16)
        f = getattr(self._lib, "cuDeviceGetUuid_v2", None) or self._lib.cuDeviceGetUuid
        self._check(f(out, dev), "cuDeviceGetUuid")
        return out.raw

    # -- pointers ----------------------------------------------------------------

    def pointer_device(self, ptr: int) -> int | None:
        """The device ordinal of device memory at ptr, or None for host memory."""
        mtype = ctypes.c_uint()
        rc = self._fn("cuPointerGetAttribute")(ctypes.byref(mtype), _CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                                              ctypes.c_uint64(ptr))
        if rc or mtype.value != _CU_MEMORYTYPE_DEVICE:
            return None
        ordinal = ctypes.c_int()
        self.call("cuPointerGetAttribute", ctypes.byref(ordinal), _CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                  ctypes.c_uint64(ptr))
        return ordinal.value

    def address_range(self, ptr: int) -> tuple[int, int]:
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        self.call("cuMemGetAddressRange", ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
        return base.value, size.value

    # -- memory ------------------------------------------------------------------

    def host_alloc(self, nbytes: int) -> int:
        """Pinned host memory (the copy engines DMA from/to it)."""
        p = ctypes.c_void_p()
        self.call("cuMemHostAlloc", ctypes.byref(p), ctypes.c_size_t(nbytes), _CU_MEMHOSTALLOC_PORTABLE)
        return int(p.value or 0)

    def host_free(self, ptr: int) -> None:
        self.call("cuMemFreeHost", ctypes.c_void_p(ptr))

    def ipc_handle(self, base: int) -> bytes:
        h = _IpcHandle()
        self.call("cuIpcGetMemHandle", ctypes.byref(h), ctypes.c_uint64(base))
        return ctypes.string_at(ctypes.addressof(h), IPC_HANDLE_SIZE)  # (h.reserved stops at a NUL)

    def ipc_open(self, handle: bytes) -> int:
        h = _IpcHandle()
        ctypes.memmove(ctypes.addressof(h), handle, IPC_HANDLE_SIZE)
        p = ctypes.c_uint64()
        self.call("cuIpcOpenMemHandle", ctypes.byref(p), h, _CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
        return p.value

    def ipc_close(self, ptr: int) -> None:
        self.call("cuIpcCloseMemHandle", ctypes.c_uint64(ptr))

    # -- VMM (cuMemCreate memory: torch's expandable segments) ---------------------------

    def _ptr_attr(self, attr: int, ptr: int) -> int:
        v = ctypes.c_uint64()
        self.call("cuPointerGetAttribute", ctypes.byref(v), attr, ctypes.c_uint64(ptr))
        return v.value

    def vmm_export(self, ptr: int, nbytes: int) -> VmmExport:
        """Export the VMM allocations behind [ptr, ptr+nbytes) as POSIX fds (one per
        mapping: torch maps an expandable segment page by page), listed in a memfd.
        A peer fetches them with pidfd_getfd (``vmm_import``).  CudaError if the memory
        isn't VMM memory or wasn't made exportable as a POSIX fd."""
        segs: list[tuple[int, int, int]] = []
        fds: list[int] = []
        try:
            a, end = ptr, ptr + nbytes
            first = None
            while a < end:
                base = self._ptr_attr(_CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR, a)
                size = self._ptr_attr(_CU_POINTER_ATTRIBUTE_MAPPING_SIZE, a)
                if size == 0 or not base <= a < base + size or len(segs) >= VMM_MAX_SEGS:
                    raise CudaError("VMM mapping attributes are inconsistent")
                if first is None:
                    first = base
                h = ctypes.c_uint64()
                self.call("cuMemRetainAllocationHandle", ctypes.byref(h), ctypes.c_void_p(a))
                fd = ctypes.c_int(-1)
                try:
                    self.call("cuMemExportToShareableHandle", ctypes.byref(fd), h,
                              _CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, ctypes.c_ulonglong(0))
                finally:
                    self.call("cuMemRelease", h)
                fds.append(fd.value)
                segs.append((base - first, size, fd.value))
                a = base + size
            assert first is not None
            span = segs[-1][0] + segs[-1][1]
            memfd = os.memfd_create("aiote-vmm", os.MFD_CLOEXEC)
            fds.insert(0, memfd)
            os.write(memfd, b"".join(VMM_SEG.pack(*sg) for sg in segs))
            handle = VMM_HANDLE.pack(VMM_MAGIC, memfd, len(segs), span,
                                     secrets.randbits(64)).ljust(IPC_HANDLE_SIZE, b"\0")
            return VmmExport(handle, ptr - first, tuple(fds))
        except BaseException:
            VmmExport(b"", 0, tuple(fds)).close()
            raise

    def vmm_import(self, pid: int, handle: bytes, devices: list[int]) -> tuple[int, int, list[tuple[int, int]]]:
        """Map another process's VMM region (its handle from ``vmm_export``) here: fds got
        with pidfd_getfd (same ptrace access as process_vm_writev), imported, mapped
        in one reserved span, readable and writable from ``devices``.  (base, span,
        mapped (offset, size) list for ``vmm_close``); CudaError on failure (nothing
        left mapped)."""
        try:
            memfd, nsegs, span = vmm_parse_handle(handle)
        except ValueError as e:
            raise CudaError(str(e)) from None
        opened: list[int] = []
        va, reserved, mapped = ctypes.c_uint64(0), False, []
        try:
            pidfd = os.pidfd_open(pid)
            opened.append(pidfd)
            lfd = _pidfd_getfd(pidfd, memfd)
            opened.append(lfd)
            segs = vmm_parse_segments(os.pread(lfd, nsegs * VMM_SEG.size + 1, 0), nsegs, span)
            self.call("cuMemAddressReserve", ctypes.byref(va), ctypes.c_size_t(span), ctypes.c_size_t(0),
                      ctypes.c_uint64(0), ctypes.c_ulonglong(0))
            reserved = True
            for off, size, fd in segs:
                sfd = _pidfd_getfd(pidfd, fd)
                h = ctypes.c_uint64()
                try:
                    self.call("cuMemImportFromShareableHandle", ctypes.byref(h), ctypes.c_void_p(sfd),
                              _CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
                finally:
                    os.close(sfd)
                try:
                    self.call("cuMemMap", ctypes.c_uint64(va.value + off), ctypes.c_size_t(size), ctypes.c_size_t(0),
                              h, ctypes.c_ulonglong(0))
                finally:
                    self.call("cuMemRelease", h)  # the mapping holds the memory now
                mapped.append((off, size))
            granted = 0
            for dev in devices:
                acc = _MemAccessDesc(_CU_MEM_LOCATION_TYPE_DEVICE, dev, _CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
                if self._fn("cuMemSetAccess")(ctypes.c_uint64(va.value), ctypes.c_size_t(span), ctypes.byref(acc),
                                              ctypes.c_size_t(1)) == 0:
                    granted += 1
            if not granted:
                raise CudaError("cuMemSetAccess failed for every device")
            return va.value, span, mapped
        except OSError as e:
            self._vmm_undo(va.value, mapped, reserved, span)
            raise CudaError(f"VMM import from pid {pid} failed: {e}") from None
        except BaseException:
            self._vmm_undo(va.value, mapped, reserved, span)
            raise
        finally:
            for fd in opened:
                os.close(fd)

    def _vmm_undo(self, va: int, mapped: list[tuple[int, int]], reserved: bool, span: int) -> None:
        for off, size in mapped:
            self._fn("cuMemUnmap")(ctypes.c_uint64(va + off), ctypes.c_size_t(size))
        if reserved:
            self._fn("cuMemAddressFree")(ctypes.c_uint64(va), ctypes.c_size_t(span))

    def vmm_close(self, va: int, span: int, mapped: list[tuple[int, int]]) -> None:
        """Unmap a span from ``vmm_import`` (the owner's memory stays the owner's)."""
        self._vmm_undo(va, mapped, True, span)

    def device_count(self) -> int:
        n = ctypes.c_int()
        self.call("cuDeviceGetCount", ctypes.byref(n))
        return n.value

    # -- streams, copies, events ---------------------------------------------------

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self.call("cuStreamCreate", ctypes.byref(s), _CU_STREAM_NON_BLOCKING)
        return int(s.value or 0)

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Asynchronous copy between any two addresses (unified addressing)."""
        self.call("cuMemcpyAsync", ctypes.c_uint64(dst), ctypes.c_uint64(src), ctypes.c_size_t(nbytes),
                  ctypes.c_void_p(stream))

    def event(self) -> int:
        ev = ctypes.c_void_p()
        self.call("cuEventCreate", ctypes.byref(ev), _CU_EVENT_DISABLE_TIMING)
        return int(ev.value or 0)

    def record(self, event: int, stream: int) -> None:
        self.call("cuEventRecord", ctypes.c_void_p(event), ctypes.c_void_p(stream))

    def query(self, event: int) -> bool | CudaError:
        """True if the event has happened, False if not yet, else the error."""
        rc = self._fn("cuEventQuery")(ctypes.c_void_p(event))
        if rc == 0:
            return True
        if rc == _CUDA_ERROR_NOT_READY:
            return False
        try:
            self._check(rc, "cuEventQuery")
        except CudaError as e:
            return e
        return True

    def synchronize(self, event: int) -> None:
        """Block until the event has happened (ctypes drops the GIL meanwhile)."""
        self.call("cuEventSynchronize", ctypes.c_void_p(event))

    def destroy_event(self, event: int) -> None:
        self.call("cuEventDestroy", ctypes.c_void_p(event))


class _FakeDriver:
    """Tests only (``use_fake()``): "device memory" is host memory aiote.testing hands out,
    copies are memcpys done by the C core (``aiote_cuda_fake``).  Enough of the driver for
    the staged path: pinned memory, contexts, streams; no IPC handles (the NIC path serves)."""

    def __init__(self) -> None:
        import mmap

        self._mmap = mmap
        self._device: dict[int, tuple[int, int]] = {}  # base -> (nbytes, device)
        self._host: dict[int, Any] = {}  # host_alloc'd address -> its mapping
        self._ids = iter(range(0x1000, 1 << 62, 0x10))

    def device_alloc(self, nbytes: int, device: int) -> tuple[int, memoryview]:
        m = self._mmap.mmap(-1, nbytes)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        self._device[addr] = (nbytes, device)
        self._host[addr] = m
        return addr, memoryview(m)

    def device_free(self, addr: int) -> None:
        self._device.pop(addr, None)
        self._host.pop(addr, None)  # the mapping goes with its last view

    def call(self, name: str, *args: Any) -> None:
        pass  # stream destroy/wait: nothing to do

    def use_device(self, device: int) -> None:
        pass

    def context(self, device: int) -> int:
        return 0xC0 + device

    def device_uuid(self, device: int) -> bytes:
        return bytes([device]) * 16

    def device_count(self) -> int:
        return 2

    def pointer_device(self, ptr: int) -> int | None:
        for base, (n, dev) in self._device.items():
            if base <= ptr < base + n:
                return dev
        return None

    def address_range(self, ptr: int) -> tuple[int, int]:
        raise CudaError("fake CUDA: no IPC handles")

    def vmm_export(self, ptr: int, nbytes: int) -> VmmExport:
        raise CudaError("fake CUDA: no IPC handles")

    def host_alloc(self, nbytes: int) -> int:
        m = self._mmap.mmap(-1, nbytes)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        self._host[addr] = m
        return addr

    def host_free(self, ptr: int) -> None:
        self._host.pop(ptr, None)

    def stream(self) -> int:
        return next(self._ids)

    def event(self) -> int:
        return next(self._ids)

    def record(self, event: int, stream: int) -> None:
        pass

    def destroy_event(self, event: int) -> None:
        pass


_driver: _Driver | _FakeDriver | None = None
_driver_error: CudaError | None = None
_driver_lock = threading.Lock()


def use_fake(on: bool = True) -> None:
    """Tests only: a fake driver (host memory as "device memory", memcpy as the copy) in
    this process, for the staged path's protocol on machines without a GPU; children
    started with ``AIOTE_FAKE_CUDA=1`` in their environment use it too.  ``on=False``
    forgets it (the real driver is looked up afresh)."""
    global _driver, _driver_error
    from ._core import check, lib

    with _driver_lock:
        check(lib.aiote_cuda_fake(1 if on else 0), "fake CUDA")
        _driver, _driver_error = (_FakeDriver(), None) if on else (None, None)


def driver() -> Any:
    """The process's CUDA driver binding; CudaError if there is no usable driver."""
    global _driver, _driver_error
    if _driver is None and _driver_error is None and os.environ.get("AIOTE_FAKE_CUDA") == "1":
        use_fake(True)
    if _driver is None and _driver_error is None:
        with _driver_lock:
            if _driver is None and _driver_error is None:
                try:
                    _driver = _Driver()
                except CudaError as e:
                    _driver_error = e
    if _driver is None:
        assert _driver_error is not None
        raise _driver_error
    return _driver


def available() -> bool:
    """Whether a CUDA driver with at least one device is usable here."""
    try:
        driver()
        return True
    except CudaError:
        return False


@dataclass(frozen=True)
class CudaPointer:
    """A contiguous span of device memory handed to ``register``."""

    ptr: int
    nbytes: int
    device: int
    keep: Any


def cuda_pointer(obj: Any) -> CudaPointer | None:
    """Device memory behind obj (a torch CUDA tensor or anything with
    ``__cuda_array_interface__``), or None if obj is not CUDA memory."""
    if type(obj).__module__.startswith("torch") and getattr(obj, "is_cuda", False):
        if not obj.is_contiguous():
            raise RegistrationError("tensor must be contiguous")
        nbytes = obj.numel() * obj.element_size()
        if nbytes == 0:
            raise RegistrationError("cannot register an empty tensor")
        return CudaPointer(int(obj.data_ptr()), nbytes, int(obj.device.index or 0), obj)
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is None:
        return None
    ptr, readonly = cai["data"]
    if readonly:
        raise RegistrationError("read-only device memory cannot be registered")
    if cai.get("strides") is not None:
        raise RegistrationError("device array must be C-contiguous (strides=None)")
    import math

    import numpy as np

    nbytes = math.prod(cai["shape"]) * np.dtype(cai["typestr"]).itemsize
    if nbytes == 0 or not ptr:
        raise RegistrationError("cannot register an empty device array")
    dev = driver().pointer_device(int(ptr))
    if dev is None:
        raise RegistrationError("__cuda_array_interface__ points at host memory")
    return CudaPointer(int(ptr), nbytes, dev, obj)


def boot_id() -> bytes:
    """16 bytes naming this boot of this host: equal ids = same host (CUDA IPC may work)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return uuid.uuid5(uuid.NAMESPACE_DNS, os.uname().nodename).bytes
