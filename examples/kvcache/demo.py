"""The demo: a disaggregated prefill/decode service on this host, scaled while it serves.

Scenario (default): 2 prefill + 1 decode worker; at 10 % of the requests a
second decode worker joins; at 70 % the first one is retired (it drains and
leaves); ``--crash decode|prefill`` also SIGKILLs a worker that is busy at 40 %.
Then every answer is checked against a single-process run of the same model.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from .client import Client, Completion
from .cluster import LocalCluster
from .logs import setup_logging
from .model import set_deterministic
from .rendezvous import Settings
from .workload import Request, check_reference, make_workload, run_load, summarize

__all__ = ["DemoOptions", "run_demo", "render", "serve"]


@dataclass
class DemoOptions:
    provider: str = "shm"
    requests: int = 120
    concurrency: int = 12
    seed: int = 0
    prefill: int = 2
    decode: int = 1
    scale: bool = True
    crash: str | None = None
    log_file: str | None = None
    json_out: str | None = None


class _View:
    """The progress bar, its status line, and what the scenario waits on."""

    def __init__(self, console: Console, total: int):
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[tps]:>6.0f} tok/s"),
                                 TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console)
        self.task = self.progress.add_task("requests", total=total, tps=0.0, status="")
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.done = 0
        self.retries = 0
        self.notes: list[tuple[float, str]] = []  # (seconds into the run, what happened)
        self.streaming_from = ""  # a decode worker that is streaming tokens right now
        self.changed = asyncio.Event()
        self.workers: dict[str, dict[str, Any]] = {}

    def on_token(self, rid: int, i: int, tok: int, decode: str) -> None:
        self.tokens += 1
        self.streaming_from = decode

    def on_done(self, i: int, c: Completion) -> None:
        self.done += 1
        self.changed.set()
        dt = time.perf_counter() - self.t0
        self.progress.update(self.task, advance=1, tps=self.tokens / dt if dt else 0.0)

    def on_event(self, e: dict[str, Any]) -> None:
        self.retries += e["kind"] == "retry"
        if e["kind"] in ("joined", "left", "died", "draining"):
            self.note(f"{e['name']} {e['kind']}")
        else:
            self.note()

    def note(self, text: str | None = None) -> None:
        if text:
            self.notes.append((time.perf_counter() - self.t0, text))
        live = [w for w in self.workers.values() if w["state"] == "joined"]
        p = sum(w["role"] == "prefill" for w in live)
        d = sum(w["role"] == "decode" for w in live)
        last = f" | {self.notes[-1][1]}" if self.notes else ""
        self.progress.update(self.task, status=f"prefill×{p} decode×{d} retries {self.retries}{last}")

    async def until(self, n: float) -> None:
        while self.done < n:
            self.changed.clear()
            await self.changed.wait()


async def serve(cluster: LocalCluster, workload: list[Request], concurrency: int, view: _View,
                scenario: Any = None) -> tuple[list[Completion], dict[str, Any], float]:
    """Run the workload (and the scenario beside it); returns completions, router stats, wall seconds."""
    client: Client = cluster.client
    client.on_event = view.on_event
    view.workers = client.workers
    view.t0 = t0 = time.perf_counter()
    view.note()
    load = asyncio.ensure_future(run_load(client, workload, concurrency, on_done=view.on_done,
                                          on_token=view.on_token))
    tasks = [load] + ([asyncio.ensure_future(scenario)] if scenario is not None else [])
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        client.on_event = None  # what follows is shutdown, not part of the story
    wall = time.perf_counter() - t0
    return load.result(), await client.stats(), wall


async def _scenario(cluster: LocalCluster, opts: DemoOptions, view: _View) -> None:
    n = opts.requests
    added = ""
    if opts.scale:
        await view.until(0.10 * n)
        view.note("scaling decode 1→2")
        added = await cluster.add("decode")
    if opts.crash:
        await view.until(0.40 * n)
        live = cluster.live(opts.crash)
        victim = view.streaming_from if view.streaming_from in live else live[0]
        view.note(f"SIGKILL {victim}")
        cluster.kill(victim)
    if opts.scale:
        await view.until(0.70 * n)
        decodes = cluster.live("decode")
        if len(decodes) >= 2:  # never retire the last one
            first = next(nm for nm in decodes if nm != added)
            view.note(f"retiring {first}")
            await cluster.retire(first)


def render(console: Console, s: dict[str, Any], opts: DemoOptions, bad: list[int], log_file: str,
           timeline: Sequence[tuple[float, str]] = ()) -> None:
    t = Table(title=f"aiote KV-cache disaggregation · provider {opts.provider}", title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("requests (retried attempts)", f"{s['requests']} ({s['retries']})")
    t.add_row("TTFT p50 / p99", f"{s['ttft_p50_ms']:.0f} / {s['ttft_p99_ms']:.0f} ms")
    t.add_row("tokens/s (generated)", f"{s['tokens_per_s']:.0f}  ({s['tokens']} in {s['wall_s']:.1f} s)")
    t.add_row("KV bytes moved", f"{s['kv_bytes'] / 2**20:.1f} MiB in {s['prefills']} prefills")
    t.add_row("transfer GB/s (while writing)", f"{s['transfer_gbps']:.2f}")
    t.add_row("transfer hidden behind compute", f"{s['hidden_frac'] * 100:.0f} %")
    n = max(1, s["prefills"])
    t.add_row("per prefill: compute / transfer / exposed",
              f"{s['prefill_compute_s'] / n * 1e3:.1f} / {s['transfer_busy_s'] / n * 1e3:.1f} / "
              f"{s['transfer_busy_s'] * (1 - s['hidden_frac']) / n * 1e3:.1f} ms")
    t.add_row("workers joined / left / died", f"{s['joined']} / {s['left']} / {s['died']}")
    served = ", ".join(f"{k} {v}" for k, v in sorted(s["served"].items()))
    t.add_row("requests per decode worker", served)
    console.print(t)
    if timeline:
        console.print("[bold]while serving:[/] " + " · ".join(f"{at:.1f} s {what}" for at, what in timeline))
    if bad:
        console.print(f"[bold red]✗ {len(bad)} of {s['requests']} answers differ from the single-process "
                      f"reference[/] (requests {bad[:10]})")
    else:
        console.print(f"[bold green]✓ all {s['requests']} answers are token-for-token identical to a "
                      "single-process reference run of the same model[/]")
    console.print(f"[dim]logs: {log_file}[/]")


async def run_demo(opts: DemoOptions, console: Console | None = None) -> int:
    console = console or Console()
    log_file = opts.log_file or os.path.join(tempfile.mkdtemp(prefix="aiote-kvcache-"), "demo.log")
    log = setup_logging(log_file, role="client")
    set_deterministic()
    settings = Settings(provider=opts.provider, host=None if opts.provider == "shm" else "127.0.0.1")
    workload = make_workload(opts.requests, settings.model, opts.seed)
    m = settings.model
    console.print(f"[bold]aiote[/] disaggregated prefill/decode on {opts.provider}: {opts.requests} "
                  f"requests, {opts.prefill} prefill + {opts.decode} decode workers, model {m.n_layers} "
                  f"layers × d{m.d_model}, KV pages of {m.page_tokens} tokens ({m.page_bytes // 1024} KiB)")
    log.info("demo.start", **{k: v for k, v in vars(opts).items()})
    async with LocalCluster(settings, log_file) as cluster:
        with console.status("starting router and workers…"):
            await cluster.start(prefill=opts.prefill, decode=opts.decode)
        view = _View(console, len(workload))
        scenario = _scenario(cluster, opts, view) if (opts.scale or opts.crash) else None
        with view.progress:
            done, stats, wall = await serve(cluster, workload, opts.concurrency, view, scenario)
    summary = summarize(done, stats, wall)
    with Progress(TextColumn("checking against the single-process reference"), BarColumn(),
                  MofNCompleteColumn(), console=console, transient=True) as p:
        task = p.add_task("ref", total=len(workload))
        bad = check_reference(settings.model, workload, [c.tokens for c in done],
                              lambda: p.advance(task))
    summary["mismatches"] = bad
    log.info("demo.done", **{k: v for k, v in summary.items() if k != "served"})
    render(console, summary, opts, bad, log_file, view.notes)
    if opts.json_out:
        with open(opts.json_out, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if not bad and len(done) == len(workload) else 1
