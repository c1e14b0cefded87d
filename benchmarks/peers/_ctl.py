"""Shared by the peer workers: the control channel, the iteration plan, timing.

Standard library only: this module is imported both from the project's
.venv (aiote's worker) and from the peers' own venv (Mooncake, NIXL, gloo).

Protocol: the driver starts ``w_X.py target``; the target listens on a
loopback TCP port and prints ``{"ready": true, "ctl_port": P, ...}`` on
stdout.  The driver starts ``w_X.py initiator --ctl-port P``; the target sends
its connection facts as the first control message.  Per size the initiator
measures, then asks the target to ``check`` that the bytes landed, and
prints one JSON result line per (size, mode) on stdout.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
from typing import Any

# The one clock every worker uses: CLOCK_MONOTONIC is system-wide on Linux, so
# a target's timestamp can be compared with the initiator's (NIXL notif mode).
now = time.monotonic

INFLIGHT = 32  # writes in flight / batch length of the pipelined modes (fi_bench's default)
MAX_SIZE = 64 << 20
OP_TIMEOUT = 30.0  # seconds one operation may take before a worker gives up (no hangs)

# byte budgets per point; counts are deterministic so that two-sided peers
# (gloo) can post exactly the matching receives.  4 GiB / 1 GiB: with the
# earlier 512 / 128 MiB a shm 1 MiB pipelined point lasted ~12 ms and a tcp
# 16 MiB one ~0.1 s, short enough for one scheduler hiccup on a 2-core box to
# decide it (both aiote and NIXL were bimodal there run to run; docs/benchmarks.md,
# "Longer points in the peers driver 2026-11-28")
PIPE_BUDGET, PIPE_MIN, PIPE_MAX = 4 << 30, 32, 20_000
ONE_BUDGET, ONE_MIN, ONE_MAX = 1 << 30, 16, 3_000


def plan(sizes: list[int]) -> dict[str, list[int]]:
    """Timed operations per size: [pipelined, one at a time] (the JSON's config)."""
    return {str(s): [pipe_ops(s), one_ops(s)] for s in sizes}


def _env_scale() -> float:
    # PEERS_SCALE=0.25: a quick smoke run with a quarter of the operations
    try:
        return float(os.environ.get("PEERS_SCALE", "1"))
    except ValueError:
        return 1.0


def _clamp(budget: int, least: int, most: int, size: int) -> int:
    s = _env_scale()
    return max(1, int(least * min(s, 1.0)), min(int(most * s), int(budget * s) // size))


def pipe_ops(size: int) -> int:
    """Operations timed in a pipelined point (a multiple of INFLIGHT)."""
    n = _clamp(PIPE_BUDGET, PIPE_MIN, PIPE_MAX, size)
    return max(INFLIGHT, n - n % INFLIGHT)


def one_ops(size: int) -> int:
    """Operations timed in a one-at-a-time point."""
    return max(4, _clamp(ONE_BUDGET, ONE_MIN, ONE_MAX, size))


def warm_ops(size: int) -> int:
    """Untimed operations before each point: connection set-up and page faults,
    without streaming gigabytes at 64 MiB (sizes run small to large)."""
    return max(2, min(INFLIGHT, (64 << 20) // size))


def pattern(size: int, mode: str) -> int:
    """The byte value written for one (size, mode): a stale buffer fails the check."""
    return (size.bit_length() * 7 + (0 if mode == "pipe" else 3)) % 251 + 1


def result(system: str, mode: str, size: int, ops: int, seconds: float, lat_s: list[float] | None = None,
           **extra: Any) -> dict[str, Any]:
    """One result line: GB/s and ops/s over the timed part, p50 of per-op latencies."""
    r: dict[str, Any] = {
        "system": system,
        "mode": mode,
        "size": size,
        "ops": ops,
        "seconds": seconds,
        "gbps": size * ops / seconds / 1e9,
        "ops_per_s": ops / seconds,
        "lat_us_p50": statistics.median(lat_s) * 1e6 if lat_s else None,
    }
    r.update(extra)
    return r


def buffer() -> Any:
    """The 64 MiB region every worker registers (but gloo: torch): a numpy array,
    faulted in.  numpy madvise()s arrays of >= 4 MiB with MADV_HUGEPAGE, so on a
    THP=madvise kernel they get 2 MiB pages -- which matters for shared-memory
    copies (CMA pins pages one by one); all workers get the same kind of memory."""
    import numpy as np

    return np.full(MAX_SIZE, 0, dtype=np.uint8)


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Ctl:
    """Newline-delimited JSON over a loopback socket (blocking)."""

    def __init__(self, sock: socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.f = sock.makefile("rwb")

    def send(self, obj: Any) -> None:
        self.f.write(json.dumps(obj).encode() + b"\n")
        self.f.flush()

    def recv(self) -> Any:
        line = self.f.readline()
        if not line:
            raise EOFError("control peer closed the connection")
        return json.loads(line)

    def call(self, obj: Any) -> Any:
        self.send(obj)
        return self.recv()

    def close(self) -> None:
        try:
            self.f.close()
        finally:
            self.sock.close()


def listen() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def accept(srv: socket.socket, timeout: float = 120.0) -> Ctl:
    srv.settimeout(timeout)
    conn, _ = srv.accept()
    conn.settimeout(None)
    srv.close()
    return Ctl(conn)


def connect(port: int, timeout: float = 30.0) -> Ctl:
    return Ctl(socket.create_connection(("127.0.0.1", port), timeout=timeout))


def ready(srv: socket.socket, **info: Any) -> None:
    """Tell the driver where to point the initiator (and what this side runs)."""
    emit({"ready": True, "ctl_port": srv.getsockname()[1], **info})


def sizes_arg(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def pkg_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - a version is informative only
        return "?"
