"""GPU memory in every operation, across two processes (marked ``cuda``: skipped without a GPU).

Run on a machine with 2 GPUs: our engine uses cuda:0, the peer process cuda:1 (or
cuda:0 if there is one).  Paths: CUDA IPC between processes of the host (the
default for GPU destinations) and the host-staged NIC path (``cuda_ipc=False``)
with both of its protocols: ``staged-mirror`` (the default mirror budget: every
region here gets a pinned mirror) and ``staged-pools`` (``staging_mirror_bytes=0``:
bounce pools only), on shm and tcp.  Every transfer is checked byte for byte.
"""

import asyncio
import hashlib

import numpy as np
import pytest

import aiote
from aiote import cuda
from aiote.descriptor import CudaExt

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or not cuda.available(), reason="needs a CUDA GPU"),
]

PEER_DEV = 1 if torch.cuda.is_available() and torch.cuda.device_count() > 1 else 0
MiB = 1 << 20


def pattern(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def gpu_tensor(data: np.ndarray, dev: int = 0):
    t = torch.from_numpy(data.copy()).to(f"cuda:{dev}")
    torch.cuda.synchronize(dev)
    return t


async def peer_region(peer, size, kind, fill=0):
    if kind == "gpu":
        rid, d = await peer.call("register_cuda", size, fill, PEER_DEV)
    else:
        rid, d = await peer.call("register", size, fill)
    return rid, aiote.MrDescriptor.from_bytes(d)


@pytest.fixture(params=["ipc", "staged-mirror", "staged-pools"])
def path(request):
    return request.param


def path_kw(path: str) -> dict:
    """Engine options of a path: CUDA IPC, or the staged NIC path with the default mirror
    budget (mirrors) or none (pools)."""
    if path == "ipc":
        return dict(cuda_ipc=True)
    return dict(cuda_ipc=False, staging_mirror_bytes=0) if path == "staged-pools" else dict(cuda_ipc=False)


@pytest.fixture
async def gpu_pair(aiote_make_engine, aiote_make_peer, path):
    eng = await aiote_make_engine(gpu_chunk=4 * MiB, **path_kw(path))
    peer = await aiote_make_peer(gpu_chunk=4 * MiB, **path_kw(path))
    return eng, peer


SIZES = [4, 4096 + 3, MiB, 64 * MiB + 5]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("direction", ["cpu->gpu", "gpu->cpu", "gpu->gpu"])
async def test_write_every_direction(gpu_pair, path, direction, size):
    eng, peer = gpu_pair
    src_kind, dst_kind = direction.split("->")
    data = pattern(size + 64, size)
    src = eng.register(gpu_tensor(data) if src_kind == "gpu" else bytearray(data.tobytes()))
    rid, d = await peer_region(peer, size + 128, dst_kind, fill=0xEE)
    await eng.write(src, d, size, src_offset=7, dst_offset=33, imm=11)
    assert await peer.call("wait_imm", 11, 1, 60)
    got = await peer.call("read", rid, 0, size + 128)
    assert got[:33] == b"\xee" * 33
    assert got[33:33 + size] == data[7:7 + size].tobytes()
    assert got[33 + size:] == b"\xee" * (128 - 33)
    assert await peer.call("pending", 11) == 0
    stats = await peer.call("gpu_stats")
    if dst_kind == "gpu" and path != "ipc":
        assert d.cuda.mode == ("pooled" if path == "staged-pools" else "staged")
        assert stats["commits_received"] >= 1 and stats["bad_commits"] == 0
        assert stats["mirror_regions" if path == "staged-mirror" else "pooled_regions"] == 1
    if src_kind == "gpu" and path != "ipc":
        assert eng.gpu_stats["writes_from_mirror" if path == "staged-mirror" else "writes_from_pool"] == 1
    if dst_kind == "gpu" and path == "ipc":
        assert eng.gpu_stats["ipc_writes"] >= 1


async def test_gpu_region_receives_from_peer(gpu_pair, path):
    """The peer writes into our GPU region (our engine is the owner that copies and counts)."""
    eng, peer = gpu_pair
    size = 3 * MiB + 17
    dst = eng.register(torch.zeros(size, dtype=torch.uint8, device="cuda:0"))
    rid, _ = await peer.call("register", size, 0x5A)
    w = eng.imms.wait(21, 1, timeout=60)
    await peer.call("write", rid, dst.descriptor.to_bytes(), size, 0, 0, 21)
    await w
    assert torch.all(dst.obj == 0x5A).item()


@pytest.mark.parametrize("direction", ["cpu->gpu", "gpu->cpu", "gpu->gpu"])
async def test_paged(gpu_pair, direction):
    eng, peer = gpu_pair
    src_kind, dst_kind = direction.split("->")
    page, npages = 1024, 300
    data = pattern(page * npages, 3)
    src = eng.register(gpu_tensor(data) if src_kind == "gpu" else bytearray(data.tobytes()))
    rid, d = await peer_region(peer, page * npages, dst_kind)
    perm = np.random.default_rng(4).permutation(npages)
    await eng.write_paged(src, d, page, list(range(npages)), perm.tolist(), imm=12)
    assert await peer.call("wait_imm", 12, npages, 60)
    got = np.frombuffer(await peer.call("read", rid, 0, page * npages), dtype=np.uint8).reshape(npages, page)
    want = data.reshape(npages, page)
    for i, p in enumerate(perm):
        assert (got[p] == want[i]).all(), i


async def test_scatter_and_barrier_mixed_targets(aiote_make_engine, aiote_make_peer, path):
    """One GPU source to a GPU and a CPU region of one peer and a GPU region of another;
    staged-mirror: the other peer has no mirror budget, so one scatter writes a mirrored
    and a pooled region."""
    eng = await aiote_make_engine(**path_kw(path))
    p1 = await aiote_make_peer(**path_kw(path))
    p2 = await aiote_make_peer(**path_kw("staged-pools" if path == "staged-mirror" else path))
    data = pattern(8 * MiB, 5)
    src = eng.register(gpu_tensor(data))
    r1, d1 = await peer_region(p1, 4 * MiB, "gpu")
    r2, d2 = await peer_region(p1, 4 * MiB, "cpu")
    r3, d3 = await peer_region(p2, 4 * MiB, "gpu")
    if path != "ipc":
        assert (d1.cuda.mode, d3.cuda.mode) == ("pooled" if path == "staged-pools" else "staged", "pooled")
    await eng.scatter(src, [(d1, 0, 0, 4 * MiB), (d2, MiB, 0, 3 * MiB), (d3, 5 * MiB, 100, 3 * MiB)], imm=13)
    assert await p1.call("wait_imm", 13, 2, 60) and await p2.call("wait_imm", 13, 1, 60)
    assert await p1.call("read", r1, 0, 4 * MiB) == data[:4 * MiB].tobytes()
    assert await p1.call("read", r2, 0, 3 * MiB) == data[MiB:4 * MiB].tobytes()
    assert await p2.call("read", r3, 100, 3 * MiB) == data[5 * MiB:8 * MiB].tobytes()
    await eng.barrier([d1, d3], imm=14)
    assert await p1.call("wait_imm", 14, 1, 60) and await p2.call("wait_imm", 14, 1, 60)


async def test_one_gib(gpu_pair, path, aiote_provider):
    if path == "ipc" and aiote_provider != "shm":
        pytest.skip("CUDA IPC copies don't use the NIC: shm covers it")
    eng, peer = gpu_pair
    n = 1 << 30
    src_t = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda:0")
    src = eng.register(src_t)
    rid, d = await peer_region(peer, n, "gpu")
    await eng.write(src, d, imm=15)
    assert await peer.call("wait_imm", 15, 1, 120)
    for off in (0, n // 2 - 4096, n - 4096):  # spot checks of the far ends and the middle
        assert await peer.call("read", rid, off, 4096) == src_t[off:off + 4096].cpu().numpy().tobytes()


async def test_same_process_gpu_to_gpu(aiote_make_engine):
    """Two engines of one process (one per GPU): GPU->GPU writes copy to the other
    engine's pointer directly (no IPC handle, no staging), both ways, paged too."""
    a, b = await aiote_make_engine(), await aiote_make_engine()
    data = pattern(5 * MiB + 1, 6)
    src = a.register(gpu_tensor(data))
    dst = b.register(torch.zeros(5 * MiB + 1, dtype=torch.uint8, device=f"cuda:{PEER_DEV}"))
    w = b.imms.wait(16, 1, timeout=60)
    await a.write(src, dst.descriptor, imm=16)
    await w
    assert dst.obj.cpu().numpy().tobytes() == data.tobytes()
    assert a.gpu_stats["ipc_writes"] == 1 and a.gpu_stats["staged_out"] == 0
    assert b.gpu_stats["commits_received"] == 0
    # back the other way, at offsets, and a paged write
    back = a.register(torch.zeros(MiB, dtype=torch.uint8, device="cuda:0"))
    w = a.imms.wait(17, 2, timeout=60)
    await b.write(dst, back.descriptor, 4096 + 3, src_offset=5, dst_offset=8 * 4096 + 7, imm=17)
    await b.write_paged(dst, back.descriptor, 4096, [3, 1], [0, 2], imm=17)
    await w
    got = back.obj.cpu().numpy()
    assert got[8 * 4096 + 7:8 * 4096 + 7 + 4099].tobytes() == data[5:5 + 4099].tobytes()
    assert got[0:4096].tobytes() == data[3 * 4096:4 * 4096].tobytes()
    assert got[2 * 4096:3 * 4096].tobytes() == data[4096:2 * 4096].tobytes()
    assert b.gpu_stats["staged_out"] == 0
    # a closed destination of this process: the write is refused, nothing copied
    dst.close()
    with pytest.raises(aiote.AioteError):
        await a.write(src, dst.descriptor, 4096, imm=18)


async def test_gpu_descriptor_round_trip_and_bounds(aiote_engine):
    t = torch.zeros(4096, dtype=torch.uint8, device="cuda:0")
    r = aiote_engine.register(t)
    d = aiote.MrDescriptor.from_bytes(r.descriptor.to_bytes())
    assert d == r.descriptor and isinstance(d.cuda, CudaExt) and d.cuda.device == 0
    assert r.device == 0 and "cuda:0" in repr(r)
    with pytest.raises(aiote.OutOfBounds):
        aiote_engine.write(r, d, 4097)
    with pytest.raises(aiote.OutOfBounds):
        aiote_engine.write(r, d, 10, dst_offset=4090)
    r.close()
    with pytest.raises(aiote.RegionClosed):
        aiote_engine.write(r, d, 10)


@pytest.mark.aiote_providers("shm")
async def test_cuda_graph_fires_one_paged_write_per_layer(aiote_engine_pair):
    """A CUDA graph computes layer by layer, copies each layer's output to a pinned host
    region and bumps a watched device-mapped word; the worker fires that layer's prepared
    paged write from C.  Two replays: bytes and imm counts exact."""
    a, b = aiote_engine_pair
    layers, dim = 4, 1024
    host = torch.zeros(layers, dim, dtype=torch.float32).pin_memory()
    src = a.register(host)
    dst = b.register(bytearray(layers * dim * 4))
    page = dim * 4
    preps = [a.prepare_paged(src, dst.descriptor, page, [k], [layers - 1 - k], imm=200 + k) for k in range(layers)]
    w = a.watcher(cuda=True)
    word = w.tensor
    torch.manual_seed(0)
    x = torch.randn(dim, 1, device="cuda:0")
    mats = [torch.randn(dim, dim, device="cuda:0") / dim ** 0.5 for _ in range(layers)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (cuBLAS workspaces)
        h = x
        for m in mats:
            h = torch.tanh(m @ h)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h = x
        for k, m in enumerate(mats):
            h = torch.tanh(m @ h)
            host[k].copy_(h.view(-1), non_blocking=True)
            word.add_(1)  # grows across replays: reactions fire on thresholds
    for rnd in range(2):
        x.copy_(torch.randn(dim, 1, device="cuda:0"))
        fired = [w.arm(rnd * layers + k + 1, preps[k]) for k in range(layers)]
        graph.replay()
        await asyncio.wait_for(asyncio.gather(*fired), 60)
        for k in range(layers):
            await asyncio.wait_for(b.imms.wait(200 + k, 1), 60)
        torch.cuda.synchronize()
        ref, h = [], x
        for m in mats:
            h = torch.tanh(m @ h)
            ref.append(h.view(-1).cpu())
        got = np.frombuffer(bytes(dst.obj), dtype=np.float32).reshape(layers, dim)
        for k in range(layers):
            assert (got[layers - 1 - k] == host[k].numpy()).all()
            assert torch.allclose(torch.from_numpy(got[layers - 1 - k].copy()), ref[k], atol=1e-5)
    assert w.value == 2 * layers
    assert a.stats()["writes_posted"] == 2 * layers
    w.close()


async def test_ipc_many_small_writes_cancel_and_close(aiote_make_engine, aiote_make_peer):
    """The C-gated IPC path: 256 small writes in flight at once land exactly; a write
    cancelled while its copy runs never delivers its imm; closing the engine fails the
    writes still in flight with EngineClosed (after their copies stopped touching memory);
    those that finished before it succeed, none fails otherwise."""
    eng = await aiote_make_engine()
    peer = await aiote_make_peer()
    data = pattern(MiB, 8)
    src = eng.register(gpu_tensor(data))
    rid, d = await peer_region(peer, MiB, "gpu")
    await asyncio.gather(*(eng.write(src, d, 4096, src_offset=i * 4096, dst_offset=i * 4096, imm=31)
                           for i in range(256)))
    assert await peer.call("wait_imm", 31, 256, 60)
    assert await peer.call("read", rid, 0, MiB) == data.tobytes()
    assert await peer.call("pending", 31) == 0
    if eng.provider == "shm":  # the imms went straight into the owner's ring (direct path)
        assert eng.stats()["direct_writes"] >= 256
    big = eng.register(torch.zeros(256 * MiB, dtype=torch.uint8, device="cuda:0"))
    rid2, d2 = await peer_region(peer, 256 * MiB, "gpu")
    f = eng.write(big, d2, imm=32)
    f.cancel()  # the 256 MiB copy takes far longer than the cancel takes to reach the worker
    with pytest.raises(asyncio.CancelledError):
        await f
    await eng.write(src, d, 4096, imm=33)
    assert await peer.call("wait_imm", 33, 1, 60)
    # an absence can't be awaited: give a wrongly delivered imm 32 time to show up
    await asyncio.sleep(0.5)  # noqa: sleep-ok
    assert await peer.call("pending", 32) == 0
    # 64 x 256 MiB: on one GPU a 256 MiB device copy takes ~0.1 ms, so the first few may finish
    # before the close reaches the worker (they succeed); the ones still in flight then fail
    futs = [eng.write(big, d2, imm=34) for _ in range(64)]
    await eng.close()
    closed = 0
    for f in futs:
        try:
            await f
        except aiote.EngineClosed:
            closed += 1
    assert closed > 0


async def test_ipc_write_is_ordered_after_torch_kernels(aiote_make_engine, aiote_make_peer):
    """A tensor filled by a kernel on torch's current stream just before write() is read
    after that kernel (the C core makes its copy stream wait for torch's stream)."""
    eng = await aiote_make_engine()
    peer = await aiote_make_peer()
    t = torch.zeros(64 * MiB, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    src = eng.register(t)
    rid, d = await peer_region(peer, 64 * MiB, "gpu")
    for v in (7, 9):
        t.fill_(v)  # queued, not synchronized
        await eng.write(src, d, imm=35)
        assert await peer.call("wait_imm", 35, 1, 60)
        for off in (0, 32 * MiB, 64 * MiB - 4096):
            assert await peer.call("read", rid, off, 4096) == bytes([v]) * 4096


async def test_ipc_expandable_segments(aiote_make_engine, aiote_make_peer):
    """VMM memory (torch's expandable segments: no legacy IPC handle) on both sides is
    written through CUDA IPC all the same, with shareable handles (POSIX fds fetched
    with pidfd_getfd): a region over several segments, offsets, both directions."""
    eng = await aiote_make_engine()
    peer = await aiote_make_peer()
    await peer.call("cuda_alloc_conf", "expandable_segments:True")
    torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    torch.cuda.empty_cache()
    try:
        n = 48 * MiB + 5
        data = pattern(n, 11)
        src = eng.register(gpu_tensor(data))
        mine = eng.register(torch.zeros(n, dtype=torch.uint8, device="cuda:0"))
        rid, d = await peer_region(peer, n, "gpu")
        assert src.descriptor.cuda.ipc_kind == 1 and d.cuda.ipc_kind == 1
        await eng.write(src, d, imm=40)
        assert await peer.call("wait_imm", 40, 1, 60)
        assert await peer.call("read", rid, 0, n) == data.tobytes()
        await eng.write(src, d, 3 * MiB + 1, src_offset=7, dst_offset=21 * MiB - 3, imm=41)
        assert await peer.call("wait_imm", 41, 1, 60)
        assert await peer.call("read", rid, 21 * MiB - 3, 3 * MiB + 1) == data[7:7 + 3 * MiB + 1].tobytes()
        st = eng.gpu_stats
        assert st["ipc_writes"] == 2 and st["staged_out"] == 0
        # the peer writes its (VMM) region into ours
        w = eng.imms.wait(42, 1, timeout=60)
        await peer.call("write", rid, mine.descriptor.to_bytes(), n, 0, 0, 42)
        await w
        assert mine.obj.cpu().numpy().tobytes() == await peer.call("read", rid, 0, n)
        assert (await peer.call("gpu_stats"))["ipc_writes"] == 1
    finally:
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")


# ---- the staged path's bounce pools (aiote/staging.py) ---------------------------------

POOL = dict(cuda_ipc=False, staging_chunk=MiB, staging_bytes=8 * MiB,  # 4 slots of 1 MiB a side
            staging_mirror_bytes=0)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.mark.parametrize("direction", ["cpu->gpu", "gpu->cpu", "gpu->gpu"])
async def test_staged_pool_much_smaller_than_the_region(aiote_make_engine, aiote_make_peer, direction):
    """256 MiB + 5 at odd offsets through pools of 4 x 1 MiB a side: every byte, the imm once,
    pinned host memory bounded by the pools (the full mirror pinned 256 MiB a side)."""
    eng, peer = await aiote_make_engine(**POOL), await aiote_make_peer(**POOL)
    src_kind, dst_kind = direction.split("->")
    n = 256 * MiB + 5
    src_t = torch.randint(0, 256, (n + 64,), dtype=torch.uint8, device="cuda:0")
    host = src_t.cpu().numpy().tobytes()
    src = eng.register(src_t if src_kind == "gpu" else bytearray(host))
    rid, d = await peer_region(peer, n + 64, dst_kind)
    await eng.write(src, d, n, src_offset=3, dst_offset=17, imm=31)
    assert await peer.call("wait_imm", 31, 1, 120)
    assert await peer.call("pending", 31) == 0
    assert await peer.call("digest", rid, 17, n) == sha(host[3:3 + n])
    assert eng.gpu_stats["staging_pinned"] <= 8 * MiB
    assert (await peer.call("gpu_stats")).get("staging_pinned", 0) <= 8 * MiB  # {} without a GPU region
    st = await peer.call("staging_state")
    if dst_kind == "gpu":
        assert st["recv_free"] == st["nslots"] == 4 and st["in"] == 0 and st["busy"] == 0


async def test_staged_concurrent_both_ways_then_cancel(aiote_make_engine, aiote_make_peer):
    """Eight 16 MiB writes each way at once through pools of 2 x 1 MiB a side (no deadlock,
    every byte, every imm once); then a 256 MiB write cancelled mid-way: its imm is never
    counted and the owner's slots come back (the next write needs them)."""
    kw = dict(cuda_ipc=False, staging_chunk=MiB, staging_bytes=4 * MiB, staging_mirror_bytes=0)
    eng, peer = await aiote_make_engine(**kw), await aiote_make_peer(**kw)
    k, n = 8, 16 * MiB + 3
    src_t = torch.randint(0, 256, (k * n,), dtype=torch.uint8, device="cuda:0")
    src = eng.register(src_t)
    rid, d = await peer_region(peer, k * n, "gpu")
    mine = torch.zeros(k * n, dtype=torch.uint8, device="cuda:0")
    dst = eng.register(mine)
    prid, _ = await peer_region(peer, k * n, "gpu", fill=0x5C)
    got = eng.imms.wait(60, k, timeout=120)
    ours = [eng.write(src, d, n, i * n, i * n, imm=50) for i in range(k)]
    theirs = peer.call("write_many", prid, dst.descriptor.to_bytes(), [(n, i * n, i * n, 60) for i in range(k)])
    await asyncio.gather(*ours, theirs)
    await got
    assert await peer.call("wait_imm", 50, k, 60)
    assert await peer.call("digest", rid, 0, k * n) == sha(src_t.cpu().numpy().tobytes())
    assert torch.all(mine == 0x5C).item()
    # cancel mid-way: after the owner granted its fifth slot
    granted = asyncio.Event()
    seen = [0]
    orig = eng._gpu.staging.on_message

    def on_message(payload, sender):
        orig(payload, sender)
        if payload[4] == 3:  # GRANT
            seen[0] += 1
            if seen[0] == 5:
                granted.set()

    eng._gpu.staging.on_message = on_message
    w = eng.write(src, d, 128 * MiB, imm=70)
    await asyncio.wait_for(granted.wait(), 60)
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    await asyncio.wait_for(eng.write(src, d, 4 * MiB, imm=71), 60)
    assert await peer.call("pending", 71) == 1 and await peer.call("pending", 70) == 0
    assert await peer.call("digest", rid, 0, 4 * MiB) == sha(src_t[:4 * MiB].cpu().numpy().tobytes())
    await asyncio.wait_for(eng._gpu.staging.wait_idle(), 60)
