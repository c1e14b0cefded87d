"""RL weight update: time per round, 2 trainer -> 2 inference processes on loopback.

One run, side by side:

* **aiote** (``aiote.weights``): FSDP-sharded fp32 trainer params (dim 0 over 2 ranks) written
  as bf16 (optionally some as fp8) into tensor-parallel inference buffers (TP 2: fused QKV and
  gate/up column-parallel, o/down row-parallel, norms replicated), per provider;
* **floor**: the round's bytes over the raw C program's throughput on the same provider
  (``fi_bench bw 64M``, delivery-complete; on shm also with glibc huge pages, the better one);
* **gloo**: what users do today: trainers cast, gather to trainer 0 (gloo), which assembles the
  full model and ``torch.distributed.broadcast`` s it (gloo) to the inference ranks, which cut
  their shards.

A round is timed from the earliest process starting it to the last one finishing it
(CLOCK_MONOTONIC is shared by the processes); two warm-up rounds touch every buffer first.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _common as C  # noqa: E402

TRAINERS, RECEIVERS = 2, 2


def model(gb: float, hidden: int):
    """Transformer-like parameters totalling about ``gb`` GB in bf16."""
    from aiote.weights import Layout, Param, Replicate, Shard

    ffn = 4 * hidden
    per_layer = 4 * hidden * hidden + 3 * ffn * hidden + 2 * hidden
    layers = max(1, round(gb * 1e9 / 2 / per_layer))
    params, place, fused = [], {}, {}
    for i in range(layers):
        L = f"l{i}."
        params += [Param(L + "q", (hidden, hidden)), Param(L + "k", (hidden, hidden)), Param(L + "v", (hidden, hidden)),
                   Param(L + "o", (hidden, hidden)), Param(L + "gate", (ffn, hidden)), Param(L + "up", (ffn, hidden)),
                   Param(L + "down", (hidden, ffn)), Param(L + "norm1", (hidden,)), Param(L + "norm2", (hidden,))]
        place.update({L + "o": Shard(1), L + "down": Shard(1), L + "norm1": Replicate(), L + "norm2": Replicate()})
        fused[L + "qkv"] = [L + "q", L + "k", L + "v"]
        fused[L + "gate_up"] = [L + "gate", L + "up"]
    trainers = Layout.sharded(params, TRAINERS)
    inference = Layout.sharded(params, RECEIVERS, place, fused)
    return params, trainers, inference


def schedule(args):
    import torch

    from aiote.weights import Schedule

    params, trainers, inference = model(args.gb, args.hidden)
    fp8 = [p.name for p in params if args.fp8 and p.name.endswith(("gate", "up", "down"))]
    src = torch.bfloat16 if args.trainer_dtype == "bf16" else None
    return Schedule(params, trainers, inference, dtype=torch.bfloat16, fp8=fp8, chunk_bytes=args.chunk_mb << 20,
                    source_dtype=src)


# ------------------------------------------------------------------ aiote


def _aiote_main(role, rank, provider, args, conn):
    import torch

    import aiote
    from aiote.weights import WeightReceiver, WeightSender

    torch.set_num_threads(1)

    async def main():
        host = "127.0.0.1" if provider == "tcp" else None
        kw = {"direct_max": args.direct_mb << 20} if args.direct_mb and role == "t" and provider == "shm" else {}
        async with aiote.TransferEngine(provider, host=host, **kw) as eng:
            sched = schedule(args)
            if role == "t":
                g = torch.Generator().manual_seed(rank)
                dt = torch.bfloat16 if args.trainer_dtype == "bf16" else torch.float32
                # the trainer's weights in 2 MiB pages, like the other buffers (and the raw C floor's
                # glibc-THP run): shm's single-copy transfer runs ~2x faster from them
                shards = {}
                for lt in sched.trainers.ranks[rank]:
                    n = math.prod(lt.shape) * torch.empty(0, dtype=dt).element_size()
                    t = torch.frombuffer(aiote.host_buffer(max(n, 1)), dtype=torch.uint8)[:n].view(dt).view(lt.shape)
                    t.copy_(torch.empty(lt.shape).uniform_(-1, 1, generator=g))
                    shards[lt.name] = t
                side = WeightSender(eng, sched, rank, shards)
            else:
                side = WeightReceiver(eng, sched, rank)
            conn.send(side.buffers)
            peers = conn.recv()
            side.connect(*peers) if role == "t" else side.connect(peers[1])
            loop = asyncio.get_running_loop()
            while True:
                msg = await loop.run_in_executor(None, conn.recv)
                if msg is None:
                    break
                t0 = time.monotonic()
                if role == "t":
                    await side.push(msg, timeout=600)
                    stats = dict(side.last_stats)
                else:
                    await side.receive(msg, timeout=600)
                    stats = {}
                conn.send((t0, time.monotonic(), stats))

    asyncio.run(main())


def _recv(conn, procs):
    """A child's next message; fail fast (not hang) if any child died."""
    while not conn.poll(1.0):
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead:
            raise RuntimeError(f"a benchmark process died (exit codes {[p.exitcode for p in dead]})")
    return conn.recv()


