"""The staged GPU path's bounce pools and slot-grant protocol, on any machine.

A fake CUDA driver (aiote.testing.fake_cuda: host memory as "device memory",
memcpy as the copy, in this process and in the peer processes) lets the whole
protocol run in real processes: grants, slot recycling, pipelining with pools
much smaller than the transfers, and every failure path.  tests/test_gpu.py runs
the same path on real GPUs.
"""

import asyncio
import contextlib
import os
import random

import pytest

import aiote
from aiote import staging as stg
from aiote.testing import fake_cuda
from aiote.testing.fake_cuda import FakeDeviceBuffer

CHUNK = 4096
#: one slot per pool: the tightest pipeline, and a leaked slot hangs the next write
TINY = dict(cuda_ipc=False, staging_chunk=CHUNK, staging_bytes=2 * CHUNK)
#: two slots per pool
SMALL = dict(cuda_ipc=False, staging_chunk=CHUNK, staging_bytes=4 * CHUNK)
T = 60  # a bound on every await that could hang if the protocol leaked a slot


@pytest.fixture(autouse=True)
def fake_gpu(monkeypatch):
    # no mirror budget: every staged GPU region here is pooled (peers inherit the setting);
    # tests that want mirrors pass staging_mirror_bytes
    monkeypatch.setenv("AIOTE_STAGING_MIRROR_BYTES", "0")
    fake_cuda.enable()
    yield
    fake_cuda.disable()  # refused (raises) if a fake copy were still in flight


def gpu_buf(data: bytes, device: int = 0) -> FakeDeviceBuffer:
    b = FakeDeviceBuffer(len(data), device)
    b.host[:] = data
    return b


def staging(eng):
    return eng._gpu.staging


def all_free(eng) -> bool:
    st = staging(eng)
    return all(p is None or len(p.free) == st.nslots for p in (st._send, st._recv)) and not st._in and not st._out


def spy(obj, name, before=None, after=None):
    """Wrap obj.name (an instance attribute shadows the method)."""
    orig = getattr(obj, name)

    def wrapper(*a, **kw):
        if before:
            before(*a, **kw)
        r = orig(*a, **kw)
        if after:
            after(*a, **kw)
        return r

    setattr(obj, name, wrapper)
    return orig


def on_message_kind(eng, kind: int, event: asyncio.Event, nth: int = 1):
    """Set event when eng's staging has received its nth message of kind."""
    seen = [0]

    def after(payload, sender):
        if payload[4] == kind:
            seen[0] += 1
            if seen[0] == nth:
                event.set()

    spy(staging(eng), "on_message", after=after)


SIZES = [1, CHUNK, 5 * CHUNK + 3, 200_003]


async def test_bytes_exact_every_direction(aiote_make_engine, aiote_make_peer):
    """GPU->GPU, CPU->GPU, GPU->CPU across processes at unaligned offsets, through pools
    of one slot a side (a 200 KB write is 49 chunks): every byte, each imm exactly once."""
    eng = await aiote_make_engine(**TINY)
    peer = await aiote_make_peer(**TINY)
    imm = 100
    for size in SIZES:
        data = os.urandom(size + 16)
        for direction in ("gpu->gpu", "cpu->gpu", "gpu->cpu"):
            src_kind, dst_kind = direction.split("->")
            src = eng.register(gpu_buf(data) if src_kind == "gpu" else bytearray(data))
            if dst_kind == "gpu":
                rid, d = await peer.call("register_fake_cuda", size + 64, 0xEE, 1)
            else:
                rid, d = await peer.call("register", size + 64, 0xEE)
            d = aiote.MrDescriptor.from_bytes(d)
            await asyncio.wait_for(eng.write(src, d, size, src_offset=7, dst_offset=33, imm=imm), T)
            if dst_kind == "gpu":  # resolved after the owner's DONE: the imm is counted already
                assert await peer.call("pending", imm) == 1
            assert await peer.call("wait_imm", imm, 1, T)
            assert await peer.call("pending", imm) == 0
            got = await peer.call("read", rid, 0, size + 64)
            assert got[:33] == b"\xee" * 33, (size, direction)
            assert got[33:33 + size] == data[7:7 + size], (size, direction)
            assert got[33 + size:] == b"\xee" * 31, (size, direction)
            src.close()
            await peer.call("close_region", rid)
            imm += 1
    state = await peer.call("staging_state")
    assert state["recv_free"] == state["nslots"] == 1 and state["in"] == 0 and state["busy"] == 0
    assert all_free(eng)
    st = eng.gpu_stats
    assert st["staging_pinned"] <= 2 * CHUNK and st["bad_commits"] == 0


