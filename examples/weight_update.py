"""RL weight updates with aiote.weights: trainer ranks write straight into inference memory.

Ranks 0..T-1 are trainers holding FSDP shards (fp32, dim 0 split); ranks T.. are inference
ranks holding tensor-parallel shards (fused QKV and gate/up column-parallel, o/down row-parallel,
norms replicated) in bf16, with gate/up/down in fp8 e4m3 (per-tensor scales).  Every step the
trainers "train" (a deterministic change), push version v, and the inference ranks swap to it
once all of its bytes are in; each inference rank checks it bit for bit against a relayout of
the full model.

    python examples/weight_update.py                      # spawns 2 trainers + 3 inference ranks here
    torchrun --nnodes ... --nproc-per-node ... examples/weight_update.py --trainers 2   # same code across hosts

Descriptors are exchanged through the torchrun store (``aiote.rendezvous.from_env``); without
torchrun the script starts the processes itself on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import os
import pickle
import socket
import sys
import time

import torch

import aiote
from aiote.weights import FP8_MAX, Layout, Param, Replicate, Schedule, Shard, WeightReceiver, WeightSender

HIDDEN, LAYERS = 256, 2


def model(trainers: int, inference: int) -> Schedule:
    params, place, fused = [], {}, {}
    for i in range(LAYERS):
        L = f"layers.{i}."
        h, f = HIDDEN, 4 * HIDDEN
        params += [Param(L + n, s) for n, s in (("q", (h, h)), ("k", (h // 2, h)), ("v", (h // 2, h)), ("o", (h, h)),
                                                ("gate", (f, h)), ("up", (f, h)), ("down", (h, f)), ("norm", (h,)))]
        place.update({L + "o": Shard(1), L + "down": Shard(1), L + "norm": Replicate()})
        fused.update({L + "qkv": [L + "q", L + "k", L + "v"], L + "gate_up": [L + "gate", L + "up"]})
    fp8 = [p.name for p in params if p.name.endswith(("gate", "up", "down"))]
    return Schedule(params, Layout.sharded(params, trainers), Layout.sharded(params, inference, place, fused),
                    dtype=torch.bfloat16, fp8=fp8)


def full_weights(sched: Schedule, step: int) -> dict[str, torch.Tensor]:
    """The model after ``step`` training steps (deterministic, so every rank can check)."""
    g = torch.Generator().manual_seed(0)
    return {p.name: torch.randn(p.shape, generator=g) * (1 + 0.1 * step) for p in sched.params}


def reference(sched: Schedule, step: int, rank: int) -> dict[str, torch.Tensor]:
    """What inference rank ``rank`` must hold after ``step``: the documented casts, then its pieces."""
    full = full_weights(sched, step)
    cast = {}
    for n, t in full.items():
        if n in sched.fp8:
            amax = t.abs().max()
            s = amax / FP8_MAX if amax > 0 else torch.tensor(1.0)
            cast[n] = torch.clamp(t / s, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        else:
            cast[n] = t.to(torch.bfloat16)
    out = {}
    for lt in sched.inference.ranks[rank]:
        parts = [cast[pc.param][tuple(slice(lo, hi) for lo, hi in pc.box)] for pc in lt.pieces]
        out[lt.name] = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out


async def run(args: argparse.Namespace) -> None:
    group = await asyncio.to_thread(aiote.rendezvous.from_env)
    rank, world, nt = group.rank, group.world_size, args.trainers
    sched = model(nt, world - nt)
    host = "127.0.0.1" if args.provider == "tcp" else None
    async with aiote.TransferEngine(args.provider, host=host) as eng:
        if rank < nt:
            shards = {lt.name: torch.zeros(lt.shape) for lt in sched.trainers.ranks[rank]}
            side: WeightSender | WeightReceiver = WeightSender(eng, sched, rank, shards)
        else:
            side = WeightReceiver(eng, sched, rank - nt)
        everyone = [pickle.loads(b) for b in await group.exchange("weights", pickle.dumps(side.buffers))]
        senders, receivers = everyone[:nt], everyone[nt:]
        if isinstance(side, WeightSender):
            side.connect(receivers, senders)
        else:
            side.connect(senders)
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            if isinstance(side, WeightSender):
                full = full_weights(sched, step)  # "training": the new parameters, this rank's shard
                for lt in sched.trainers.ranks[rank]:
                    (lo, hi), = lt.pieces[0].box[:1]
                    shards[lt.name].copy_(full[lt.name][lo:hi])
                await side.push(step, timeout=60)
            else:
                new = await side.receive(step, timeout=60)
                want = reference(sched, step, rank - nt)
                same = all(torch.equal(new[n].view(torch.uint8), want[n].view(torch.uint8)) for n in want)
                nbytes = sum(t.numel() * t.element_size() for t in new.values())
                print(f"inference rank {rank - nt}: version {step} in service, {len(new)} tensors, "
                      f"{nbytes / 1e6:.1f} MB, {(time.perf_counter() - t0) * 1e3:.1f} ms, "
                      f"{'bit-equal to the reference' if same else 'MISMATCH'}", flush=True)
                if not same:
                    raise SystemExit(1)
    await group.leave()


def _spawned(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    asyncio.run(run(parse(argv)))


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", default="shm")
    ap.add_argument("--trainers", type=int, default=2)
    ap.add_argument("--inference", type=int, default=3, help="without torchrun: inference ranks to start")
    ap.add_argument("--steps", type=int, default=3)
    return ap.parse_args(argv)


def main() -> None:
    args = parse(sys.argv[1:])
    if "RANK" in os.environ:  # torchrun
        asyncio.run(run(args))
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = args.trainers + args.inference
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_spawned, args=(r, world, port, sys.argv[1:])) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [r for r, p in enumerate(procs) if p.exitcode]
    if bad:
        raise SystemExit(f"ranks {bad} failed")
    per = sum(math.prod(p.shape) for p in model(args.trainers, args.inference).params)
    print(f"OK: {args.steps} versions of a {per / 1e6:.1f} M-parameter model, {args.trainers} trainers -> "
          f"{args.inference} inference ranks ({args.provider})")


if __name__ == "__main__":
    main()
