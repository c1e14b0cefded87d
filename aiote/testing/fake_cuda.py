"""Tests only: the staged GPU path without a GPU.

``enable()`` installs a fake CUDA driver in this process (and, through
``AIOTE_FAKE_CUDA=1`` in the environment, in peer processes started after it):
``FakeDeviceBuffer`` is host memory that ``register`` takes as "device memory"
of a GPU, and every copy the C core queues is a ``memcpy`` (done when queued;
its event reports "not ready" to the worker's first poll).  The staging
protocol — grants, slots, pipelining, failures — then runs in real processes
exactly as on a GPU machine; only the copies are not on copy engines.
"""

from __future__ import annotations

import os
from typing import Any

from .. import cuda

__all__ = ["FakeDeviceBuffer", "enable", "disable"]


def enable() -> None:
    os.environ["AIOTE_FAKE_CUDA"] = "1"
    cuda.use_fake(True)


def disable() -> None:
    os.environ.pop("AIOTE_FAKE_CUDA", None)
    cuda.use_fake(False)


class FakeDeviceBuffer:
    """``nbytes`` of fake device memory on ``device``; ``host`` views its bytes."""

    def __init__(self, nbytes: int, device: int = 0, fill: int = 0):
        drv = cuda.driver()
        if not hasattr(drv, "device_alloc"):
            raise RuntimeError("fake CUDA is not enabled (aiote.testing.fake_cuda.enable())")
        self.ptr, self.host = drv.device_alloc(nbytes, device)
        self.nbytes = nbytes
        if fill:
            self.host[:] = bytes([fill]) * nbytes
        self.__cuda_array_interface__: dict[str, Any] = {
            "shape": (nbytes,), "typestr": "|u1", "data": (self.ptr, False), "version": 3, "strides": None}

    def __len__(self) -> int:
        return self.nbytes

    def __getitem__(self, key: Any) -> Any:
        return self.host[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.host[key] = value