async def test_imm_counted_once_after_the_last_chunk(aiote_make_engine):
    """The owner counts a write's imm once, when every chunk is in its GPU memory; the
    writer's future resolves after that.  Paged and scatter writes count one per element."""
    a, b = await aiote_make_engine(**SMALL), await aiote_make_engine(**TINY)
    n = 10 * CHUNK + 5
    data = os.urandom(n)
    src = a.register(gpu_buf(data))
    dbuf = FakeDeviceBuffer(n, 1)
    dst = b.register(dbuf)
    seen = []
    spy(b, "_imm_arrive", before=lambda imm, count: seen.append((imm, count, bytes(dbuf.host))))
    await asyncio.wait_for(a.write(src, dst.descriptor, imm=3), T)
    assert seen == [(3, 1, data)]  # once, with every byte in place
    assert b.imms.pending(3) == 1
    await b.imms.wait(3, 1)
    # paged: 6 pages of 3 chunks' worth, permuted: one arrival of count 6
    page = 3 * CHUNK // 2
    seen.clear()
    perm = [4, 0, 5, 2, 1, 3]
    await asyncio.wait_for(a.write_paged(src, dst.descriptor, page, list(range(6)), perm, imm=4), T)
    assert [(i, c) for i, c, _ in seen] == [(4, 6)]
    for i, p in enumerate(perm):
        assert bytes(dbuf.host[p * page:(p + 1) * page]) == data[i * page:(i + 1) * page]
    assert b.imms.pending(4) == 6
    assert all_free(a) and all_free(b)


async def test_many_concurrent_writes_larger_than_the_pool_both_ways(aiote_make_engine, aiote_make_peer):
    """Eight writes each way at once, each ten times the pool, between two engines whose
    pools are one slot a side: no deadlock, every byte, every imm once, pools whole after."""
    eng = await aiote_make_engine(**TINY)
    peer = await aiote_make_peer(**TINY)
    k, n = 8, 10 * CHUNK + 11
    data = os.urandom(k * n)
    src = eng.register(gpu_buf(data))
    rid, d = await peer.call("register_fake_cuda", k * n, 0, 1)
    d = aiote.MrDescriptor.from_bytes(d)
    mine = FakeDeviceBuffer(k * n, 0)
    dst = eng.register(mine)
    prid, _ = await peer.call("register_fake_cuda", k * n, 0, 0)
    back = os.urandom(k * n)
    await peer.call("fill", prid, 0, back)
    got_all = eng.imms.wait(60, k, timeout=T)
    ours = [eng.write(src, d, n, i * n, i * n, imm=50) for i in range(k)]
    theirs = peer.call("write_many", prid, dst.descriptor.to_bytes(), [(n, i * n, i * n, 60) for i in range(k)])
    await asyncio.wait_for(asyncio.gather(*ours, theirs), T)
    await got_all
    assert await peer.call("wait_imm", 50, k, T)
    assert await peer.call("pending", 50) == 0 and eng.imms.pending(60) == 0
    assert await peer.call("read", rid, 0, k * n) == data
    assert bytes(mine.host) == back
    assert all_free(eng)
    state = await peer.call("staging_state")
    assert state["recv_free"] == state["send_free"] == state["nslots"] and state["in"] == state["out"] == 0


async def test_slots_are_granted_round_robin(aiote_make_engine):
    """Two transfers wanting slots at once take turns: neither starves the other."""
    a, b = await aiote_make_engine(**SMALL), await aiote_make_engine(**SMALL)
    n = 12 * CHUNK
    src = a.register(gpu_buf(os.urandom(2 * n)))
    dst = b.register(FakeDeviceBuffer(2 * n, 1))
    grants = []

    def record(addr, body):
        if body[4] == stg.GRANT:
            grants.append(stg._GRANT.unpack_from(body, stg._HDR.size)[0])

    spy(staging(b), "_ctrl", before=record)
    await asyncio.wait_for(asyncio.gather(a.write(src, dst.descriptor, n, 0, 0, imm=1),
                                          a.write(src, dst.descriptor, n, n, n, imm=1)), T)
    assert len(grants) == 24 and len(set(grants)) == 2
    x1 = grants[0]
    x2 = next(g for g in grants if g != x1)
    first2, last1 = grants.index(x2), len(grants) - 1 - grants[::-1].index(x1)
    both = grants[first2:last1 + 1]  # while both wanted slots: strictly alternating
    assert all(p != q for p, q in zip(both, both[1:])), grants
    assert await b.imms.wait(1, 2) is None