def run_aiote(provider, args):
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    for role, n in (("t", TRAINERS), ("r", RECEIVERS)):
        for rank in range(n):
            a, b = ctx.Pipe()
            p = ctx.Process(target=_aiote_main, args=(role, rank, provider, args, b), daemon=True)
            p.start()
            procs.append(p)
            pipes.append(a)
    bufs = [_recv(c, procs) for c in pipes]
    senders, receivers = bufs[:TRAINERS], bufs[TRAINERS:]
    for c in pipes:
        c.send((receivers, senders))
    times, stats = [], []
    try:
        for v in range(1, 3 + args.rounds):
            for c in pipes:
                c.send(v)
            out = [_recv(c, procs) for c in pipes]
            if v > 2:
                times.append(max(o[1] for o in out) - min(o[0] for o in out))
                stats.append([o[2] for o in out[:TRAINERS]])
    finally:
        for c in pipes:
            c.send(None)
        for p in procs:
            p.join(60)
    return times, stats


# ------------------------------------------------------------------ gloo


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_main(rank, port, args, conn):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    world = TRAINERS + RECEIVERS
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    sched = schedule(args)
    params = sched.params
    trainer_group = dist.new_group(list(range(TRAINERS)))
    bcast_group = dist.new_group([0] + list(range(TRAINERS, world)))
    is_trainer = rank < TRAINERS
    if is_trainer:
        g = torch.Generator().manual_seed(rank)
        dt = torch.bfloat16 if args.trainer_dtype == "bf16" else torch.float32
        shards = {lt.name: torch.empty(lt.shape).uniform_(-1, 1, generator=g).to(dt)
                  for lt in sched.trainers.ranks[rank]}
        shard_numel = [sum(math.prod(lt.shape) for lt in sched.trainers.ranks[t]) for t in range(TRAINERS)]
    total = sum(math.prod(p.shape) for p in params)
    full = torch.empty(total, dtype=torch.bfloat16) if rank == 0 or not is_trainer else None
    if not is_trainer:
        mine = {lt.name: torch.empty(lt.shape, dtype=torch.bfloat16) for lt in sched.inference.ranks[rank - TRAINERS]}
    conn.send("ready")
    while True:
        v = conn.recv()
        if v is None:
            break
        dist.barrier()
        t0 = time.monotonic()
        if is_trainer:
            flat = torch.cat([shards[lt.name].reshape(-1) for lt in sched.trainers.ranks[rank]]).to(torch.bfloat16)
            pad = max(shard_numel)
            flat = torch.nn.functional.pad(flat, (0, pad - flat.numel()))
            gathered = [torch.empty(pad, dtype=torch.bfloat16) for _ in range(TRAINERS)] if rank == 0 else None
            dist.gather(flat, gathered, dst=0, group=trainer_group)
            if rank == 0:  # assemble the full model: parameter by parameter, trainer shards in order
                pos = 0
                offs = [0] * TRAINERS
                for p in params:
                    for t in range(TRAINERS):
                        n = [math.prod(lt.shape) for lt in sched.trainers.ranks[t] if lt.name == p.name][0]
                        full[pos:pos + n] = gathered[t][offs[t]:offs[t] + n]
                        offs[t] += n
                        pos += n
        if rank == 0 or not is_trainer:
            dist.broadcast(full, src=0, group=bcast_group)
        if not is_trainer:  # cut this rank's tensor-parallel pieces out of the full model
            pos, where = 0, {}
            for p in params:
                where[p.name] = (pos, p.shape)
                pos += math.prod(p.shape)
            for lt in sched.inference.ranks[rank - TRAINERS]:
                for pc in lt.pieces:
                    off, shape = where[pc.param]
                    src = full[off:off + math.prod(shape)].view(shape)
                    dst = mine[lt.name]
                    for d, ((lo, hi), at) in enumerate(zip(pc.box, pc.at)):
                        src = src.narrow(d, lo, hi - lo)
                        dst = dst.narrow(d, at, hi - lo)
                    dst.copy_(src)
        conn.send((t0, time.monotonic()))
    dist.destroy_process_group()


