"""MoE dispatch/combine across EP = 2 and 4 processes: outputs equal a single-process reference."""

import asyncio
import multiprocessing as mp

import pytest

torch = pytest.importorskip("torch")

from aiote.moe import CapacityExceeded, ExpertParallel, StepMismatch  # noqa: E402

HIDDEN, EXPERTS, TOPK, TOKENS, STEPS = 64, 8, 2, 16, 3


def n_experts(world):
    """EXPERTS, or two per rank where world doesn't divide it (odd EP sizes)."""
    return EXPERTS if EXPERTS % world == 0 else 2 * world


def make_inputs(rank, step, world):
    ne = n_experts(world)
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(TOKENS, HIDDEN, generator=g)
    logits = torch.randn(TOKENS, ne, generator=g)
    if step == 1:
        # nobody routes to the last rank's experts: it receives no tokens
        logits[:, ne - ne // world:] = -1e9
    if step >= 2:
        logits[:, 0] = 1e9  # expert 0 is chosen by every token
    w, ids = torch.topk(torch.softmax(logits, dim=1), TOPK, dim=1)
    return x, ids, w


def expert_weights(ne=EXPERTS):
    g = torch.Generator().manual_seed(7)
    return torch.randn(ne, HIDDEN, HIDDEN, generator=g) / HIDDEN ** 0.5


def reference(x, ids, w, mats):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(TOPK):
            out[t] += w[t, k] * torch.tanh(x[t] @ mats[ids[t, k]])
    return out


class SplitEP(ExpertParallel):
    """The GPU layout (ids and headers in host regions of their own, the rows apart, the
    headers written after the rows) with host rows: the GPU path's logic, testable here."""

    _SPLIT_META = True


def _rank_main(rank, world, provider, conn, gpu=False, split=False, cuda_ipc=True):
    import aiote
    from aiote.moe import CapacityExceeded

    device = f"cuda:{rank % torch.cuda.device_count()}" if gpu else "cpu"
    EP = SplitEP if split else ExpertParallel

    async def main():
        host = "127.0.0.1" if provider == "tcp" else None
        async with aiote.TransferEngine(provider, host=host, cuda_ipc=cuda_ipc) as eng:
            ne = n_experts(world)
            ep = EP(eng, rank, world, ne, HIDDEN, TOKENS, TOPK, device=device if gpu else None)
            conn.send(ep.buffers)
            ep.connect(conn.recv())
            if gpu:  # every peer in another process of this host: one C call per dispatch/combine
                assert ep._ipc == [r != rank and cuda_ipc for r in range(world)]
            mats = expert_weights(ne).to(device)
            per = ne // world
            mine = mats[rank * per:(rank + 1) * per]

            def experts(rows, local_ids, where):
                # where the outputs go: a new tensor (copied by combine), ep.out_buffer (no
                # copy), or in place into the receive buffer (sent back from it)
                out = {"new": torch.empty_like(rows), "out_buffer": ep.out_buffer[:rows.shape[0]],
                       "in_place": rows}[where]
                res = [(local_ids == e, torch.tanh(rows[local_ids == e] @ mine[e])) for e in range(per)]
                for sel, y in res:
                    out[sel] = y
                return out

            errs = []
            for step in range(STEPS):
                x, ids, w = (t.to(device) for t in make_inputs(rank, step, world))
                where = ("new", "out_buffer", "in_place")[step % 3]
                got = await ep.step(x, ids, w, lambda r, i, where=where: experts(r, i, where))
                assert got.device == x.device
                errs.append(float((got.cpu() - reference(x.cpu(), ids.cpu(), w.cpu(), mats.cpu())).abs().max()))

            # our own writes of the last step must be complete before the loop blocks on the pipe
            # below: a write through the staged GPU path (no CUDA IPC) sends its commit from this
            # event loop, and the peer's step waits for it
            await ep.settle()
            # a slot of 12 rows: every source routes its 16 tokens to expert 0 (rank 0), so every
            # rank's dispatch is refused before anything is sent; each retries in chunks of 4 tokens
            small = EP(eng, rank, world, ne, HIDDEN, TOKENS, TOPK, device=device if gpu else None,
                       capacity=12, imm_base=0x0F0000)
            conn.send(small.buffers)
            small.connect(conn.recv())
            x, ids, w = (t.to(device) for t in make_inputs(rank, STEPS, world))
            with pytest.raises(CapacityExceeded) as e:
                await small.dispatch(x, ids)
            assert (e.value.dest, e.value.rows, e.value.capacity) == (0, TOKENS, 12)
            got = torch.cat([await small.step(x[a:a + 4], ids[a:a + 4], w[a:a + 4],
                                              lambda r, i: experts(r, i, "new")) for a in range(0, TOKENS, 4)])
            errs.append(float((got.cpu() - reference(x.cpu(), ids.cpu(), w.cpu(), mats.cpu())).abs().max()))
            # our last combine's writes may still be in flight: closing the engine would cut them off
            await ep.settle()
            await small.settle()
            conn.send(errs)

    asyncio.run(main())


@pytest.mark.parametrize("split", [False, True], ids=["host", "split"])
@pytest.mark.parametrize("world", [2, 4])
async def test_dispatch_combine_matches_reference(world, split, aiote_provider):
    """split: the GPU layout (rows apart from their ids and headers) on host rows."""
    await _run_ranks(world, aiote_provider, gpu=False, split=split)


async def test_split_layout_at_odd_world(aiote_provider):
    """EP 3 (6 experts), split layout: the first source's rows land alone at the start of
    their slot (no neighbour to pair with) and move up behind the others'."""
    await _run_ranks(3, aiote_provider, gpu=False, split=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cuda_ipc", [True, False], ids=["ipc", "no-ipc"])
@pytest.mark.parametrize("world", [2, 4])
async def test_dispatch_combine_on_gpus(aiote_provider, cuda_ipc, world):
    """EP = 2 and 4 with the rows in GPU memory (rank r on GPU r mod count): over CUDA IPC
    (one C call of copies then header writes per dispatch and combine), and without it
    (the engine's staged GPU path, as between hosts: the rows written apart, the headers
    with the imm; a rank's event loop must keep running until its own writes are settled)."""
    await _run_ranks(world, aiote_provider, gpu=True, cuda_ipc=cuda_ipc)


async def _run_ranks(world, aiote_provider, gpu, split=False, cuda_ipc=True):
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(r, world, aiote_provider, pipes[r][1], gpu, split, cuda_ipc),
                         daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    for _, child_end in pipes:
        child_end.close()  # a rank that dies closes its end: our recv gets EOFError, not a hang
    loop = asyncio.get_running_loop()

    async def recv(r):
        try:
            return await asyncio.wait_for(loop.run_in_executor(None, pipes[r][0].recv), 120)
        except (EOFError, asyncio.TimeoutError):
            raise AssertionError(f"rank {r} sent nothing (exit codes {[p.exitcode for p in procs]}; "
                                 "its traceback is in the captured stderr)") from None

    try:
        for _ in range(2):  # the two ExpertParallels' buffers
            bufs = [await recv(r) for r in range(world)]
            for r in range(world):
                pipes[r][0].send(bufs)
        errs = [await recv(r) for r in range(world)]
        for p in procs:
            await loop.run_in_executor(None, p.join, 30)
    finally:
        for p in procs:  # the others wait for a dead rank's writes forever: end them
            if p.is_alive():
                p.kill()
                p.join(5)
        for parent_end, _ in pipes:
            parent_end.close()
    assert all(len(rank_errs) == STEPS + 1 and all(e < 1e-5 for e in rank_errs) for rank_errs in errs), errs
    assert [p.exitcode for p in procs] == [0] * world


async def test_bad_calls_are_refused_typed(aiote_provider, aiote_host):
    import aiote

    async with aiote.TransferEngine(aiote_provider, host=aiote_host) as eng:
        ep = ExpertParallel(eng, 0, 1, 4, 8, 4, 2)
        x, ids, w = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int64), torch.ones(4, 2)
        with pytest.raises(aiote.InvalidArgument, match="connect"):
            await ep.dispatch(x, ids)
        ep.connect([ep.buffers])
        with pytest.raises(aiote.InvalidArgument, match="dispatch"):
            await ep.combine(x, [4], w)
        with pytest.raises(aiote.InvalidArgument, match="out of range"):
            await ep.dispatch(x, ids + 9)
        with pytest.raises(aiote.InvalidArgument, match="out of range"):
            await ep.dispatch(x, ids - 1)
        rows, _, per_src = await ep.dispatch(x, ids)
        assert per_src == [8] and rows.shape == (8, 8)
        with pytest.raises(aiote.InvalidArgument, match="rows_per_source"):
            await ep.combine(rows, [7], w)
        with pytest.raises(aiote.InvalidArgument, match="outputs must be"):
            await ep.combine(rows[:4], per_src, w)
        with pytest.raises(aiote.InvalidArgument, match="topk_weights"):
            await ep.combine(rows, per_src, w[:3])
        out = await ep.combine(rows, per_src, w)  # identity experts, weights 1: each token twice
        assert torch.allclose(out, 2 * x)
        with pytest.raises(aiote.InvalidArgument, match="float32"):
            await ep.dispatch(x.double(), ids)

        # 8 rows for rank 0 with a slot of 5: refused before anything moves; then 2 tokens go through
        small = ExpertParallel(eng, 0, 1, 4, 8, 4, 2, capacity=5, imm_base=0x0F0000)
        small.connect([small.buffers])
        with pytest.raises(CapacityExceeded) as e:
            await small.dispatch(x, ids)
        assert (e.value.dest, e.value.rows, e.value.capacity) == (0, 8, 5)
        assert isinstance(e.value, aiote.InvalidArgument)
        out = await small.step(x[:2], ids[:2], w[:2], lambda r, i: r)
        assert torch.allclose(out, 2 * x[:2])
        with pytest.raises(aiote.InvalidArgument, match="capacity"):
            ExpertParallel(eng, 0, 1, 4, 8, 4, 2, capacity=9)


@pytest.mark.parametrize("EP", [ExpertParallel, SplitEP], ids=["host", "split"])
async def test_ranks_out_of_step_are_detected(aiote_provider, aiote_host, EP):
    """Two layers of one rank sharing an imm base: the dispatch that reads a slot nobody
    wrote this step fails with StepMismatch instead of returning stale rows."""
    import aiote

    x, ids = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int64)
    async with aiote.TransferEngine(aiote_provider, host=aiote_host) as e0, \
            aiote.TransferEngine(aiote_provider, host=aiote_host) as e1:
        a0, a1 = (EP(e, r, 2, 4, 8, 4, 2) for r, e in ((0, e0), (1, e1)))
        b1 = EP(e1, 1, 2, 4, 8, 4, 2)  # layer B on rank 1, same imm base as layer A
        for ep in (a0, a1):
            ep.connect([a0.buffers, a1.buffers])
        b1.connect([a0.buffers, b1.buffers])
        # rank 0's layer A writes rank 1's layer-A slot (and counts as rank 1's dispatch imm);
        # rank 1 dispatches layer B, whose slot nobody wrote
        a0_step = asyncio.ensure_future(a0.dispatch(x, ids))
        with pytest.raises(StepMismatch, match="expected step 0 from rank 0"):
            await b1.dispatch(x, ids)
        await a0_step  # b1's write went into rank 0's layer-A slot: a0 can't tell (same imm, same step)