async def test_scatter_and_barrier_to_staged_and_host_targets(aiote_make_engine, aiote_make_peer):
    """One GPU source to a GPU and a host region of one peer and a GPU region of another,
    then a barrier and write_imm to the GPU regions (imm-only writes reach a staged region's
    stand-in registration over the NIC: on shm's direct path too)."""
    eng = await aiote_make_engine(**SMALL)
    p1, p2 = await aiote_make_peer(**SMALL), await aiote_make_peer(**TINY)
    data = os.urandom(32 * CHUNK)
    src = eng.register(gpu_buf(data))
    r1, d1 = await p1.call("register_fake_cuda", 16 * CHUNK, 0, 1)
    r2, d2 = await p1.call("register", 12 * CHUNK, 0)
    r3, d3 = await p2.call("register_fake_cuda", 12 * CHUNK + 100, 0, 1)
    d1, d2, d3 = (aiote.MrDescriptor.from_bytes(x) for x in (d1, d2, d3))
    await asyncio.wait_for(eng.scatter(src, [(d1, 0, 0, 16 * CHUNK), (d2, CHUNK, 0, 12 * CHUNK),
                                             (d3, 20 * CHUNK, 100, 12 * CHUNK)], imm=13), T)
    assert await p1.call("wait_imm", 13, 2, T) and await p2.call("wait_imm", 13, 1, T)
    assert await p1.call("read", r1, 0, 16 * CHUNK) == data[:16 * CHUNK]
    assert await p1.call("read", r2, 0, 12 * CHUNK) == data[CHUNK:13 * CHUNK]
    assert await p2.call("read", r3, 100, 12 * CHUNK) == data[20 * CHUNK:]
    await asyncio.wait_for(eng.barrier([d1, d3], imm=14), T)
    await asyncio.wait_for(eng.write_imm(d3, 15), T)
    assert await p1.call("wait_imm", 14, 1, T) and await p2.call("wait_imm", 14, 1, T)
    assert await p2.call("wait_imm", 15, 1, T)
    for p in (p1, p2):
        assert await p.call("pending", 13) == 0 and await p.call("pending", 14) == 0


async def test_owner_chunks_smaller_than_the_writers(aiote_make_engine, aiote_make_peer):
    """The owner's slots are smaller than the writer's chunks: the writer re-chunks (WANT)."""
    eng = await aiote_make_engine(cuda_ipc=False, staging_chunk=4 * CHUNK, staging_bytes=16 * CHUNK)
    peer = await aiote_make_peer(**TINY)
    data = os.urandom(9 * CHUNK + 1)
    src = eng.register(gpu_buf(data))
    rid, d = await peer.call("register_fake_cuda", len(data), 0, 1)
    await asyncio.wait_for(eng.write(src, aiote.MrDescriptor.from_bytes(d), imm=5), T)
    assert await peer.call("pending", 5) == 1
    assert await peer.call("read", rid, 0, len(data)) == data


async def test_dead_writer_mid_transfer_releases_its_slots(aiote_make_engine, aiote_make_peer, aiote_faults):
    """A writer killed between chunks: the owner releases the slots it granted, never counts
    the imm, and its one slot serves the next writer."""
    eng = await aiote_make_engine(peer_timeout=2.0, **TINY)
    dbuf = FakeDeviceBuffer(64 * CHUNK, 0)
    dst = eng.register(dbuf)
    peer = await aiote_make_peer(**TINY)
    rid, _ = await peer.call("register", 64 * CHUNK, 0x11)
    first = asyncio.Event()
    on_message_kind(eng, stg.COMMIT, first)
    dropped = asyncio.Event()
    spy(staging(eng), "_drop_in", after=lambda x: dropped.set())
    call = peer.call("write", rid, dst.descriptor.to_bytes(), 64 * CHUNK, 0, 0, 77)
    await asyncio.wait_for(first.wait(), T)
    aiote_faults.kill(peer)
    with contextlib.suppress(Exception):
        await call
    await asyncio.wait_for(dropped.wait(), T)
    await asyncio.wait_for(staging(eng).wait_idle(), T)
    assert all_free(eng) and eng.imms.pending(77) == 0
    other = await aiote_make_peer(**TINY)
    rid2, _ = await other.call("register", 8 * CHUNK, 0x22)
    await asyncio.wait_for(other.call("write", rid2, dst.descriptor.to_bytes(), 8 * CHUNK, 0, 0, 78), T)
    assert eng.imms.pending(78) == 1 and bytes(dbuf.host[:8 * CHUNK]) == b"\x22" * (8 * CHUNK)
    assert eng.imms.pending(77) == 0


async def test_dead_owner_mid_transfer_fails_the_write(aiote_make_engine, aiote_make_peer, aiote_faults):
    eng = await aiote_make_engine(peer_timeout=2.0, **TINY)
    peer = await aiote_make_peer(**TINY)
    src = eng.register(gpu_buf(os.urandom(64 * CHUNK)))
    rid, d = await peer.call("register_fake_cuda", 64 * CHUNK, 0, 1)
    granted = asyncio.Event()
    on_message_kind(eng, stg.GRANT, granted, nth=2)
    w = eng.write(src, aiote.MrDescriptor.from_bytes(d), imm=9)
    await asyncio.wait_for(granted.wait(), T)
    aiote_faults.kill(peer)
    with pytest.raises(aiote.ProviderError):
        await asyncio.wait_for(w, T)
    await asyncio.wait_for(staging(eng).wait_idle(), T)  # its writes in flight ended too
    assert all_free(eng)
    src.close()  # nothing holds it any more


