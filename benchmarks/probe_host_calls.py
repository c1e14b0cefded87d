"""Host cost of the single torch and numpy calls a MoE step makes, on this machine.

One process, nothing else running: median µs of the call alone ("host") and of the call
plus a device sync ("with sync"), 300 times each after a sync.  Tells how slow a host's
Python and framework calls are before reading a per-phase probe (``probe_moe.py``).

    python benchmarks/probe_host_calls.py [cuda:0|cpu]
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

N = 300


def main() -> None:
    torch.set_num_threads(1)
    dev = sys.argv[1] if len(sys.argv) > 1 else ("cuda:0" if torch.cuda.is_available() else "cpu")
    gpu = dev.startswith("cuda")
    x = torch.randn(128, 2048, device=dev)
    ids = torch.randint(0, 32, (128, 8), device=dev)
    rows = torch.empty(4096, 2048, device=dev)
    idx = torch.randint(0, 128, (1024,), device=dev)
    pin = torch.empty(1024, dtype=torch.int64, pin_memory=gpu)
    idev = torch.empty(1024, dtype=torch.int64, device=dev)
    w = torch.rand(128 * 8, device=dev)
    bag_i = torch.randint(0, 4096, (1024,), device=dev)
    off = torch.arange(0, 1024, 8, device=dev)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    f = ids.cpu().reshape(-1).numpy().astype(np.uint64)
    lut = (np.arange(32) // 8).astype(np.int16)

    def route():  # what the MoE routing did with numpy before aiote_moe_route
        rot = lut[f]
        order = np.argsort(rot, kind="stable")
        return order // 8, np.bincount(rot, minlength=4).tolist()

    calls = {
        "sync (idle)": lambda: None,
        "ids.cpu()": lambda: ids.cpu(),
        "ids.reshape(-1)": lambda: ids.reshape(-1),
        "pinned H2D copy_ 8KB nb": lambda: idev.copy_(pin, non_blocking=True),
        "index_select 1024 rows out=": lambda: torch.index_select(x, 0, idx, out=rows[:1024]),
        "slice assign 256 rows": lambda: rows.__setitem__(slice(2000, 2256), rows[0:256]),
        "slice rows[a:b]": lambda: rows[100:356],
        "embedding_bag 128x8": lambda: torch.embedding_bag(rows, bag_i, off, False, 0, False, w, False, None),
        "numpy routing": route,
    }
    for name, call in calls.items():
        host, synced = [], []
        for _ in range(N):
            sync()
            a = time.perf_counter()
            call()
            host.append((time.perf_counter() - a) * 1e6)
        for _ in range(N):
            sync()
            a = time.perf_counter()
            call()
            sync()
            synced.append((time.perf_counter() - a) * 1e6)
        print(f"{name:<40} host {statistics.median(host):7.1f}  with sync {statistics.median(synced):7.1f}")


if __name__ == "__main__":
    main()
