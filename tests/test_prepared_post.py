"""Prepared batches posted from Python (``Prepared.post``): checked and resolved once, posted
many times with one C call each.  Real processes (PeerProcess) on shm and tcp; no sleeps."""

import asyncio

import numpy as np
import pytest

import aiote


async def test_post_bytes_and_counts_exact(engine, aiote_make_peer):
    """A scatter to two peers, prepared once, posted with the prepared imm, another imm and none:
    every post reads the source as it is then; each write of a post counts one imm."""
    a, b = await aiote_make_peer(), await aiote_make_peer()
    ra, da = await a.call("register", 1 << 16, 0x11)
    rb, db = await b.call("register", 1 << 16, 0x22)
    da, db = aiote.MrDescriptor.from_bytes(da), aiote.MrDescriptor.from_bytes(db)
    buf = bytearray(1 << 16)
    src = engine.register(buf)
    targets = [(da, 0, 100, 1000), (db, 1000, 0, 3000), (db, 9, 50000, 1), (da, 4000, 60000, 64)]
    prep = engine.prepare_scatter(src, targets, imm=7)
    assert prep.n == 4
    rng = np.random.default_rng(5)
    want_a, want_b = bytearray(b"\x11" * (1 << 16)), bytearray(b"\x22" * (1 << 16))

    def expect() -> None:
        for d, so, do, ln in targets:
            (want_a if d is da else want_b)[do:do + ln] = buf[so:so + ln]

    for rnd in range(20):  # the source changes between posts: each post takes what is there
        buf[:] = rng.integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
        await prep.post()
        expect()
        assert await a.call("read", ra, 0, 1 << 16) == bytes(want_a), rnd
        assert await b.call("read", rb, 0, 1 << 16) == bytes(want_b), rnd
    await asyncio.gather(*(prep.post() for _ in range(10)))  # many in flight at once
    await prep.post(imm=8)
    await prep.post(imm=None)
    assert await a.call("wait_imm", 7, 2 * 30, 10)
    assert await b.call("wait_imm", 7, 2 * 30, 10)
    assert await a.call("wait_imm", 8, 2, 10) and await b.call("wait_imm", 8, 2, 10)
    for p in (a, b):
        assert await p.call("pending", 7) == 0 and await p.call("pending", 8) == 0
    prep.close()
    src.close()  # the prepared transfer no longer holds it