async def test_cancelled_write_releases_slots_and_never_counts(aiote_make_engine, aiote_make_peer):
    eng = await aiote_make_engine(**TINY)
    peer = await aiote_make_peer(**TINY)
    data = os.urandom(64 * CHUNK)
    src = eng.register(gpu_buf(data))
    rid, d = await peer.call("register_fake_cuda", 64 * CHUNK, 0, 1)
    d = aiote.MrDescriptor.from_bytes(d)
    granted = asyncio.Event()
    on_message_kind(eng, stg.GRANT, granted, nth=3)
    w = eng.write(src, d, imm=31)
    await asyncio.wait_for(granted.wait(), T)
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    # the owner's one slot comes back only through our CANCEL: this write needs it
    await asyncio.wait_for(eng.write(src, d, 8 * CHUNK, imm=32), T)
    assert await peer.call("pending", 32) == 1 and await peer.call("pending", 31) == 0
    assert await peer.call("read", rid, 0, 8 * CHUNK) == data[:8 * CHUNK]
    state = await peer.call("staging_state")
    assert state["recv_free"] == 1 and state["in"] == 0
    await asyncio.wait_for(staging(eng).wait_idle(), T)
    assert all_free(eng)


async def test_closing_the_writer_mid_transfer(aiote_make_engine, aiote_make_peer):
    """EngineClosed for the write; the owner gets its slot back (CANCEL before the close)
    and serves the next writer."""
    closing = await aiote_make_engine(**TINY)
    peer = await aiote_make_peer(**TINY)
    src = closing.register(gpu_buf(os.urandom(64 * CHUNK)))
    rid, d = await peer.call("register_fake_cuda", 64 * CHUNK, 0, 1)
    d = aiote.MrDescriptor.from_bytes(d)
    granted = asyncio.Event()
    on_message_kind(closing, stg.GRANT, granted, nth=2)
    w = closing.write(src, d, imm=41)
    await asyncio.wait_for(granted.wait(), T)
    await closing.close()
    with pytest.raises(aiote.EngineClosed):
        await w
    eng = await aiote_make_engine(**TINY)
    data = os.urandom(4 * CHUNK)
    await asyncio.wait_for(eng.write(eng.register(gpu_buf(data)), d, imm=42), T)
    assert await peer.call("read", rid, 0, 4 * CHUNK) == data
    assert await peer.call("pending", 41) == 0 and await peer.call("pending", 42) == 1


async def test_closing_the_owner_mid_transfer(aiote_make_engine):
    a, b = await aiote_make_engine(**TINY), await aiote_make_engine(**TINY)
    src = a.register(gpu_buf(os.urandom(64 * CHUNK)))
    dst = b.register(FakeDeviceBuffer(64 * CHUNK, 1))
    committed = asyncio.Event()
    on_message_kind(b, stg.COMMIT, committed, nth=2)
    w = a.write(src, dst.descriptor, imm=1)
    await asyncio.wait_for(committed.wait(), T)
    await b.close()
    with pytest.raises(aiote.RegionClosed):
        await asyncio.wait_for(w, T)
    await asyncio.wait_for(staging(a).wait_idle(), T)
    assert all_free(a)


async def test_deregistration_in_flight(aiote_make_engine):
    """The writer's GPU source can't be closed while a staged write reads it (RegionInUse);
    the owner's region closed between chunks fails the write with RegionClosed, counts
    nothing, and its slots come back."""
    a, b = await aiote_make_engine(**TINY), await aiote_make_engine(**TINY)
    data = os.urandom(16 * CHUNK)
    src = a.register(gpu_buf(data))
    dst = b.register(FakeDeviceBuffer(16 * CHUNK, 1))
    granted = asyncio.Event()
    on_message_kind(a, stg.GRANT, granted, nth=2)
    w = a.write(src, dst.descriptor, imm=2)
    await asyncio.wait_for(granted.wait(), T)
    with pytest.raises(aiote.RegionInUse):
        src.close()
    await asyncio.wait_for(w, T)
    assert b.imms.pending(2) == 1

    # the owner closes its region when the second chunk's commit arrives (one slot:
    # the first chunk's copy is done by then, so the close is allowed)
    seen = [0]

    def close_on_second_commit(payload, sender):
        if payload[4] == stg.COMMIT:
            seen[0] += 1
            if seen[0] == 2:
                dst.close()

    spy(staging(b), "on_message", before=close_on_second_commit)
    with pytest.raises(aiote.RegionClosed):
        await asyncio.wait_for(a.write(src, dst.descriptor, imm=3), T)
    await asyncio.wait_for(staging(a).wait_idle(), T)
    await asyncio.wait_for(staging(b).wait_idle(), T)
    assert b.imms.pending(3) == 0 and all_free(b) and all_free(a)
    src.close()