def test_bench_moe_arguments():
    """bench_moe.py's argument handling (no processes): --device cuda picks NCCL and is
    skipped, not failed, where there are too few GPUs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_moe.py"
    spec = importlib.util.spec_from_file_location("bench_moe", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a = bench.parse_args(["--ep", "2,4", "--provider", "tcp", "--tokens", "16", "--hidden", "512"])
    assert (a.ep_sizes, a.provider, a.device, a.tokens, a.hidden, bench.backend(a)) == ([2, 4], "tcp", "cpu", 16,
                                                                                        512, "gloo")
    assert bench.skip_reason(a, 4) is None
    g = bench.parse_args(["--device", "cuda", "--ep", "2"])
    assert bench.backend(g) == "nccl" and not g.ab_lanes
    assert bench.parse_args(["--device", "cuda", "--ab-lanes"]).ab_lanes
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert (bench.skip_reason(g, 2) is None) == (gpus >= 2)
    if not gpus:
        assert bench.skip_reason(g, 2) == "no CUDA device"
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "tpu"])


async def test_a_silent_rank_times_the_step_out_typed(aiote_provider, aiote_host):
    """A rank that never sends (dead or stalled): the others' dispatch fails ImmTimeout after
    ``timeout`` instead of waiting forever, and leaves no wait armed (a later wait on the same
    imm still counts from zero)."""
    import aiote

    async with aiote.TransferEngine(aiote_provider, host=aiote_host) as e0, \
            aiote.TransferEngine(aiote_provider, host=aiote_host) as e1:
        eps = [ExpertParallel(e, r, 2, 4, 8, 4, 2, timeout=0.3) for r, e in enumerate((e0, e1))]
        for ep in eps:
            ep.connect([eps[0].buffers, eps[1].buffers])
        x, ids = torch.randn(4, 8), torch.tensor([[0, 2], [1, 3], [2, 3], [0, 1]])
        with pytest.raises(aiote.ImmTimeout):
            await eps[0].dispatch(x, ids)  # rank 1 never dispatches
        assert e0.imms.pending(eps[0]._dispatch_imms[0]) == 0
        with pytest.raises(aiote.InvalidArgument, match="timeout"):
            ExpertParallel(e0, 0, 2, 4, 8, 4, 2, timeout=0)


async def test_layouts_that_differ_are_refused(aiote_provider, aiote_host):
    """A rank with rows on a GPU (headers in a host region) and one with host rows can't be
    connected: refused at connect, before any step."""
    import aiote

    async with aiote.TransferEngine(aiote_provider, host=aiote_host) as eng:
        a, b = ExpertParallel(eng, 0, 2, 4, 8, 4, 2), SplitEP(eng, 1, 2, 4, 8, 4, 2)
        assert a.buffers.meta is None and b.buffers.meta is not None
        for ep in (a, b):
            with pytest.raises(aiote.InvalidArgument, match="layouts"):
                ep.connect([a.buffers, b.buffers])


class _HostIpc:
    """Stands in for the engine's GPU paths: a batch plan's copies are done with memmove
    (every rank is in this process: ``where`` maps a descriptor to its buffer's address),
    then its writes are posted as a scatter with the imm, as the C core does after the
    copies."""

    def __init__(self, eng, where):
        self.eng, self.where, self.calls = eng, where, 0

    def ipc_reachable(self, desc, device):
        return True

    def batch_plan(self, device, copy_dsts, src, write_dsts):
        return _HostIpcPlan(self, copy_dsts, src, write_dsts)


class _HostIpcPlan:
    """GpuPaths.batch_plan's plan, emulated: copies i into copy_dsts[i], then writes i into
    write_dsts[i] as one scatter with the imm."""

    def __init__(self, fake, copy_dsts, src, write_dsts):
        self.fake, self.copy_dsts, self.src, self.write_dsts = fake, copy_dsts, src, write_dsts

    def submit(self, copies, writes, imm):
        import ctypes

        f = self.fake
        f.calls += 1
        assert len(copies) == len(self.copy_dsts) and len(writes) == len(self.write_dsts)
        for d, (off, addr, n) in zip(self.copy_dsts, copies):
            assert 0 <= off and off + n <= d.length
            ctypes.memmove(f.where[d] + off, addr, n)
        src = self.src if self.src is not None else f.eng._scratch()
        return f.eng.scatter(src, [(d, so, do, n) for d, (so, do, n) in zip(self.write_dsts, writes)], imm=imm)


@pytest.mark.parametrize("world", [2, 4])
async def test_ipc_batch_path_on_host_memory(world, aiote_provider, aiote_host, monkeypatch):
    """The GPU fast path's bookkeeping (each segment's rows copied to the end of its slot in
    one batch with the headers written after, own rows gathered during the wait, the
    combine's copies) with host buffers and an emulated batch: outputs equal the reference
    at EP 2 and 4, also when a rank receives nothing or one expert takes every token."""
    import contextlib

    import aiote

    async with contextlib.AsyncExitStack() as stack:
        engs = [await stack.enter_async_context(aiote.TransferEngine(aiote_provider, host=aiote_host))
                for _ in range(world)]
        eps = [SplitEP(e, r, world, EXPERTS, HIDDEN, TOKENS, TOPK) for r, e in enumerate(engs)]
        where = {}
        for ep in eps:
            where[ep.buffers.recv], where[ep.buffers.combine] = ep._recv.data_ptr(), ep._combine.data_ptr()
        fakes = [_HostIpc(e, where) for e in engs]
        for e, f in zip(engs, fakes):
            monkeypatch.setattr(e, "_gpu_paths", lambda f=f: f)
        for ep in eps:
            ep._gpu = True  # connect asks the (emulated) GPU paths which peers IPC reaches
            ep.connect([p.buffers for p in eps])
            ep._gpu = False
            assert ep._ipc == [r != ep.rank for r in range(world)]
        mats, per = expert_weights(), EXPERTS // world

        async def one(r, step):
            x, ids, w = make_inputs(r, step, world)
            mine = mats[r * per:(r + 1) * per]

            def experts(rows, lid):
                out = torch.empty_like(rows)
                for e in range(per):
                    out[lid == e] = torch.tanh(rows[lid == e] @ mine[e])
                return out

            got = await eps[r].step(x, ids, w, experts)
            return float((got - reference(x, ids, w, mats)).abs().max())

        errs = [await asyncio.gather(*(one(r, step % 3) for r in range(world))) for step in range(6)]
        for ep in eps:
            await ep.settle()
    assert max(max(e) for e in errs) < 1e-5, errs
    assert all(f.calls == 12 for f in fakes)  # a dispatch and a combine per step: one batch each


@pytest.mark.parametrize("seed", range(5))
def test_native_routing_matches_numpy(seed):
    """aiote_moe_route (dispatch's routing, one C pass) against numpy: counts, the stable
    grouping by destination, local ids, and the tokens with the groups from first_group on
    first; an id out of range is refused with the first such pair's index."""
    import numpy as np

    from aiote._core import ffi, lib

    rng = np.random.default_rng(seed)
    world, top_k, tokens = int(rng.integers(1, 9)), int(rng.integers(1, 5)), int(rng.integers(0, 40))
    experts = world * int(rng.integers(1, 5))
    dest = rng.permutation(np.arange(experts) % world).astype(np.int16)
    lid = rng.integers(0, 100, experts).astype(np.int32)
    ids = rng.integers(0, experts, tokens * top_k).astype(np.int64)
    first = int(rng.integers(0, world))
    n = ids.size
    counts, order, lid_out, tok = (np.full(world, -1, np.int64), np.full(n, -1, np.int64), np.full(n, -1, np.int32),
                                   np.full(n, -1, np.int64))
    bad = ffi.new("uint64_t*")

    def call(ids):
        return lib.aiote_moe_route(ffi.from_buffer("int64_t[]", ids), n, top_k, ffi.from_buffer("int16_t[]", dest),
                                   ffi.from_buffer("int32_t[]", lid), experts, world, first,
                                   ffi.from_buffer("int64_t[]", counts), ffi.from_buffer("int64_t[]", order),
                                   ffi.from_buffer("int32_t[]", lid_out), ffi.from_buffer("int64_t[]", tok), bad)

    assert call(ids) == 0
    rot = dest[ids]
    ref = np.argsort(rot, kind="stable")
    ref_counts = np.bincount(rot, minlength=world)
    assert counts.tolist() == ref_counts.tolist()
    assert order.tolist() == ref.tolist() and lid_out.tolist() == lid[ids[ref]].tolist()
    starts = np.concatenate(([0], np.cumsum(ref_counts)))
    groups = [ref[starts[g]:starts[g + 1]] // top_k for g in [*range(first, world), *range(first)]]
    assert tok.tolist() == (np.concatenate(groups).tolist() if n else [])
    if n:
        wrong = ids.copy()
        at = int(rng.integers(0, n))
        wrong[at:] = -1 if seed % 2 else experts  # a negative id, or one past the last expert
        assert call(wrong) == -lib.AIOTE_E_INVAL and bad[0] == at
        assert b"expert id" in ffi.string(lib.aiote_last_error())