async def test_post_paged_and_barrier(engine, peer):
    rid, desc = await peer.call("register", 64 * 100, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    src_bytes = bytes(range(256)) * 25
    src = engine.register(bytearray(src_bytes))
    perm = np.random.default_rng(1).permutation(100)
    paged = engine.prepare_paged(src, d, 64, np.arange(100), perm, imm=3)
    bar = engine.prepare_barrier([d, d], 4)
    for _ in range(3):
        await paged.post()
        await bar.post()
    assert await peer.call("wait_imm", 3, 300, 10)
    assert await peer.call("wait_imm", 4, 6, 10)
    got = await peer.call("read", rid, 0, 64 * 100)
    for i, p in enumerate(perm):
        assert got[p * 64:(p + 1) * 64] == src_bytes[i * 64:(i + 1) * 64]
    assert await peer.call("pending", 3) == 0 and await peer.call("pending", 4) == 0
    paged.close()
    bar.close()


async def test_bad_batches_are_refused_whole(engine, peer):
    """Out of bounds or not a descriptor: refused at preparation, naming the element; nothing lands."""
    rid, desc = await peer.call("register", 1024, 0x33)
    d = aiote.MrDescriptor.from_bytes(desc)
    mr = engine.register(bytearray(2048))
    with pytest.raises(aiote.OutOfBounds) as ei:
        engine.prepare_scatter(mr, [(d, 0, 0, 10), (d, 0, 1020, 10)], imm=1)
    assert ei.value.index == 1
    with pytest.raises(aiote.OutOfBounds) as ei:
        engine.prepare_scatter(mr, [(d, 2040, 0, 10)], imm=1)
    assert ei.value.index == 0
    with pytest.raises(aiote.DescriptorError):
        engine.prepare_scatter(mr, [(b"not a descriptor", 0, 0, 10)], imm=1)
    with pytest.raises(aiote.InvalidArgument):
        engine.prepare_scatter(mr, [], imm=1)
    prep = engine.prepare_scatter(mr, [(d, 0, 0, 10)], imm=1)
    with pytest.raises(aiote.InvalidArgument):
        prep.post(imm=1 << 30)  # outside the imm range: nothing posted
    with pytest.raises(aiote.InvalidArgument):
        prep.post(imm=-1)
    with pytest.raises(aiote.RegionInUse):
        mr.close()  # the prepared transfer holds its source
    prep.close()
    with pytest.raises(aiote.InvalidArgument):
        prep.post()
    assert await peer.call("read", rid, 0, 1024) == b"\x33" * 1024
    assert await peer.call("pending", 1) == 0


async def test_post_on_a_closed_engine(aiote_make_engine, peer):
    eng = await aiote_make_engine()
    _, desc = await peer.call("register", 4096, 0)
    prep = eng.prepare_write(eng.register(bytearray(4096)), aiote.MrDescriptor.from_bytes(desc), imm=1)
    await prep.post()
    await eng.close()
    with pytest.raises(aiote.EngineClosed):
        prep.post()
    prep.close()  # harmless after the engine closed


async def test_posts_waiting_for_room_complete(aiote_make_engine, peer):
    """A small submission queue: posts beyond it wait in Python (deferred) and all complete."""
    eng = await aiote_make_engine(max_queued=4, direct_shm=False)
    rid, desc = await peer.call("register", 4096, 0)
    src = eng.register(bytearray(b"\x5a" * 4096))
    prep = eng.prepare_scatter(src, [(aiote.MrDescriptor.from_bytes(desc), i * 512, i * 512, 512)
                                     for i in range(3)], imm=9)
    await asyncio.gather(*(prep.post() for _ in range(20)))
    assert await peer.call("wait_imm", 9, 60, 20)
    assert await peer.call("pending", 9) == 0
    assert await peer.call("read", rid, 0, 1536) == b"\x5a" * 1536
    prep.close()


async def test_cancelled_post_leaves_the_engine_sound(aiote_make_engine, peer):
    """Cancelling a post's future (a 32 MiB batch: a copy thread on shm, queued on tcp) stops
    waiting for it; later posts work and their imms count exactly."""
    eng = await aiote_make_engine()
    rid, desc = await peer.call("register", 32 << 20, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = eng.register(bytearray(b"\x01" * (32 << 20)))
    big = eng.prepare_scatter(src, [(d, i << 20, i << 20, 1 << 20) for i in range(32)], imm=10)
    fut = big.post()
    fut.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fut
    small = eng.prepare_write(src, d, 4096, imm=11)
    await asyncio.gather(*(small.post() for _ in range(5)))
    assert await peer.call("wait_imm", 11, 5, 20)
    assert await peer.call("pending", 11) == 0
    assert await peer.call("read", rid, 0, 4096) == b"\x01" * 4096
    await big.post(imm=12)  # the same transfer once more, whole
    assert await peer.call("wait_imm", 12, 32, 30)
    big.close()
    small.close()


async def test_post_to_a_closed_region_fails_and_writes_nothing(engine, peer):
    """The target deregistered the region after preparation: the post fails (stale key), typed;
    its memory keeps its bytes and no imm is counted."""
    rid, desc = await peer.call("register", 1 << 16, 0x77)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = engine.register(bytearray(b"\x01" * (1 << 16)))
    prep = engine.prepare_write(src, d, imm=3)
    await prep.post()
    assert await peer.call("wait_imm", 3, 1, 10)
    await peer.call("fill", rid, 0, b"\x77" * (1 << 16))
    await peer.call("close_region", rid)
    res = await asyncio.wait_for(asyncio.gather(prep.post(imm=4), return_exceptions=True), 30)
    assert isinstance(res[0], aiote.ProviderError), res
    assert await peer.call("pending", 4) == 0
    if engine.provider == "shm":  # tcp;ofi_rxm drops the connection's later traffic only after the error
        assert await peer.call("read", rid, 0, 1 << 16) == b"\x77" * (1 << 16)
    prep.close()


async def test_post_to_a_dead_peer_fails_typed(aiote_make_engine, aiote_make_peer, aiote_faults):
    """A killed target: posts fail with a typed error within a bounded time, and the engine keeps
    serving a live peer with another prepared batch."""
    eng = await aiote_make_engine(peer_timeout=2)
    dead, live = await aiote_make_peer(), await aiote_make_peer()
    _, dd = await dead.call("register", 1 << 20, 0)
    lr, ld = await live.call("register", 1 << 20, 0)
    dd, ld = aiote.MrDescriptor.from_bytes(dd), aiote.MrDescriptor.from_bytes(ld)
    src = eng.register(bytearray(b"\x42" * (1 << 20)))
    to_dead = eng.prepare_scatter(src, [(dd, 0, 0, 4096)] * 8, imm=1)
    to_live = eng.prepare_scatter(src, [(ld, 0, 0, 4096)] * 8, imm=2)
    await to_dead.post()
    aiote_faults.kill(dead)
    await asyncio.get_running_loop().run_in_executor(None, dead.proc.join)  # gone, for sure
    res = await asyncio.wait_for(asyncio.gather(*(to_dead.post() for _ in range(4)), return_exceptions=True), 30)
    assert all(isinstance(r, aiote.ProviderError) for r in res), res
    await asyncio.wait_for(to_live.post(), 30)
    assert await live.call("wait_imm", 2, 8, 10)
    assert await live.call("read", lr, 0, 4096) == b"\x42" * 4096
    to_dead.close()
    to_live.close()


async def test_post_from_a_spinning_loop(aiote_make_engine, peer):
    """Latency mode (loop_spin_us): posts go in from the loop's own thread (tcp: posted there
    at once; shm: copied there); bytes and counts exact."""
    eng = await aiote_make_engine(loop_spin_us=200)
    rid, desc = await peer.call("register", 8192, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = eng.register(bytearray(range(256)) * 32)
    prep = eng.prepare_scatter(src, [(d, i * 256, 8192 - (i + 1) * 256, 256) for i in range(32)], imm=13)
    for _ in range(50):
        await prep.post()
    await asyncio.gather(*(prep.post() for _ in range(20)))
    assert await peer.call("wait_imm", 13, 70 * 32, 20)
    assert await peer.call("pending", 13) == 0
    got = await peer.call("read", rid, 0, 8192)
    for i in range(32):
        assert got[8192 - (i + 1) * 256:8192 - i * 256] == bytes(range(256)), i
    prep.close()


@pytest.mark.parametrize("carry", [True, False], ids=["carried", "rma"])
async def test_a_post_resolves_only_with_every_write_in_place(aiote_make_engine, peer, carry):
    """32 writes to one region per post: once a post resolves, the target's memory holds every
    write's bytes, read back before any imm is waited for.  Over tcp they travel carried in one
    message (carry.c) or, with ``carry_max=0``, as RMA writes of which only the last asks for
    delivery-complete (worker.c dc_needed)."""
    engine = await aiote_make_engine(carry_max=None if carry else 0)
    rid, desc = await peer.call("register", 32 * 4096, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    buf = bytearray(32 * 4096)
    src = engine.register(buf)
    tcp = engine.provider == "tcp;ofi_rxm"
    if tcp and carry:  # the first carriable batch to a peer goes as RMA writes and asks it (a hello)
        await engine.scatter(src, [(d, 0, 0, 8), (d, 8, 8, 8)])
        while engine.stats()["carry_peers"] == 0:
            await asyncio.sleep(0.001)  # noqa: sleep-ok (polls a counter until the peer answered)
    for size in (64, 4096):
        prep = engine.prepare_scatter(src, [(d, i * size, i * size, size) for i in range(32)], imm=5)
        for rnd in range(1, 6):
            buf[:32 * size] = bytes([(rnd * 7 + size) & 0xFF]) * (32 * size)
            before = engine.stats()
            await prep.post()
            assert await peer.call("read", rid, 0, 32 * size) == bytes(buf[:32 * size]), (size, rnd)
            after = engine.stats()
            if tcp:
                assert after["writes_posted"] - before["writes_posted"] == 32
            if tcp and carry:
                assert after["writes_carried"] - before["writes_carried"] == 32
                assert after["writes_delivered"] - before["writes_delivered"] == 0
            elif tcp and engine.info()["delivery_complete"]:
                assert after["writes_carried"] == 0
                assert after["writes_delivered"] - before["writes_delivered"] == 1
        prep.close()
    assert await peer.call("wait_imm", 5, 2 * 5 * 32, 10)


async def test_a_run_to_a_closed_region_inside_a_batch_fails_the_post(engine, aiote_make_peer):
    """A batch whose middle writes go to a region its owner closed (the runs before and after it
    to an open one): the post fails, typed, though the batch's last write is to a good region."""
    a = await aiote_make_peer()
    r_ok, d_ok = await a.call("register", 1 << 16, 0)
    r_bad, d_bad = await a.call("register", 1 << 16, 0x77)
    d_ok, d_bad = aiote.MrDescriptor.from_bytes(d_ok), aiote.MrDescriptor.from_bytes(d_bad)
    src = engine.register(bytearray(b"\x01" * (1 << 16)))
    await engine.write(src, d_bad, 16, imm=3)  # its key works while the region is open
    assert await a.call("wait_imm", 3, 1, 10)
    await a.call("close_region", r_bad)
    batch = [(d_ok, 0, i * 64, 64) for i in range(8)] + [(d_bad, 0, i * 64, 64) for i in range(8)]
    batch += [(d_ok, 0, 4096 + i * 64, 64) for i in range(8)]
    prep = engine.prepare_scatter(src, batch, imm=4)
    res = await asyncio.wait_for(asyncio.gather(prep.post(), return_exceptions=True), 30)
    assert isinstance(res[0], aiote.ProviderError), res
    prep.close()