async def test_out_of_bounds_and_forged_commits(aiote_make_engine):
    """Bounds are checked before anything moves; a commit naming ranges outside the region
    or the slot (a forged or buggy writer) fails its transfer with nothing written."""
    a, b = await aiote_make_engine(**TINY), await aiote_make_engine(**TINY)
    src = a.register(gpu_buf(os.urandom(4 * CHUNK)))
    dbuf = FakeDeviceBuffer(4 * CHUNK, 1, fill=0x33)
    dst = b.register(dbuf)
    with pytest.raises(aiote.OutOfBounds):
        a.write(src, dst.descriptor, 2 * CHUNK, dst_offset=3 * CHUNK)
    st = staging(a)
    addr = aiote.EngineAddress(dst.descriptor.provider, dst.descriptor.addrs)
    for ranges, err in (([(4 * CHUNK - 8, 100)], aiote.OutOfBounds),       # past the region
                        ([(0, CHUNK), (CHUNK, 8)], aiote.DescriptorError),  # past the slot
                        ([(0, 1)] * 3000, aiote.DescriptorError)):          # too many ranges
        xfer = 10_000 + len(ranges)
        x = st._out[xfer] = stg._Out(xfer, dst.descriptor, a._peer(addr.addrs, addr.provider),
                                     asyncio.get_running_loop())
        await a._send_ctrl(addr, stg._HDR.pack(stg.MAGIC, stg.REQ) + stg._REQ.pack(
            xfer, dst.descriptor.cuda.token, 1, 9, 1, 100))
        g = await asyncio.wait_for(x.next_grant(), T)
        body = stg._HDR.pack(stg.MAGIC, stg.COMMIT) + stg._COMMIT.pack(xfer, g.slot, 0, len(ranges))
        await a._send_ctrl(addr, body + b"".join(stg._RANGE.pack(o, n) for o, n in ranges))
        with pytest.raises(err):
            await asyncio.wait_for(x.done, T)
        del st._out[xfer]
    assert bytes(dbuf.host) == b"\x33" * (4 * CHUNK) and b.imms.pending(9) == 0
    assert all_free(b)
    # an unknown region: RegionClosed at the writer
    gone = b.register(FakeDeviceBuffer(CHUNK, 1))
    d = gone.descriptor
    gone.close()
    with pytest.raises(aiote.RegionClosed):
        await asyncio.wait_for(a.write(src, d, CHUNK, imm=9), T)


async def test_malformed_messages_are_dropped(aiote_make_engine):
    """Junk staging messages (random kinds, lengths, fields) change nothing and crash
    nothing; a bad grant fails only the write it names; writes work afterwards."""
    a, b = await aiote_make_engine(**SMALL), await aiote_make_engine(**SMALL)
    dbuf = FakeDeviceBuffer(8 * CHUNK, 1)
    dst = b.register(dbuf)
    addr = aiote.EngineAddress(dst.descriptor.provider, dst.descriptor.addrs)
    rng = random.Random(5)
    token = dst.descriptor.cuda.token
    sends = []
    for i in range(300):
        kind = rng.randint(0, 8)
        if kind == stg.REQ and i % 2:  # requests for the real region, each bad in one field
            want, imm, count = rng.choice([(0, 1, 1), (2, 1 << 30, 1), (2, stg.NO_IMM, 3)])
            body = stg._REQ.pack(rng.getrandbits(64), token, want, imm, count, 5)
        else:
            body = rng.randbytes(rng.randint(0, 80))
        sends.append(a._send_ctrl(addr, stg._HDR.pack(stg.MAGIC, kind) + body))
    sends.append(a._send_ctrl(addr, b"AGC1" + bytes(20)))  # the old commit: not understood
    await asyncio.gather(*sends)
    await a.send(b.address, b"after")  # one peer's messages arrive in order: the junk was handled
    assert (await asyncio.wait_for(b.recv(), T))[0] == b"after"
    assert b.gpu_stats["bad_commits"] >= 10
    assert staging(b).idle()
    data = os.urandom(8 * CHUNK)
    await asyncio.wait_for(a.write(a.register(gpu_buf(data)), dst.descriptor, imm=4), T)
    assert bytes(dbuf.host) == data and b.imms.pending(4) == 1
    # a grant whose descriptor is not the owner's pool fails that write only
    pool = staging(b)._recv.region
    real = pool._descriptor
    pool._descriptor = aiote.MrDescriptor(real.provider, a._nic_addrs, real.base, real.length, real.keys)
    with pytest.raises(aiote.DescriptorError):
        await asyncio.wait_for(a.write(a.register(gpu_buf(data)), dst.descriptor, imm=5), T)
    pool._descriptor = real
    await asyncio.wait_for(staging(b).wait_idle(), T)
    await asyncio.wait_for(a.write(a.register(gpu_buf(data)), dst.descriptor, imm=6), T)
    assert b.imms.pending(5) == 0 and b.imms.pending(6) == 1


