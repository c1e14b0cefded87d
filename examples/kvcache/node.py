"""Process entry points: one service process, or one rank under torchrun."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import signal
import tempfile
import time

from .logs import setup_logging
from .model import set_deterministic
from .rendezvous import Rendezvous, Settings

__all__ = ["run_worker", "run_role", "run_torchrun"]


async def run_role(role: str, name: str, rdv: Rendezvous, log_file: str | None) -> int:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` dumps every thread's stack to stderr (the log)
    set_deterministic()
    log = setup_logging(log_file, role=role, name=name)
    settings = await rdv.settings()
    log.info("process.start", provider=settings.provider)
    try:
        if role == "router":
            from .router import Router

            await Router(settings, rdv, log).run()
        elif role == "prefill":
            from .prefill import PrefillWorker

            await PrefillWorker(name, settings, rdv, log).run()
        elif role == "decode":
            from .decode import DecodeWorker

            await DecodeWorker(name, settings, rdv, log).run()
        else:
            raise ValueError(f"unknown role {role!r}")
    except Exception:
        log.exception("process.failed")
        raise
    return 0


async def run_worker(role: str, name: str, host: str, port: int, prefix: str, log_file: str | None) -> int:
    rdv = await asyncio.to_thread(Rendezvous.connect, host, port, prefix)
    return await run_role(role, name, rdv, log_file)


async def run_torchrun(args: argparse.Namespace) -> int:
    """Rank 0: client (sets the settings, runs the workload, prints the table); 1: router; then workers."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    roles = ["client", "router"] + ["prefill"] * args.prefill + ["decode"] * args.decode
    if len(roles) != world:
        raise SystemExit(f"world size {world} != 2 + {args.prefill} prefill + {args.decode} decode")
    role = roles[rank]
    rdv = await asyncio.to_thread(Rendezvous.from_torchrun_env)
    run = os.environ.get("TORCHELASTIC_RUN_ID", "manual")
    log_file = args.log_file or os.path.join(tempfile.gettempdir(), f"aiote-kvcache-{run}.log")
    if role != "client":
        return await run_role(role, f"{role}-r{rank}", rdv, log_file)
    return await _torchrun_client(args, rdv, log_file)


async def _torchrun_client(args: argparse.Namespace, rdv: Rendezvous, log_file: str) -> int:
    from rich.console import Console

    import aiote

    from .client import Client
    from .demo import DemoOptions, render
    from .workload import check_reference, make_workload, run_load, summarize

    set_deterministic()
    log = setup_logging(log_file, role="client")
    settings = Settings(provider=args.provider, host=None if args.provider == "shm" else "127.0.0.1")
    rdv.set("settings", settings.to_json())
    console = Console()
    async with aiote.TransferEngine(settings.provider, host=settings.host) as eng:
        client = Client(eng, await rdv.get("router"), log)
        await client.start()

        def ready() -> bool:
            live = [w for w in client.workers.values() if w["state"] in ("joined", "active")]
            return (sum(w["role"] == "prefill" for w in live) >= args.prefill
                    and sum(w["role"] == "decode" for w in live) >= args.decode)

        with console.status("waiting for the workers to join…"):
            if not ready():  # the roster came with the welcome; joins after it come as events
                await client.wait_event(lambda _e: ready(), timeout=120)
        workload = make_workload(args.requests, settings.model, args.seed)
        t0 = time.perf_counter()
        done = await run_load(client, workload, args.concurrency)
        wall = time.perf_counter() - t0
        stats = await client.stats()
        await client.shutdown()
        await client.close()
    summary = summarize(done, stats, wall)
    bad = check_reference(settings.model, workload, [c.tokens for c in done])
    summary["mismatches"] = bad
    render(console, summary, DemoOptions(provider=args.provider, requests=args.requests), bad, log_file)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if not bad and len(done) == len(workload) else 1


