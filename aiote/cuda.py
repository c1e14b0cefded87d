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


_driver: _Driver | None = None
_driver_error: CudaError | None = None
_driver_lock = threading.Lock()


def driver() -> _Driver:
    """The process's CUDA driver binding; CudaError if there is no usable driver."""
    global _driver, _driver_error
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