async def test_options_and_memory_bound(aiote_provider, aiote_host, monkeypatch):
    with pytest.raises(aiote.InvalidArgument):
        aiote.TransferEngine(staging_chunk=CHUNK, staging_bytes=CHUNK)  # less than a slot a side
    with pytest.raises(aiote.InvalidArgument):
        aiote.TransferEngine(staging_chunk=100)
    monkeypatch.setenv("AIOTE_STAGING_BYTES", "lots")
    with pytest.raises(aiote.InvalidArgument):
        aiote.TransferEngine()
    monkeypatch.setenv("AIOTE_STAGING_BYTES", str(16 * CHUNK))
    monkeypatch.setenv("AIOTE_STAGING_CHUNK", str(2 * CHUNK))
    async with aiote.TransferEngine(aiote_provider, host=aiote_host, cuda_ipc=False) as eng:
        big = eng.register(FakeDeviceBuffer(1 << 24))  # 16 MiB of "GPU memory" ...
        assert staging(eng).nslots == 4 and staging(eng).chunk == 2 * CHUNK
        assert eng.gpu_stats["staging_pinned"] == 8 * CHUNK  # ... pins 32 KiB (the receive pool), not 16 MiB
        big.close()


# ---- both protocols: the mirror budget (staging_mirror_bytes) -----------------------------
# A staged GPU region gets a full pinned mirror while the budget lasts (descriptor mode
# "staged"), else it is pooled (mode "pooled"); a writer follows the destination's mode and
# copies a GPU source through its mirror if it has one, else through a send slot.


def mode(mr) -> str:
    return mr.descriptor.cuda.mode


async def test_mirror_while_the_budget_lasts_then_pools(aiote_make_engine):
    """Regions get mirrors until the budget is spent; a region over what is left is pooled;
    closing a mirrored region gives its bytes back for the next; gpu_stats counts both."""
    eng = await aiote_make_engine(staging_mirror_bytes=10 * CHUNK, **TINY)
    r1 = eng.register(FakeDeviceBuffer(4 * CHUNK))
    r2 = eng.register(FakeDeviceBuffer(6 * CHUNK))            # exactly what is left
    r3 = eng.register(FakeDeviceBuffer(1))                    # nothing left: pooled
    assert (mode(r1), mode(r2), mode(r3)) == ("staged", "staged", "pooled")
    assert r1.cuda.mirror and not r1.cuda.pooled and r3.cuda.pooled and not r3.cuda.mirror
    st = eng.gpu_stats
    assert st["mirror_pinned"] == 10 * CHUNK and st["mirror_left"] == 0
    assert st["pool_pinned"] == CHUNK  # the receive pool (one slot), made for the pooled region
    assert st["staging_pinned"] == 11 * CHUNK
    assert st["mirror_regions"] == 2 and st["pooled_regions"] == 1
    r1.close()
    st = eng.gpu_stats
    assert st["mirror_left"] == 4 * CHUNK and st["mirror_pinned"] == 6 * CHUNK and st["mirror_regions"] == 1
    r4 = eng.register(FakeDeviceBuffer(4 * CHUNK + 1))        # one byte more than was freed: pooled
    r5 = eng.register(FakeDeviceBuffer(4 * CHUNK))            # fits the freed bytes: a mirror
    assert (mode(r4), mode(r5)) == ("pooled", "staged")
    r3.close()
    r4.close()
    st = eng.gpu_stats
    assert st["pooled_regions"] == 0 and st["mirror_regions"] == 2 and st["mirror_left"] == 0
    assert st["staging_pinned"] == st["mirror_pinned"] + st["pool_pinned"] == 10 * CHUNK + CHUNK
    # a pooled descriptor says so on the wire; a mirrored one is as before (mode 1)
    for r, m in ((r5, "staged"), (eng.register(FakeDeviceBuffer(8)), "pooled")):
        assert aiote.MrDescriptor.from_bytes(r.descriptor.to_bytes()).cuda.mode == m


async def test_options_mirror_budget(aiote_provider, aiote_host, monkeypatch):
    for bad in (-1, 1.5, "1"):
        with pytest.raises(aiote.InvalidArgument):
            aiote.TransferEngine(staging_mirror_bytes=bad)
    # gpu_chunk as before the pools: a large chunk makes the default pools two chunks big
    async with aiote.TransferEngine(aiote_provider, host=aiote_host, gpu_chunk=64 << 20) as eng:
        assert eng._staging_bytes == 128 << 20 and eng._gpu_chunk == 64 << 20
    monkeypatch.setenv("AIOTE_STAGING_MIRROR_BYTES", "lots")
    with pytest.raises(aiote.InvalidArgument):
        aiote.TransferEngine()
    monkeypatch.setenv("AIOTE_STAGING_MIRROR_BYTES", str(3 * CHUNK))
    async with aiote.TransferEngine(aiote_provider, host=aiote_host, **TINY) as eng:
        assert mode(eng.register(FakeDeviceBuffer(3 * CHUNK))) == "staged"
        assert mode(eng.register(FakeDeviceBuffer(1))) == "pooled"
        assert eng.gpu_stats["staging_pinned"] <= 3 * CHUNK + 2 * CHUNK  # budget + staging_bytes
    monkeypatch.delenv("AIOTE_STAGING_MIRROR_BYTES")
    async with aiote.TransferEngine(aiote_provider, host=aiote_host, **TINY) as eng:
        assert eng.gpu_stats == {}
        assert mode(eng.register(FakeDeviceBuffer(1 << 20))) == "staged"  # the default budget: 1 GiB
        assert eng.gpu_stats["mirror_left"] == (1 << 30) - (1 << 20) and eng.gpu_stats["pool_pinned"] == 0


