#!/usr/bin/env python
"""run_peers.py with aiote's earlier pipelined mode as extra rows, for A/B in the same rounds.

    .venv/bin/python benchmarks/peers/ab_rows.py --only aiote-shm,aiote-shm-scatter,nixl-shm \
        --sizes 64,4K,64K --runs 5 --no-doc --no-plot --name ab-shm

Rows added: ``aiote-shm-scatter`` / ``aiote-tcp-scatter`` (``w_aiote.py --pipe batch``: one
``scatter`` call per round, the default before prepared batches).  All other options are
run_peers.py's.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_peers as rp  # noqa: E402

_base = rp.configs


def configs() -> list[rp.Config]:
    return _base() + [
        rp.Config("aiote-shm-scatter", "aiote", "shm", "aiote shm, scatter/round (old)", "w_aiote.py",
                  ["--provider", "shm", "--pipe", "batch"]),
        rp.Config("aiote-tcp-scatter", "aiote", "tcp", "aiote tcp, scatter/round (old)", "w_aiote.py",
                  ["--provider", "tcp", "--pipe", "batch"]),
    ]


rp.configs = configs

if __name__ == "__main__":
    sys.exit(rp.main())