def run_gloo(args):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs, pipes = [], []
    for rank in range(TRAINERS + RECEIVERS):
        a, b = ctx.Pipe()
        p = ctx.Process(target=_gloo_main, args=(rank, port, args, b), daemon=True)
        p.start()
        procs.append(p)
        pipes.append(a)
    for c in pipes:
        _recv(c, procs)
    times = []
    try:
        for v in range(1, 2 + args.rounds):
            for c in pipes:
                c.send(v)
            out = [_recv(c, procs) for c in pipes]
            if v > 1:
                times.append(max(o[1] for o in out) - min(o[0] for o in out))
    finally:
        for c in pipes:
            c.send(None)
        for p in procs:
            p.join(60)
    return times


# ------------------------------------------------------------------ floor


def raw_gbps(provider):
    C.ensure_fi_bench()
    out = {"4k": C.fi_bench(provider, "bw", 64 << 20, 32, 8, 1, timeout=120)["gbps"]}
    if provider == "shm":
        old = os.environ.get("GLIBC_TUNABLES")
        os.environ["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
        try:
            out["thp"] = C.fi_bench(provider, "bw", 64 << 20, 32, 8, 1, timeout=120)["gbps"]
        finally:
            if old is None:
                os.environ.pop("GLIBC_TUNABLES")
            else:
                os.environ["GLIBC_TUNABLES"] = old
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--providers", default="shm,tcp")
    ap.add_argument("--gb", type=float, default=2.0, help="model size in bf16 GB (default 2)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per system (after warm-up)")
    ap.add_argument("--chunk-mb", type=int, default=64, help="trainers cast this much before posting its writes")
    ap.add_argument("--fp8", action="store_true", help="send gate/up/down as fp8 e4m3 (per-tensor scales)")
    ap.add_argument("--trainer-dtype", choices=["fp32", "bf16"], default="fp32",
                    help="what the trainers hold: fp32 (cast to bf16 every round) or bf16 (blocks contiguous in "
                         "the shard are written from it, zero copy)")
    ap.add_argument("--direct-mb", type=int, default=0,
                    help="shm: trainers' engines copy writes up to this size themselves (direct_max; 0: the "
                         "engine's default, 4 MiB)")
    ap.add_argument("--no-gloo", action="store_true")
    args = ap.parse_args()
    con = C.console()
    info = C.machine_info()
    C.header(con, "RL weight update: 2 trainers -> 2 inference ranks", info)
    sched = schedule(args)
    summ = sched.summary()
    con.print(f"model: {len(sched.params)} params, {summ['bytes'] / 1e9:.2f} GB per round on the wire "
              f"({'fp8 gate/up/down, ' if args.fp8 else ''}bf16 otherwise), {summ['writes']} writes in "
              f"{summ['calls']} paged calls; chunk {args.chunk_mb} MiB; trainers hold {args.trainer_dtype}: "
              f"{summ['direct_bytes'] / 1e9:.2f} GB zero copy, {summ['staging_bytes'] / 1e9:.2f} GB staged; "
              f"trainer direct_max {args.direct_mb or 4} MiB")
    results = {"args": vars(args), "summary": summ, "machine": info, "systems": {}}
    rows = []
    for prov in args.providers.split(","):
        raw = raw_gbps(prov)
        best = max(raw.values())
        floor = summ["bytes"] / (best * 1e9)
        times, stats = run_aiote(prov, args)
        med = statistics.median(times)
        cast = statistics.median(max(s["cast_s"] for s in st) for st in stats)
        results["systems"][f"aiote-{prov}"] = {"times": times, "raw_gbps": raw, "floor_s": floor, "stats": stats}
        rows.append((f"aiote {prov}", med, min(times), max(times), floor, cast, summ["bytes"] / med / 1e9,
                     " / ".join(f"{k} {v:.2f}" for k, v in raw.items())))
    if not args.no_gloo:
        times = run_gloo(args)
        results["systems"]["gloo"] = {"times": times}
        med = statistics.median(times)
        rows.append(("gather + gloo broadcast", med, min(times), max(times), None, None, None, ""))
    from rich.table import Table

    tab = Table(title=f"time per update, median of {args.rounds} (min–max)")
    for col in ("system", "s / update", "min–max", "floor s", "× floor", "cast s (trainer)", "GB/s", "raw C GB/s"):
        tab.add_column(col, justify="right")
    gloo_med = rows[-1][1] if not args.no_gloo else None
    for name, med, lo, hi, floor, cast, gbps, raw in rows:
        tab.add_row(name, f"{med:.3f}", f"{lo:.3f}–{hi:.3f}", f"{floor:.3f}" if floor else "",
                    f"{med / floor:.2f}" if floor else "", f"{cast:.3f}" if cast is not None else "",
                    f"{gbps:.2f}" if gbps else "", raw)
    con.print(tab)
    if gloo_med:
        for name, med, *_ in rows[:-1]:
            con.print(f"{name}: {gloo_med / med:.2f}× faster than gather + gloo broadcast")
    path = C.write_results("weights", results)
    con.print(f"results: {C.rel(path)}")


if __name__ == "__main__":
    main()