async def test_every_source_kind_to_every_destination_kind(aiote_make_engine, aiote_make_peer):
    """Mirrored, pooled and host sources to a mirrored, a pooled and a host region of a peer
    (another process), multi-chunk at odd offsets: every byte, each imm once; then the peer
    writes back into a mirrored and a pooled region of ours."""
    n = 5 * CHUNK + 3
    eng = await aiote_make_engine(staging_mirror_bytes=n + 64, **TINY)
    peer = await aiote_make_peer(staging_mirror_bytes=n + 64, **TINY)
    data = os.urandom(n + 64)
    srcs = {"mirror": eng.register(gpu_buf(data)), "pooled": eng.register(gpu_buf(data)),
            "host": eng.register(bytearray(data))}
    assert mode(srcs["mirror"]) == "staged" and mode(srcs["pooled"]) == "pooled"
    dsts = {}
    for kind in ("mirror", "pooled"):  # the peer's first GPU region takes its whole budget
        rid, d = await peer.call("register_fake_cuda", n + 64, 0xEE, 1)
        dsts[kind] = rid, aiote.MrDescriptor.from_bytes(d)
    dsts["host"] = await peer.call("register", n + 64, 0xEE)
    dsts["host"] = dsts["host"][0], aiote.MrDescriptor.from_bytes(dsts["host"][1])
    assert dsts["mirror"][1].cuda.mode == "staged" and dsts["pooled"][1].cuda.mode == "pooled"
    imm = 200
    for sk, src in srcs.items():
        for dk, (rid, d) in dsts.items():
            await peer.call("fill", rid, 0, b"\xee" * (n + 64))
            await asyncio.wait_for(eng.write(src, d, n, src_offset=7, dst_offset=33, imm=imm), T)
            assert await peer.call("wait_imm", imm, 1, T)
            got = await peer.call("read", rid, 0, n + 64)
            assert got[:33] == b"\xee" * 33 and got[33 + n:] == b"\xee" * 31, (sk, dk)
            assert got[33:33 + n] == data[7:7 + n], (sk, dk)
            assert await peer.call("pending", imm) == 0
            imm += 1
    st = eng.gpu_stats
    assert st["writes_from_mirror"] == st["writes_from_pool"] == 3
    assert st["writes_to_mirror"] == st["writes_to_pool"] == 3
    pst = await peer.call("gpu_stats")
    assert pst["bad_commits"] == 0 and pst["mirror_regions"] == pst["pooled_regions"] == 1
    # the peer writes into ours: our first GPU region is mirrored, the second pooled
    prid, _ = await peer.call("register", n, 0x5A)
    for src in (srcs["mirror"], srcs["pooled"]):
        w = eng.imms.wait(300, 1, timeout=T)
        await peer.call("write", prid, src.descriptor.to_bytes(), n, 0, 1, 300)
        await w
    bufs = [src.obj for src in (srcs["mirror"], srcs["pooled"])]
    assert all(bytes(b.host[1:1 + n]) == b"\x5a" * n for b in bufs)
    assert all_free(eng) and (await peer.call("staging_state"))["in"] == 0


