"""RL weight updates (aiote.weights): schedules checked against an independent relayout, then
2 trainer processes -> 3 inference processes with different sharding (fused QKV, row/column
parallel, replicated, fp8) on real engines: bit-equal after every round, overlapping rounds
refused, a trainer dying mid-round fails the round and the old weights stay in service, a dead
receiver fails the trainers' push without holding back the live receivers."""

import asyncio
import glob
import itertools
import multiprocessing as mp
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from aiote.errors import InvalidArgument, UpdateFailed, UpdateInProgress  # noqa: E402
from aiote.weights import FP8_MAX, Layout, Param, Replicate, Schedule, Shard  # noqa: E402

# ------------------------------------------------------------------ an independent reference


def chunk_rows(n, world, r):
    c = -(-n // world)
    lo = min(r * c, n)
    return lo, min(lo + c, n)


def reference_local(full, placements, fused, world, r):
    """Rank r's local tensors, built with narrow/cat (not the schedule's box arithmetic)."""
    out, done = {}, set()
    fused_of = {p: f for f, parts in fused.items() for p in parts}
    for name in full:
        if name in done:
            continue
        group = fused[fused_of[name]] if name in fused_of else [name]
        parts = []
        for n in group:
            pl = placements.get(n, Shard(0))
            t = full[n]
            if isinstance(pl, Shard):
                lo, hi = chunk_rows(t.shape[pl.dim], world, r)
                t = t.narrow(pl.dim, lo, hi - lo)
            parts.append(t)
        out[fused_of.get(name, name)] = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
        done.update(group)
    return out


def quantize(full, dtype, fp8):
    """The documented casts: bf16 as torch casts; fp8 = clamp(x / (amax/448), ±448) with a
    per-tensor scale over the whole parameter."""
    out, scales = {}, {}
    for n, t in full.items():
        if n in fp8:
            amax = t.abs().max().float()
            s = amax / FP8_MAX if amax > 0 else torch.tensor(1.0)
            out[n] = torch.clamp(t.float() / s, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            scales[n] = float(s)
        else:
            out[n] = t.to(dtype)
    return out, scales


def simulate(sched, trainer_shards):
    """Move the bytes the schedule says, with plain memcpy: the receivers' buffers."""
    bufs = [np.zeros(n, np.uint8) for n in sched.receiver_bytes]
    for t, plan in enumerate(sched.plans):
        staging = np.zeros(plan.staging_bytes, np.uint8)
        for segments in plan.chunks:  # what the trainer casts: boxes of its shards, contiguous
            for seg in segments:
                box = tuple(slice(a, a + n) for a, n in zip(seg.at, seg.ext))
                raw = trainer_shards[t][seg.tensor][box].contiguous().view(torch.uint8).numpy().reshape(-1)
                assert raw.size == seg.nbytes
                staging[seg.offset:seg.offset + seg.nbytes] = raw
        names = [lt.name for lt in sched.trainers.ranks[t]]
        for w in [*plan.direct, *(w for ws in plan.writes for w in ws)]:
            src = staging if w.source < 0 else \
                trainer_shards[t][names[w.source]].contiguous().view(torch.uint8).numpy().reshape(-1)
            for s, d in zip(w.src, w.dst):
                bufs[w.receiver][d:d + w.page_len] = src[s:s + w.page_len]
    return bufs


def views(sched, i, buf):
    out = {}
    for lt in sched.inference.ranks[i]:
        off = sched.receiver_offsets[i][lt.name]
        dt = sched.dtype_of(lt.pieces[0].param)
        n = int(np.prod(lt.shape)) * torch.empty(0, dtype=dt).element_size()
        raw = torch.from_numpy(buf[off:off + n].copy())
        out[lt.name] = raw.view(dt).view(lt.shape) if n else torch.empty(lt.shape, dtype=dt)
    return out


def bits(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("direct", [False, True], ids=["staged", "zero-copy"])
@pytest.mark.parametrize("seed", range(16))
def test_schedule_moves_every_byte_like_the_reference(seed, direct):
    rng = np.random.default_rng(seed)
    nt, ni = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    params, placements, fused = [], {}, {}
    for k in range(int(rng.integers(2, 7))):
        shape = tuple(int(x) for x in rng.integers(1, 13, size=int(rng.integers(1, 4))))
        params.append(Param(f"p{k}", shape))
        placements[f"p{k}"] = [Shard(0), Replicate(), Shard(len(shape) - 1)][int(rng.integers(0, 3))]
    # a fused QKV-like group: three params agreeing beyond dim 0
    rest = tuple(int(x) for x in rng.integers(1, 9, size=int(rng.integers(0, 3))))
    for n in "qkv":
        params.append(Param(n, (int(rng.integers(1, 10)),) + rest))
        placements[n] = Shard(0)
    fused["qkv"] = ["q", "k", "v"]
    full = {p.name: torch.randn(p.shape, generator=torch.Generator().manual_seed(seed * 100 + i))
            for i, p in enumerate(params)}
    tplace = {p.name: Shard(int(rng.integers(0, len(p.shape)))) for p in params}  # FSDP-like, any dim
    trainers = Layout.sharded(params, nt, tplace)
    inference = Layout.sharded(params, ni, placements, fused)
    sched = Schedule(params, trainers, inference, dtype=torch.bfloat16, chunk_bytes=int(rng.integers(8, 200)),
                     source_dtype=torch.bfloat16 if direct else None)
    assert (sched.summary()["direct_bytes"] > 0) == direct
    cast, _ = quantize(full, torch.bfloat16, ())
    shards = [reference_local(cast, tplace, {}, nt, t) for t in range(nt)]
    bufs = simulate(sched, shards)
    for i in range(ni):
        want = reference_local(cast, placements, fused, ni, i)
        got = views(sched, i, bufs[i])
        assert set(got) == set(want)
        for n in want:
            assert torch.equal(bits(got[n]), bits(want[n])), (seed, i, n)
    assert sched.summary()["writes"] == sum(c for e in sched.expected for c in e.values())


def test_schedule_coalesces_contiguous_runs():
    # column-parallel (dim 0) on both sides: one write per (trainer, receiver) overlap
    params = [Param("w", (1024, 256))]
    sched = Schedule(params, Layout.sharded(params, 2), Layout.sharded(params, 4), chunk_bytes=1 << 30)
    assert sched.summary()["writes"] == 4
    # row-parallel on the inference side: the trainer stages each receiver's block contiguously,
    # which lands as one write per (trainer, receiver), not one per row
    inf = Layout.sharded(params, 2, {"w": Shard(1)})
    s2 = Schedule(params, Layout.sharded(params, 2), inf, chunk_bytes=1 << 30)
    assert s2.summary()["writes"] == 4 and s2.summary()["calls"] == 4
    # ... unless the receiver's own layout is strided: dim-1 trainer shards into dim-0 receivers
    s3 = Schedule(params, Layout.sharded(params, 2, default=Shard(1)), Layout.sharded(params, 2),
                  chunk_bytes=1 << 30)
    assert s3.summary()["writes"] == 2 * 1024 and s3.summary()["calls"] == 4
    # adjacent replicated tensors become one run
    small = [Param("a", (64,)), Param("b", (64,))]
    s4 = Schedule(small, Layout.sharded(small, 1), Layout.sharded(small, 1, default=Replicate()))
    assert s4.summary()["writes"] == 1
    # a replicated parameter is staged once for all receivers
    s5 = Schedule(small, Layout.sharded(small, 1), Layout.sharded(small, 3, default=Replicate()))
    assert s5.plans[0].staging_bytes == 2 * 64 * 2 and s5.summary()["writes"] == 3


def test_schedule_rejects_bad_layouts():
    params = [Param("w", (8, 8)), Param("b", (8,))]
    with pytest.raises(InvalidArgument, match="partition"):
        Schedule(params, Layout.sharded(params, 2, default=Replicate()), Layout.sharded(params, 2))
    with pytest.raises(InvalidArgument, match="unknown"):
        Layout.sharded(params, 2, {"nope": Shard(0)})
    with pytest.raises(InvalidArgument, match="dim"):
        Layout.sharded(params, 2, {"b": Shard(1)})
    with pytest.raises(InvalidArgument, match="agree beyond dim 0"):
        Layout.sharded(params, 2, fused={"wb": ["w", "b"]})
    with pytest.raises(InvalidArgument, match="fp8"):
        Schedule(params, Layout.sharded(params, 2), Layout.sharded(params, 2), fp8=["x"])
    with pytest.raises(InvalidArgument, match="mixes fp8"):
        p2 = [Param("x", (4, 4)), Param("y", (4, 4))]
        Schedule(p2, Layout.sharded(p2, 1), Layout.sharded(p2, 1, fused={"xy": ["x", "y"]}), fp8=["x"])


async def test_sender_and_receiver_refuse_bad_input(aiote_provider, aiote_host):
    import aiote
    from aiote.weights import WeightReceiver, WeightSender

    params = [Param("w", (8, 8))]
    sched = Schedule(params, Layout.sharded(params, 1), Layout.sharded(params, 1))
    async with aiote.TransferEngine(aiote_provider, host=aiote_host) as eng:
        with pytest.raises(InvalidArgument, match="shape"):
            WeightSender(eng, sched, 0, {"w": torch.zeros(4, 8)})
        with pytest.raises(InvalidArgument, match="no shard"):
            WeightSender(eng, sched, 0, {})
        with pytest.raises(InvalidArgument, match="rank"):
            WeightReceiver(eng, sched, 3)
        snd = WeightSender(eng, sched, 0, {"w": torch.zeros(8, 8)})
        rcv = WeightReceiver(eng, sched, 0)
        with pytest.raises(InvalidArgument, match="connect"):
            await snd.push(1)
        with pytest.raises(InvalidArgument, match="one entry per rank"):
            rcv.connect([])
        snd.connect([rcv.buffers], [snd.buffers])
        rcv.connect([snd.buffers])
        full = torch.randn(8, 8)
        snd._shards["w"].copy_(full)
        got, _ = await asyncio.gather(rcv.receive(1, timeout=30), snd.push(1, timeout=30))
        assert torch.equal(got["w"], full.to(torch.bfloat16)) and rcv.version == 1
        with pytest.raises(InvalidArgument, match="not newer"):
            await rcv.receive(1)
        with pytest.raises(InvalidArgument, match="not newer"):
            await snd.push(0)
        # a receive in flight refuses a second one; cancelling it fails nothing else
        first = asyncio.ensure_future(rcv.receive(2, timeout=30))
        await asyncio.sleep(0)
        with pytest.raises(UpdateInProgress):
            await rcv.receive(3)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert torch.equal(rcv.weights["w"], full.to(torch.bfloat16)) and rcv.version == 1
        # nobody pushes version 4: the round times out, typed, and version 1 stays in service
        with pytest.raises(UpdateFailed) as ei:
            await rcv.receive(4, timeout=0.2)
        assert isinstance(ei.value.__cause__, aiote.ImmTimeout) and ei.value.peer == 0 and ei.value.version == 4
        assert torch.equal(rcv.weights["w"], full.to(torch.bfloat16)) and rcv.version == 1


async def test_zero_copy_when_the_shards_are_already_bf16(aiote_provider, aiote_host):
    import aiote
    from aiote.weights import WeightReceiver, WeightSender

    params = [Param("w", (64, 32)), Param("o", (32, 64))]
    sched = Schedule(params, Layout.sharded(params, 1), Layout.sharded(params, 2, {"o": Shard(1)}),
                     source_dtype=torch.bfloat16, chunk_bytes=1024)
    summ = sched.summary()
    assert summ["direct_bytes"] == 64 * 32 * 2  # w: column-parallel rows, straight from the shard
    assert summ["staging_bytes"] == 32 * 64 * 2  # o: row-parallel blocks, gathered in staging
    async with aiote.TransferEngine(aiote_provider, host=aiote_host) as eng:
        with pytest.raises(InvalidArgument, match="contiguous torch.bfloat16"):
            WeightSender(eng, sched, 0, {"w": torch.zeros(64, 32), "o": torch.zeros(32, 64, dtype=torch.bfloat16)})
        full = {"w": torch.randn(64, 32).to(torch.bfloat16), "o": torch.randn(32, 64).to(torch.bfloat16)}
        snd = WeightSender(eng, sched, 0, {k: v.clone() for k, v in full.items()})
        rcvs = [WeightReceiver(eng, sched, i) for i in range(2)]
        snd.connect([r.buffers for r in rcvs], [snd.buffers])
        for r in rcvs:
            r.connect([snd.buffers])
        for version in (1, 2):
            new = {k: v + version for k, v in full.items()}
            await asyncio.gather(snd.push(version, shards=new, timeout=30),
                                 *(r.receive(version, timeout=30) for r in rcvs))
            for i, r in enumerate(rcvs):
                want = reference_local(new, {"o": Shard(1)}, {}, 2, i)
                assert all(torch.equal(r.weights[n], want[n]) for n in want), (version, i)


# ------------------------------------------------------------------ processes

TRAINERS, RECEIVERS = 2, 3
PARAMS = [Param("embed", (50, 16)), Param("q", (24, 16)), Param("k", (12, 16)), Param("v", (12, 16)),
          Param("o", (16, 24)), Param("up", (40, 16)), Param("down", (16, 40)), Param("norm", (16,))]
PLACE = {"o": Shard(1), "down": Shard(1), "norm": Replicate()}
FUSED = {"qkv": ["q", "k", "v"]}
FP8 = ["up", "down"]


def make_schedule():
    return Schedule(PARAMS, Layout.sharded(PARAMS, TRAINERS), Layout.sharded(PARAMS, RECEIVERS, PLACE, FUSED),
                    dtype=torch.bfloat16, fp8=FP8, chunk_bytes=1024)


def full_weights(version):
    g = torch.Generator().manual_seed(version)
    return {p.name: torch.randn(p.shape, generator=g) * (1 + version) for p in PARAMS}


def expected(version, rank):
    cast, scales = quantize(full_weights(version), torch.bfloat16, FP8)
    return reference_local(cast, PLACE, FUSED, RECEIVERS, rank), scales


async def _serve(conn, handle):
    """Run the commands the test sends; each reply is (request id, ok, value)."""
    loop = asyncio.get_running_loop()
    inbox = asyncio.Queue()
    loop.add_reader(conn.fileno(), lambda: inbox.put_nowait(conn.recv()))
    tasks = set()

    async def run(rid, cmd, args):
        try:
            conn.send((rid, True, await handle(cmd, *args)))
        except BaseException as e:  # noqa: BLE001 - reported to the test, typed
            conn.send((rid, False, (type(e).__name__, str(e), getattr(e, "peer", None),
                                    type(e.__cause__).__name__ if e.__cause__ else None)))

    while True:
        rid, cmd, args = await inbox.get()
        if cmd == "exit":
            break
        t = asyncio.ensure_future(run(rid, cmd, args))
        tasks.add(t)
        t.add_done_callback(tasks.discard)


async def _second_is_refused(start, version):
    """Start a round, then another while it is in flight: "refused" if the second raised
    UpdateInProgress (the first is then cancelled)."""
    first = asyncio.ensure_future(start(version))
    await asyncio.sleep(0)  # let the first one begin
    try:
        await start(version + 1)
    except UpdateInProgress:
        first.cancel()
        return "refused"
    return "accepted"


def _trainer_main(rank, provider, conn, die_after_writes):
    import aiote
    from aiote.weights import WeightSender

    async def main():
        host = "127.0.0.1" if provider == "tcp" else None
        async with aiote.TransferEngine(provider, host=host, peer_timeout=2.0) as eng:
            sched = make_schedule()
            mine = {lt.name: torch.zeros(lt.shape) for lt in sched.trainers.ranks[rank]}
            snd = WeightSender(eng, sched, rank, mine)
            if die_after_writes is not None:  # dies mid-round, some writes posted
                count = itertools.count()
                real = eng.write_paged

                def write_paged(*a, **k):
                    if next(count) == die_after_writes:
                        os._exit(3)
                    return real(*a, **k)

                eng.write_paged = write_paged
            conn.send(snd.buffers)

            async def handle(cmd, *args):
                if cmd == "connect":
                    snd.connect(*args)
                elif cmd == "push":
                    version, = args
                    full = full_weights(version)
                    for lt in sched.trainers.ranks[rank]:
                        lo, hi = chunk_rows(full[lt.name].shape[0], TRAINERS, rank)
                        mine[lt.name].copy_(full[lt.name][lo:hi])
                    await snd.push(version, timeout=60)
                elif cmd == "push2":  # two pushes at once: the second must be refused
                    return await _second_is_refused(lambda v: snd.push(v, timeout=60), args[0])
                return None

            await _serve(conn, handle)

    asyncio.run(main())


def _receiver_main(rank, provider, conn):
    import aiote
    from aiote.weights import WeightReceiver

    async def main():
        host = "127.0.0.1" if provider == "tcp" else None
        async with aiote.TransferEngine(provider, host=host, peer_timeout=2.0) as eng:
            rcv = WeightReceiver(eng, make_schedule(), rank)
            conn.send(rcv.buffers)

            def check(version):
                want, scales = expected(version, rank)
                got = rcv.weights
                same = set(got) == set(want) and all(torch.equal(bits(got[n]), bits(want[n])) for n in want)
                return same and rcv.version == version and rcv.scales == scales

            async def handle(cmd, *args):
                if cmd == "connect":
                    rcv.connect(*args)
                elif cmd == "receive":
                    await rcv.receive(args[0], timeout=60)
                    return check(args[0])
                elif cmd == "check":
                    return check(args[0])
                elif cmd == "receive2":
                    return await _second_is_refused(lambda v: rcv.receive(v, timeout=60), args[0])
                return None

            await _serve(conn, handle)

    asyncio.run(main())


class Proc:
    ids = itertools.count()

    def __init__(self, ctx, target, *args):
        self.conn, child = ctx.Pipe()
        self.p = ctx.Process(target=target, args=(*args[:2], child, *args[2:]), daemon=True)
        self.p.start()
        self.replies = {}
        self.buffers = self.get(None, timeout=120)

    def call(self, cmd, *args):
        rid = next(self.ids)
        self.conn.send((rid, cmd, args))
        return rid

    def get(self, rid, timeout=90):
        while rid not in self.replies:
            if not self.conn.poll(timeout):
                raise TimeoutError(f"no reply to {rid} within {timeout} s")
            msg = self.conn.recv()
            if rid is None:
                return msg
            self.replies[msg[0]] = msg[1:]
        return self.replies.pop(rid)

    def close(self):
        try:
            self.conn.send((None, "exit", ()))
        except (BrokenPipeError, OSError):
            pass
        self.p.join(10)
        if self.p.is_alive():
            self.p.kill()


def test_rounds_overlap_and_trainer_death(aiote_provider):
    ctx = mp.get_context("spawn")
    trainers = [Proc(ctx, _trainer_main, t, aiote_provider, None) for t in range(TRAINERS)]
    receivers = [Proc(ctx, _receiver_main, i, aiote_provider) for i in range(RECEIVERS)]
    procs = trainers + receivers

    def connect():
        rb, sb = [r.buffers for r in receivers], [t.buffers for t in trainers]
        ids = [(t, t.call("connect", rb, sb)) for t in trainers] + [(r, r.call("connect", sb)) for r in receivers]
        assert all(p.get(i)[0] for p, i in ids)

    def round_(version, push_first=False):
        # push_first: trainers start before the receivers (they wait for the "ready" words)
        order = trainers + receivers if push_first else receivers + trainers
        ids = [(p, p.call("push" if p in trainers else "receive", version)) for p in order]
        return {p: p.get(i) for p, i in ids}

    try:
        connect()
        for version, push_first in ((1, False), (2, True)):
            out = round_(version, push_first)
            assert all(ok for ok, _ in out.values()), out
            assert all(out[r] == (True, True) for r in receivers), "weights not bit-equal to the reference"

        # overlapping rounds on one rank are refused (and the refused attempt changes nothing)
        assert receivers[0].get(receivers[0].call("receive2", 10)) == (True, "refused")
        assert trainers[0].get(trainers[0].call("push2", 10)) == (True, "refused")
        assert all(r.get(r.call("check", 2)) == (True, True) for r in receivers)

        # round 20: trainer 1 dies after posting its first paged write
        trainers[1].close()
        trainers[1] = Proc(ctx, _trainer_main, 1, aiote_provider, 1)
        connect()
        rids = [(r, r.call("receive", 20)) for r in receivers]
        t0 = trainers[0].call("push", 20)
        t1 = trainers[1].call("push", 20)
        for r, i in rids:
            ok, (name, msg, peer, cause) = r.get(i)
            assert not ok and name == "UpdateFailed" and peer == 1 and cause == "PeerUnreachable", (name, msg)
        assert trainers[0].get(t0)[0]  # its own writes all landed (in the idle buffers)
        trainers[1].p.join(30)
        assert trainers[1].p.exitcode == 3
        for f in glob.glob(f"/dev/shm/{trainers[1].p.pid}:*"):  # its shm regions outlive it
            os.unlink(f)
        trainers[1].replies.pop(t1, None)
        # the old weights are still in service, bit-equal
        assert all(r.get(r.call("check", 2)) == (True, True) for r in receivers)

        # a replacement trainer joins; the next round completes
        trainers[1] = Proc(ctx, _trainer_main, 1, aiote_provider, None)
        connect()
        out = round_(21)
        assert all(out[r] == (True, True) for r in receivers), out
        assert all(ok for ok, _ in out.values()), out

        # round 22: receiver 2 is gone; the trainers still serve receivers 0 and 1, then report it
        receivers[2].p.kill()
        receivers[2].p.join(30)
        for f in glob.glob(f"/dev/shm/{receivers[2].p.pid}:*"):
            os.unlink(f)
        live = receivers[:2]
        rids = [(p, p.call("receive", 22)) for p in live] + [(t, t.call("push", 22)) for t in trainers]
        out = {p: p.get(i) for p, i in rids}
        assert all(out[r] == (True, True) for r in live), out
        for t in trainers:
            ok, (name, msg, peer, cause) = out[t]
            assert not ok and name == "UpdateFailed" and peer == 2 and cause == "PeerUnreachable", (name, msg)
    finally:
        for p in procs + trainers:
            p.close()


def test_example_runs():
    """examples/weight_update.py (spawns 2 trainers + 3 inference ranks, rendezvous through a TCPStore)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "examples/weight_update.py", "--steps", "2"], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK: 2 versions" in r.stdout, r.stdout + r.stderr
    assert r.stdout.count("bit-equal to the reference") == 6, r.stdout


# ------------------------------------------------------------------ CUDA (device hosts)


def _cuda_trainer(provider, conn):
    import aiote
    from aiote.weights import WeightSender

    async def main():
        async with aiote.TransferEngine(provider, host="127.0.0.1" if provider == "tcp" else None) as eng:
            sched = make_schedule_1x2()
            mine = {lt.name: torch.zeros(lt.shape, device="cuda:0") for lt in sched.trainers.ranks[0]}
            snd = WeightSender(eng, sched, 0, mine)
            conn.send(snd.buffers)
            snd.connect(*conn.recv())
            for version in (1, 2):
                full = full_weights(version)
                for name, t in mine.items():
                    t.copy_(full[name])
                await snd.push(version, timeout=60)
            conn.send("pushed")

    asyncio.run(main())


def make_schedule_1x2():
    return Schedule(PARAMS, Layout.sharded(PARAMS, 1), Layout.sharded(PARAMS, 2, PLACE, FUSED),
                    dtype=torch.bfloat16, fp8=FP8, chunk_bytes=1024)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
async def test_cuda_shards_into_cuda_receivers(aiote_provider):
    """A trainer process with CUDA shards -> two inference engines with CUDA buffers (the last
    two GPUs), fp8 and bf16, bit-equal to the reference after each round."""
    import aiote
    from aiote.weights import WeightReceiver

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_cuda_trainer, args=(aiote_provider, child), daemon=True)
    p.start()
    try:
        host = "127.0.0.1" if aiote_provider == "tcp" else None
        n = torch.cuda.device_count()
        async with aiote.TransferEngine(aiote_provider, host=host) as e0, \
                aiote.TransferEngine(aiote_provider, host=host) as e1:
            sched = make_schedule_1x2()
            rcvs = [WeightReceiver(e, sched, i, device=f"cuda:{(n - 1 - i) % n}") for i, e in enumerate((e0, e1))]
            loop = asyncio.get_running_loop()
            sbuf = await loop.run_in_executor(None, parent.recv)
            parent.send(([r.buffers for r in rcvs], [sbuf]))
            for r in rcvs:
                r.connect([sbuf])
            for version in (1, 2):
                await asyncio.gather(*(r.receive(version, timeout=60) for r in rcvs))
                cast, scales = quantize(full_weights(version), torch.bfloat16, FP8)
                for i, r in enumerate(rcvs):
                    want = reference_local(cast, PLACE, FUSED, 2, i)
                    assert all(r.weights[k].is_cuda for k in want)
                    assert all(torch.equal(bits(r.weights[k].cpu()), bits(want[k])) for k in want), (version, i)
                    assert r.scales == scales
            assert await loop.run_in_executor(None, parent.recv) == "pushed"
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
