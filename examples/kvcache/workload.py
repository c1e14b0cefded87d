"""Requests, the load loop, the reference check and the numbers of a run."""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .client import Client, Completion
from .model import ModelConfig, TinyLM, reference_generate, set_deterministic

__all__ = ["Request", "make_workload", "run_load", "check_reference", "summarize"]


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_new: int


def make_workload(n: int, cfg: ModelConfig, seed: int = 0) -> list[Request]:
    """Mixed lengths: mostly short prompts, some medium, a few long; 8..32 new tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        lo, hi = (16, 128) if r < 0.6 else (128, 384) if r < 0.9 else (384, 768)
        n_prompt = min(rng.randint(lo, hi), cfg.max_seq - 32)
        out.append(Request([rng.randrange(cfg.vocab) for _ in range(n_prompt)], rng.choice([8, 16, 24, 32])))
    return out


async def run_load(client: Client, workload: list[Request], concurrency: int,
                   on_done: Callable[[int, Completion], None] | None = None,
                   on_token: Callable[[int, int, int, str], None] | None = None) -> list[Completion]:
    """Closed loop: ``concurrency`` requests in flight until all are answered (in workload order)."""
    sem = asyncio.Semaphore(concurrency)
    results: list[Completion | None] = [None] * len(workload)

    async def one(i: int, req: Request) -> None:
        async with sem:
            c = await client.generate(req.prompt, req.max_new, on_token=on_token)
        results[i] = c
        if on_done:
            on_done(i, c)

    await asyncio.gather(*(one(i, r) for i, r in enumerate(workload)))
    return [c for c in results if c is not None]


def check_reference(cfg: ModelConfig, workload: list[Request], got: list[list[int]],
                    progress: Callable[[], None] | None = None) -> list[int]:
    """Indices of requests whose tokens differ from a single-process run of the same model."""
    set_deterministic()
    model = TinyLM(cfg)
    bad = []
    for i, (req, tokens) in enumerate(zip(workload, got, strict=True)):
        if reference_generate(model, req.prompt, req.max_new) != tokens:
            bad.append(i)
        if progress:
            progress()
    return bad


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summarize(done: list[Completion], stats: dict[str, Any], wall_s: float) -> dict[str, Any]:
    ttft = [c.ttft for c in done]
    tokens = sum(len(c.tokens) for c in done)
    busy = stats["transfer_busy_s"]
    return {
        "requests": len(done),
        "retries": stats["retries"],
        "ttft_p50_ms": _pct(ttft, 50) * 1e3,
        "ttft_p99_ms": _pct(ttft, 99) * 1e3,
        "latency_p50_ms": statistics.median([c.t_done - c.t_submit for c in done]) * 1e3 if done else 0.0,
        "tokens": tokens,
        "tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "wall_s": wall_s,
        "kv_bytes": stats["kv_bytes"],
        "prefills": stats["prefills"],
        "transfer_gbps": stats["kv_bytes"] / busy / 1e9 if busy else 0.0,
        "transfer_busy_s": busy,
        "hidden_frac": 1.0 - stats["transfer_exposed_s"] / busy if busy else 0.0,
        "prefill_compute_s": stats["prefill_compute_s"],
        "joined": stats["joined"], "left": stats["left"], "died": stats["died"],
        "served": stats["served"],
    }