async def test_one_scatter_and_paged_write_to_both_kinds(aiote_make_engine, aiote_make_peer):
    """One scatter from a mirrored and one from a pooled GPU source to a mirrored and a pooled
    GPU region of one peer, a host region of it, and a pooled region of another peer; one
    barrier to all; paged writes (permuted) into each kind: every byte, imms counted once per
    element, pools whole after."""
    m = 12 * CHUNK
    eng = await aiote_make_engine(staging_mirror_bytes=3 * m, **SMALL)
    p1 = await aiote_make_peer(staging_mirror_bytes=m, **SMALL)
    p2 = await aiote_make_peer(staging_mirror_bytes=0, **TINY)
    data = os.urandom(3 * m)
    src_m = eng.register(gpu_buf(data))
    src_p = eng.register(gpu_buf(data))
    assert (mode(src_m), mode(src_p)) == ("staged", "pooled")
    r1, d1 = await p1.call("register_fake_cuda", m, 0, 1)     # mirrored (p1's whole budget)
    r2, d2 = await p1.call("register_fake_cuda", m, 0, 1)     # pooled
    r3, d3 = await p1.call("register", m, 0)
    r4, d4 = await p2.call("register_fake_cuda", m + 100, 0, 0)  # pooled (no budget)
    d1, d2, d3, d4 = (aiote.MrDescriptor.from_bytes(x) for x in (d1, d2, d3, d4))
    assert [d.cuda.mode for d in (d1, d2, d4)] == ["staged", "pooled", "pooled"]
    imm = 40
    for src in (src_m, src_p):
        for r, p in ((r1, p1), (r2, p1), (r3, p1), (r4, p2)):
            await p.call("fill", r, 0, b"\0" * m)
        await asyncio.wait_for(eng.scatter(src, [(d1, 0, 0, m), (d2, m, 0, m - 5), (d3, CHUNK, 3, 2 * CHUNK),
                                                 (d4, 2 * m, 100, m)], imm=imm), T)
        assert await p1.call("wait_imm", imm, 3, T) and await p2.call("wait_imm", imm, 1, T)
        assert await p1.call("read", r1, 0, m) == data[:m]
        assert await p1.call("read", r2, 0, m - 5) == data[m:2 * m - 5]
        assert await p1.call("read", r3, 3, 2 * CHUNK) == data[CHUNK:3 * CHUNK]
        assert await p2.call("read", r4, 100, m) == data[2 * m:]
        imm += 1
    await asyncio.wait_for(eng.barrier([d1, d2, d4], imm=50), T)
    assert await p1.call("wait_imm", 50, 2, T) and await p2.call("wait_imm", 50, 1, T)
    # paged, pages of 1.5 chunks permuted, into each kind of destination
    page, npages = 3 * CHUNK // 2, 8
    perm = [5, 2, 7, 0, 3, 6, 1, 4]
    for src in (src_m, src_p):
        for r, d in ((r1, d1), (r2, d2)):
            await asyncio.wait_for(eng.write_paged(src, d, page, list(range(npages)), perm, imm=60), T)
            assert await p1.call("wait_imm", 60, npages, T)
            got = await p1.call("read", r, 0, page * npages)
            for i, p in enumerate(perm):
                assert got[p * page:(p + 1) * page] == data[i * page:(i + 1) * page], (mode(src), d.cuda.mode, i)
    for p in (p1, p2):
        assert await p.call("pending", 40) == 0 and await p.call("pending", 60) == 0
        st = await p.call("staging_state")
        assert st["in"] == 0 and st["recv_free"] == st["nslots"]
    assert all_free(eng)
    assert eng.gpu_stats["bad_commits"] == 0


async def test_cancel_pooled_source_to_mirror(aiote_make_engine):
    """A write from a pooled GPU source (one send slot) to a mirrored region cancelled after
    its first commit: the send slot comes back, the imm is never counted, the next write
    works."""
    a = await aiote_make_engine(staging_mirror_bytes=0, **TINY)
    b = await aiote_make_engine(staging_mirror_bytes=1 << 20, **TINY)
    n = 40 * CHUNK
    data = os.urandom(n)
    src = a.register(gpu_buf(data))
    dbuf = FakeDeviceBuffer(n, 1)
    dst = b.register(dbuf)
    assert (mode(src), mode(dst)) == ("pooled", "staged")
    first = asyncio.Event()
    spy(b._gpu, "on_commit", after=lambda payload: first.set())
    w = a.write(src, dst.descriptor, imm=7)
    await asyncio.wait_for(first.wait(), T)
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    await asyncio.wait_for(staging(a).wait_idle(), T)
    assert all_free(a)
    await asyncio.wait_for(a.write(src, dst.descriptor, imm=8), T)
    await asyncio.wait_for(b.imms.wait(8, 1), T)
    assert bytes(dbuf.host) == data and b.imms.pending(7) == 0


async def test_mirror_region_closed_and_forged_mirror_commits(aiote_make_engine):
    """A write to a mirrored region closed meanwhile fails typed (its mirror is deregistered);
    a mirror commit with ranges out of the region is dropped and counted, nothing copied or
    counted; the budget is whole again after the close."""
    a = await aiote_make_engine(staging_mirror_bytes=1 << 20, **TINY)
    b = await aiote_make_engine(staging_mirror_bytes=1 << 20, **TINY)
    src = a.register(gpu_buf(os.urandom(5 * CHUNK)))
    dbuf = FakeDeviceBuffer(5 * CHUNK, 1, fill=0x33)
    dst = b.register(dbuf)
    assert mode(dst) == "staged"
    import struct

    addr = aiote.EngineAddress(dst.descriptor.provider, dst.descriptor.addrs)
    token = dst.descriptor.cuda.token
    for body in (struct.pack("<4sQIII", b"AGC1", token, 5, 1, 1) + struct.pack("<QQ", 5 * CHUNK - 1, 2),
                 struct.pack("<4sQIII", b"AGC1", token, 5, 1, 2)):  # says 2 ranges, carries none
        await a._send_ctrl(addr, body)
    await a.send(b.address, b"after")
    assert (await asyncio.wait_for(b.recv(), T))[0] == b"after"
    assert b.gpu_stats["bad_commits"] == 2 and b.imms.pending(5) == 0
    assert bytes(dbuf.host) == b"\x33" * (5 * CHUNK)
    d = dst.descriptor
    dst.close()
    assert b.gpu_stats["mirror_left"] == 1 << 20 and b.gpu_stats["mirror_pinned"] == 0
    with pytest.raises(aiote.ProviderError):  # on tcp its subclass PeerUnreachable
        await asyncio.wait_for(a.write(src, d, imm=6), T)
    assert b.imms.pending(6) == 0 and bytes(dbuf.host) == b"\x33" * (5 * CHUNK)
