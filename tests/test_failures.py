"""Failure paths: each gets a typed error and leaves the engine usable (except after close)."""

import asyncio
import contextlib
import errno
import os
import time

import numpy as np
import pytest

import aiote
from aiote.testing import PeerProcess


@pytest.fixture
def pair(aiote_engine_pair):
    return aiote_engine_pair


async def still_works(a, b):
    src, dst = a.register(bytearray(b"ok" * 8)), b.register(bytearray(16))
    w = b.imms.wait(4242, 1, timeout=10)
    await a.write(src, dst.descriptor, imm=4242)
    await w
    assert dst.obj == bytearray(b"ok" * 8)


def spin_until(pred, timeout=10.0):
    """Wait without yielding to the event loop (so completions stay queued)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"


async def test_out_of_bounds_is_checked_before_posting(pair):
    a, b = pair
    src, dst = a.register(bytearray(1000)), b.register(bytearray(500))
    d = dst.descriptor
    for kw in (dict(length=501), dict(length=10, dst_offset=491), dict(length=1001),
               dict(length=10, src_offset=995), dict(length=1, dst_offset=1 << 63)):
        with pytest.raises(aiote.OutOfBounds) as ei:
            a.write(src, d, **kw)
        assert ei.value.index == 0
    with pytest.raises(aiote.InvalidArgument):
        a.write(src, d, -1)
    assert a.stats()["writes_posted"] == 0
    await still_works(a, b)


@pytest.mark.parametrize("imm", [-1, aiote.IMM_MAX + 1, 1 << 32, "7", 1.5])
async def test_bad_imm_values(pair, imm):
    a, b = pair
    src, dst = a.register(bytearray(8)), b.register(bytearray(8))
    with pytest.raises(aiote.InvalidArgument):
        a.write(src, dst.descriptor, imm=imm)
    with pytest.raises(aiote.InvalidArgument):
        b.imms.wait(imm)
    with pytest.raises(aiote.InvalidArgument):
        b.imms.wait(1, 0)


async def test_registration_errors(pair):
    a, _ = pair
    for bad in (b"read-only bytes", memoryview(bytearray(8)).toreadonly(), 42, bytearray(0),
                np.zeros((4, 4))[:, 1]):
        with pytest.raises(aiote.RegistrationError):
            a.register(bad)
    arr = np.zeros(16, dtype=np.float32)
    mr = a.register(arr)
    assert mr.nbytes == 64 and mr.descriptor.length == 64


async def test_register_torch_cpu_tensor(pair):
    torch = pytest.importorskip("torch")
    a, b = pair
    src = torch.arange(256, dtype=torch.float32)
    dst = torch.zeros(256, dtype=torch.float32)
    ms, md = a.register(src), b.register(dst)
    w = b.imms.wait(1)
    await a.write(ms, md.descriptor, imm=1)
    await w
    assert torch.equal(src, dst)
    with pytest.raises(aiote.RegistrationError):
        a.register(torch.zeros(4, 4).t())


async def test_closed_region(pair):
    a, b = pair
    src, dst = a.register(bytearray(64)), b.register(bytearray(64))
    src.close()
    src.close()  # idempotent
    with pytest.raises(aiote.RegionClosed):
        a.write(src, dst.descriptor)
    await still_works(a, b)


async def test_deregistration_refused_while_in_flight(pair):
    a, b = pair
    big = 64 << 20
    src, dst = a.register(bytearray(big)), b.register(bytearray(big))
    fut = a.write(src, dst.descriptor)
    with pytest.raises(aiote.RegionInUse):
        src.close()
    await fut
    src.close()
    assert src.closed


async def test_cancelled_write_leaves_engine_usable(pair):
    a, b = pair
    src, dst = a.register(bytearray(16 << 20)), b.register(bytearray(16 << 20))
    futs = [a.write(src, dst.descriptor, imm=3) for _ in range(20)]
    for f in futs[5:]:
        f.cancel()
    await asyncio.gather(*futs[:5])
    # the region is released once the withdrawn/landed writes are accounted for
    spin_until(lambda: a.stats()["ops_completed"] + a.stats()["ops_failed"] >= 20)
    await asyncio.sleep(0)
    await still_works(a, b)
    landed = b.imms.pending(3)
    assert 5 <= landed <= 20  # cancelled ones may or may not have landed; none twice
    src.close()


async def test_cancelled_wait_consumes_nothing(pair):
    a, b = pair
    src, dst = a.register(bytearray(8)), b.register(bytearray(8))
    w = b.imms.wait(9, 1)
    w.cancel()
    await asyncio.sleep(0)
    await a.write(src, dst.descriptor, imm=9)
    await b.imms.wait(9, 1, timeout=10)  # the count went to the new waiter


async def test_wait_cancelled_after_it_fired_gives_the_count_back(pair):
    a, b = pair
    src, dst = a.register(bytearray(8)), b.register(bytearray(8))
    w = b.imms.wait(11, 1)
    before = b.stats()["imms_received"]
    wr = a.write(src, dst.descriptor, imm=11)  # not awaited: the loop must not run before the cancel
    spin_until(lambda: b.stats()["imms_received"] > before)  # fired in C, event not yet handled
    assert not w.done()
    w.cancel()
    await wr  # (on shm's direct path it is complete already: this need not let the loop run)
    await b.imms.wait(11, 1, timeout=5)  # the count came back: resolves with it...
    assert b.imms.pending(11) == 0  # ...and it was the only one


async def test_timeout_consumes_nothing(pair):
    a, b = pair
    with pytest.raises(aiote.ImmTimeout):
        await b.imms.wait(12, 2, timeout=0.01)
    src, dst = a.register(bytearray(8)), b.register(bytearray(8))
    await asyncio.gather(a.write(src, dst.descriptor, imm=12), a.write(src, dst.descriptor, imm=12))
    await b.imms.wait(12, 2, timeout=10)


async def test_close_with_work_in_flight(provider, host):
    b = aiote.TransferEngine(provider, host=host)
    # through libfabric, where writes wait in the worker (shm's direct path finishes them in the call)
    async with aiote.TransferEngine(provider, host=host, direct_shm=False) as a:
        b.open()
        src, dst = a.register(bytearray(1 << 20)), b.register(bytearray(1 << 20))
        writes = [a.write(src, dst.descriptor, imm=1) for _ in range(2000)]
        waits = [b.imms.wait(5000 + i) for i in range(100)]
        recv = asyncio.ensure_future(b.recv())
        await asyncio.sleep(0)
        await a.close()
        await b.close()
        results = await asyncio.gather(*writes, *waits, recv, return_exceptions=True)
        assert all(r is None or isinstance(r, aiote.EngineClosed) for r in results[:2000])
        assert any(isinstance(r, aiote.EngineClosed) for r in results[:2000])
        assert all(isinstance(r, aiote.EngineClosed) for r in results[2000:])
        for op in (lambda: a.write(src, dst.descriptor), lambda: a.register(bytearray(4)),
                   lambda: b.imms.wait(1), lambda: a.send(b"x", b"")):
            with pytest.raises(aiote.EngineClosed):
                op()
        with pytest.raises(aiote.EngineClosed):
            await b.recv()
        assert src.closed and dst.closed
        src.close()  # no-op after the engine closed


async def test_target_engine_closed_in_same_process(provider, host):
    """A peer engine of the same process closes while writes to it are in flight: typed errors, no crash."""
    async with aiote.TransferEngine(provider, host=host) as a:
        b = aiote.TransferEngine(provider, host=host).open()
        src, dst = a.register(bytearray(1 << 20)), b.register(bytearray(1 << 20))
        d = dst.descriptor
        writes = [a.write(src, d, imm=1) for _ in range(500)]
        await asyncio.sleep(0)
        await b.close()
        later = [a.write(src, d, imm=1) for _ in range(5)]
        done, pending = await asyncio.wait(writes + later, timeout=5)
        for f in done:
            assert f.exception() is None or isinstance(f.exception(), aiote.ProviderError)
        if provider == "shm":  # the engine knows the same-process peer closed
            assert all(isinstance(f.exception(), aiote.PeerUnreachable) for f in later)
        for f in pending:  # writes the provider never completes stay pending until close or cancel
            f.cancel()
        if provider != "shm":
            # shm completes an endpoint's writes in order: ones stuck on the closed
            # peer hold back later completions to others (docs/concepts.md).
            async with aiote.TransferEngine(provider, host=host) as c:
                await still_works(a, c)


async def test_bad_descriptors_and_addresses(pair):
    a, b = pair
    src = a.register(bytearray(8))
    other = "tcp;ofi_rxm" if a.provider == "shm" else "shm"
    d = b.register(bytearray(8)).descriptor
    forged = aiote.MrDescriptor(other, d.addrs, d.base, d.length, d.keys)
    with pytest.raises(aiote.DescriptorError):
        a.write(src, forged)
    with pytest.raises(aiote.DescriptorError):
        a.write(src, d.to_bytes())  # bytes, not a parsed descriptor
    with pytest.raises(aiote.DescriptorError):
        a.send(b"garbage", b"hi")
    await still_works(a, b)


def test_uvloop():
    uvloop = pytest.importorskip("uvloop")

    async def main():
        async with aiote.TransferEngine("shm") as a, aiote.TransferEngine("shm") as b:
            await still_works(a, b)
            await a.send(b.address, b"via uvloop")
            assert (await b.recv())[0] == b"via uvloop"

    uvloop.run(main())


@pytest.mark.aiote_providers("tcp")
async def test_dead_peer_tcp_fails_pending_writes(aiote_make_engine, aiote_peer, aiote_faults):
    """tcp;ofi_rxm reports a killed peer: pending and new writes fail, typed."""
    eng, peer = await aiote_make_engine(peer_timeout=2), aiote_peer
    _, desc = await peer.call("register", 64 << 20, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = eng.register(bytearray(64 << 20))
    await eng.write(src, d, imm=1)
    aiote_faults.kill(peer)
    futs = [eng.write(src, d, imm=1) for _ in range(8)]
    res = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30)
    # in-flight writes: the provider cancels them (ECANCELED) or resets the connection
    assert all(isinstance(r, aiote.ProviderError) for r in res), res
    later = await asyncio.wait_for(asyncio.gather(eng.write(src, d, 8, imm=1), return_exceptions=True), 30)
    assert isinstance(later[0], aiote.PeerUnreachable), later
    # the engine keeps serving others
    async with aiote.TransferEngine("tcp", host="127.0.0.1") as other:
        await still_works(eng, other)
    # a restarted peer (a new process, a new address) is reachable again
    async with PeerProcess("tcp") as again:
        rid, desc2 = await again.call("register", 4096, 0)
        await eng.write(src, aiote.MrDescriptor.from_bytes(desc2), 4096, imm=2)
        assert await again.call("wait_imm", 2, 1, 10)
        assert await again.call("read", rid, 0, 4096) == bytes(src.obj[:4096])


@pytest.mark.aiote_providers("tcp")
async def test_stale_descriptor_changes_no_memory(aiote_engine, aiote_peer):
    """A region closed by its owner: a write with its old descriptor fails and changes nothing."""
    eng, peer = aiote_engine, aiote_peer
    rid, desc = await peer.call("register", 1 << 16, 0x77)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = eng.register(bytearray(b"\x01" * (1 << 16)))
    await eng.write(src, d, 16, imm=3)  # the key works while the region is open
    assert await peer.call("wait_imm", 3, 1, 10)
    await peer.call("close_region", rid)  # deregistered; the peer keeps the buffer to read it back
    res = await asyncio.wait_for(asyncio.gather(eng.write(src, d, 1 << 16, imm=4), return_exceptions=True), 30)
    assert isinstance(res[0], aiote.ProviderError), res
    assert await peer.call("pending", 4) == 0
    assert await peer.call("read", rid, 16, (1 << 16) - 16) == b"\x77" * ((1 << 16) - 16)


@contextlib.asynccontextmanager
async def _stopped_peer(make_engine, provider, peer_timeout):
    """(engine, 4 KiB source region, descriptor of a 4 KiB region of a peer process) with the
    peer stopped (SIGSTOP) for the block; the direct shm path is off (it needs nothing of the
    target's process).  The peer runs again on the way out."""
    eng = await make_engine(peer_timeout=peer_timeout, direct_shm=False)
    async with PeerProcess(provider) as peer:
        _, desc = await peer.call("register", 4096, 0)
        d = aiote.MrDescriptor.from_bytes(desc)
        src = eng.register(bytearray(4096))
        peer.pause()
        try:
            yield eng, src, d
        finally:
            peer.resume()


async def test_peer_that_never_accepts_times_out(aiote_make_engine, aiote_provider):
    """A peer that stopped before the first write: the provider refuses the post (EAGAIN)
    until peer_timeout, then the write fails with PeerUnreachable (ETIMEDOUT).  (shm's direct
    path needs nothing of the target's process: a write to a stopped one lands, test_direct.py.)"""
    async with _stopped_peer(aiote_make_engine, aiote_provider, peer_timeout=1) as (eng, src, d):
        res = await asyncio.wait_for(asyncio.gather(eng.write(src, d, imm=1), return_exceptions=True), 30)
    assert isinstance(res[0], aiote.PeerUnreachable) and res[0].fi_errno == errno.ETIMEDOUT, res


async def test_operations_waiting_behind_a_refused_one_time_out_too(aiote_make_engine, aiote_provider):
    """Writes queued behind a refused write to the same stopped peer are never offered to the
    provider (one peer's operations leave in order); waiting there counts as being refused, so
    they fail with PeerUnreachable (ETIMEDOUT) after peer_timeout like the first, not one
    peer_timeout after another."""
    async with _stopped_peer(aiote_make_engine, aiote_provider, peer_timeout=2) as (eng, src, d):
        t0 = time.monotonic()
        writes = [eng.write(src, d, imm=1) for _ in range(3)]
        res = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 30)
        took = time.monotonic() - t0
    for r in res:
        assert isinstance(r, aiote.PeerUnreachable) and r.fi_errno == errno.ETIMEDOUT, res
    assert took < 5, took  # together (~2 s), not one peer_timeout after another (6 s)


@pytest.mark.aiote_providers("shm")
async def test_cancelling_messages_held_behind_a_refused_one_withdraws_them():
    """Messages queued for a stopped shm peer (its connection request untaken) were never handed
    to the provider: cancelling two of them withdraws them (the awaits raise CancelledError),
    and once the peer runs the others arrive, in order, without them."""
    async with PeerProcess("shm") as peer:
        addr = await peer.call("address")
        async with aiote.TransferEngine("shm", peer_timeout=60) as eng:
            peer.pause()
            try:
                sends = [eng.send(addr, b"c%d" % i) for i in range(5)]
                while eng.stats()["eagain"] == 0:
                    await asyncio.sleep(0.001)  # noqa: sleep-ok (polls a C counter: no event to await)
                sends[1].cancel()
                sends[3].cancel()
                for f in (sends[1], sends[3]):
                    with pytest.raises(asyncio.CancelledError):
                        await f
            finally:
                peer.resume()
            kept = [sends[i] for i in (0, 2, 4)]
            await _echoed_in_order(peer, eng, kept, [b"c0", b"c2", b"c4"])


@pytest.mark.aiote_providers("shm")
async def test_dead_peer_shm_fails_and_spares_others(aiote_make_engine, aiote_make_peer, aiote_faults):
    """shm never reports a killed peer: the engine sees its process exit (pidfd) and fails
    what goes to it; traffic to other peers, at the same moment, completes."""
    eng = await aiote_make_engine(peer_timeout=30)  # the timeout must not be what ends it
    dead, live = await aiote_make_peer(), await aiote_make_peer()
    _, dd = await dead.call("register", 1 << 20, 0)
    rid, ld = await live.call("register", 1 << 20, 0)
    dd, ld = aiote.MrDescriptor.from_bytes(dd), aiote.MrDescriptor.from_bytes(ld)
    src = eng.register(bytearray(np.random.default_rng(5).integers(0, 256, 1 << 20, dtype=np.uint8)))
    await eng.write(src, dd, imm=1)  # connected and working; the peer is idle again
    dead_addr = await dead.call("address")
    aiote_faults.kill(dead)
    await asyncio.get_running_loop().run_in_executor(None, dead.proc.join)  # gone, for sure
    to_dead = [eng.write(src, dd, imm=1) for _ in range(8)] + [eng.send(dead_addr, b"x")]
    to_live = [eng.write(src, ld, 1 << 16, i << 16, i << 16, imm=9) for i in range(16)]
    res = await asyncio.wait_for(asyncio.gather(*to_dead, *to_live, return_exceptions=True), 20)
    dead_res, live_res = res[:len(to_dead)], res[len(to_dead):]
    assert all(isinstance(r, aiote.PeerUnreachable) for r in dead_res), dead_res
    assert live_res == [None] * 16
    assert await live.call("wait_imm", 9, 16, 10)
    assert await live.call("read", rid, 0, 1 << 20) == bytes(src.obj)
    # a restarted peer (a new process, so a new address) is reachable
    again = await aiote_make_peer()
    rid2, d2 = await again.call("register", 4096, 0)
    await eng.write(src, aiote.MrDescriptor.from_bytes(d2), 4096, imm=2)
    assert await again.call("wait_imm", 2, 1, 10)
    assert await again.call("read", rid2, 0, 4096) == bytes(src.obj[:4096])


@pytest.mark.aiote_providers("shm")
async def test_shm_peer_killed_mid_transfer_never_hangs(aiote_make_engine, aiote_make_peer, aiote_faults):
    """Killed while writes to it are in flight.  Everything to it fails with PeerUnreachable.
    If it died inside libfabric shm's critical section, the lock it held stays taken and the
    next post to it can never return: the engine notices (watchdog) and fails everything with
    PeerUnreachable instead of hanging.  Otherwise other peers are served as usual."""
    eng = await aiote_make_engine(peer_timeout=30)
    dead, live = await aiote_make_peer(), await aiote_make_peer()
    _, dd = await dead.call("register", 16 << 20, 0)
    rid, ld = await live.call("register", 1 << 20, 0)
    dd, ld = aiote.MrDescriptor.from_bytes(dd), aiote.MrDescriptor.from_bytes(ld)
    src = eng.register(bytearray(16 << 20))
    await eng.write(src, dd, imm=1)
    await eng.write(src, ld, 1 << 16, imm=8)  # both peers resolved before the kill
    to_dead = [eng.write(src, dd, imm=1) for _ in range(16)]
    aiote_faults.kill(dead)
    to_live = [eng.write(src, ld, 1 << 16, 0, i << 16, imm=9) for i in range(16)]
    res = await asyncio.wait_for(asyncio.gather(*to_dead, *to_live, return_exceptions=True), 30)
    dead_res, live_res = res[:16], res[16:]
    assert all(r is None or isinstance(r, aiote.PeerUnreachable) for r in dead_res), dead_res
    assert any(isinstance(r, aiote.PeerUnreachable) for r in dead_res), dead_res
    if eng.closed:  # wedged: everything failed, typed
        assert all(isinstance(r, aiote.PeerUnreachable) for r in live_res if r is not None), live_res
        with pytest.raises(aiote.EngineClosed):
            eng.write(src, ld, 16)
    else:
        assert live_res == [None] * 16
        assert await live.call("wait_imm", 9, 16, 10)


async def test_wait_on_a_dead_writer_fails(aiote_make_engine, aiote_make_peer, aiote_faults):
    """imms.wait(..., peer=writer): the writer dies part way; the wait fails with
    PeerUnreachable and consumes nothing (what landed stays counted)."""
    eng = await aiote_make_engine(peer_timeout=2)
    dst = eng.register(bytearray(4096))
    writer = await aiote_make_peer()
    rid, _ = await writer.call("register", 4096, 0)
    addr = await writer.call("address")
    w = eng.imms.wait(77, 5, peer=addr)
    await writer.call("write_many", rid, dst.descriptor.to_bytes(), [(64, 0, 64 * i, 77) for i in range(2)])
    aiote_faults.kill(writer)
    with pytest.raises(aiote.PeerUnreachable):
        await asyncio.wait_for(w, 20)
    assert eng.imms.pending(77) == 2
    # a wait on a writer that is alive resolves as usual, probes and all
    other = await aiote_make_peer()
    rid, _ = await other.call("register", 4096, 0)
    w = eng.imms.wait(78, 3, peer=await other.call("address"))
    await other.call("write_many", rid, dst.descriptor.to_bytes(), [(64, 0, 64 * i, 78) for i in range(3)])
    await asyncio.wait_for(w, 20)
    assert eng.imms.pending(78) == 0
    # a wait naming a peer already known dead fails without waiting (shm: the process is gone)
    if eng.provider == "shm":
        with pytest.raises(aiote.PeerUnreachable):
            await asyncio.wait_for(eng.imms.wait(79, 1, peer=addr), 20)


async def test_submission_backpressure_is_bounded(aiote_make_engine):
    """Past max_queued elements, operations wait in Python; past max_deferred of those,
    submission raises QueueFull and queues nothing; drain() waits for room."""
    a = await aiote_make_engine(max_queued=4, max_deferred=8, direct_shm=False)  # direct: nothing queues
    b = await aiote_make_engine()
    src = a.register(bytearray(range(256)) * 256)
    dst = b.register(bytearray(64 * 1024))
    futs = []
    with pytest.raises(aiote.QueueFull):
        for i in range(1000):
            futs.append(a.write(src, dst.descriptor, 4096, 0, (i % 16) * 4096, imm=5))
    # at least max_queued went to the engine (more if some finished meanwhile), then
    # exactly max_deferred wait in Python; the refused one is nowhere
    assert len(a._deferred) == 8 and len(futs) >= 4 + 8
    await a.drain()
    assert len(a._deferred) == 0
    more = [a.write(src, dst.descriptor, 4096, 0, 0, imm=5) for _ in range(4)]
    await asyncio.wait_for(asyncio.gather(*futs, *more), 30)
    await asyncio.wait_for(b.imms.wait(5, len(futs) + 4), 30)
    assert b.imms.pending(5) == 0
    assert bytes(dst.obj[:4096]) == bytes(src.obj[:4096])
    with pytest.raises(aiote.InvalidArgument):
        aiote.TransferEngine("shm", max_deferred=0)


@pytest.mark.aiote_providers("shm")
async def test_shm_peer_dying_inside_the_provider_wedges_only_that_engine(aiote_make_engine, aiote_make_peer):
    """A shm peer killed while it copies a large write dies holding the spin lock of its
    shared region; libfabric 1.17's next post to it would spin forever.  The engine's
    watchdog sees its worker stuck on that dead peer, stops the worker, and fails every
    pending operation with PeerUnreachable; the process and other engines carry on."""
    n = 256 << 20
    # through libfabric (the direct path's copy threads would take this write: no shm lock)
    eng = await aiote_make_engine(peer_timeout=30, direct_shm=False)
    src = eng.register(bytearray(b"\x01") * n)
    for _ in range(5):
        peer = await aiote_make_peer()
        rid, d = await peer.call("register", n, 0)
        d = aiote.MrDescriptor.from_bytes(d)
        addr = await peer.call("address")
        w = eng.write(src, d, imm=1)
        while True:  # until the copy is under way in the peer (it holds its region's lock)
            first, last = await peer.call("read", rid, 0, 1), await peer.call("read", rid, n - 1, 1)
            if first == b"\x01" or last == b"\x01" or w.done():
                break
        if last == b"\x01" or w.done():
            continue  # finished before we looked: try again
        peer.kill()
        sent = eng.send(addr, b"x")
        try:  # a control call (registration) while the worker may be stuck: it must not hang either
            eng.register(bytearray(64))
            refused = False
        except aiote.EngineClosed:
            refused = True
        res = await asyncio.wait_for(asyncio.gather(w, sent, return_exceptions=True), 30)
        assert all(isinstance(r, aiote.PeerUnreachable) for r in res), res
        if not eng.closed:
            assert not refused
            continue  # it died outside the lock this time: the pidfd path handled it; again
        with pytest.raises(aiote.EngineClosed):
            eng.write(src, d, 16)
        break
    else:
        pytest.skip("no peer died holding its lock in 5 tries")
    # the process and its other shm engines are fine
    other, live = await aiote_make_engine(), await aiote_make_peer()
    rid, ld = await live.call("register", 4096, 0)
    s2 = other.register(bytearray(b"\x07") * 4096)
    await other.write(s2, aiote.MrDescriptor.from_bytes(ld), imm=3)
    assert await live.call("wait_imm", 3, 1, 10)
    assert await live.call("read", rid, 0, 4096) == b"\x07" * 4096


_STALE_CHILD = r"""
import asyncio, os, sys
import aiote
# what a killed process with this pid would have left: shm region files named after the pid
stale = [f"/dev/shm/{os.getpid()}:0:{i}" for i in range(8)]
for p in stale:
    open(p, "wb").close()

async def main():
    async with aiote.TransferEngine("shm") as a, aiote.TransferEngine("shm") as b:
        src, dst = bytearray(b"x" * 64), bytearray(64)
        mr, dmr = a.register(src), b.register(dst)
        await a.write(mr, dmr.descriptor, imm=5)
        await b.imms.wait(5, timeout=30)
        assert dst == src
    print("OK", sum(os.path.exists(p) for p in stale))

asyncio.run(main())
"""


def test_shm_files_left_by_a_dead_process_with_our_pid_are_swept(tmp_path):
    """A killed process leaves /dev/shm/<pid>:* behind; a new process that gets the same pid
    used to fail opening (EBUSY) or connecting its per-peer endpoints."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _STALE_CHILD], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


async def test_closing_a_same_process_shm_peer_with_writes_in_flight_doesnt_corrupt_the_process():
    """shm: an engine that closes with writes to another engine of this process in flight leaves
    commands in that engine's queue; answering them used to write into the closed engine's freed
    region (heap corruption, segfaults: ~1 in 2 runs of test_close_with_work_in_flight).  Its
    objects now stay mapped until the engines that may answer it are gone."""
    for _ in range(5):
        async with aiote.TransferEngine("shm") as b, aiote.TransferEngine("shm") as c:
            a = aiote.TransferEngine("shm").open()
            src, dst = a.register(bytearray(1 << 20)), b.register(bytearray(1 << 20))
            writes = [a.write(src, dst.descriptor, imm=1) for _ in range(300)]
            await asyncio.sleep(0)
            await a.close()
            await asyncio.gather(*writes, return_exceptions=True)
            churn = [bytearray(4 << 20) for _ in range(16)]  # reuse freed address ranges
            # b keeps progressing and working with a third engine, both ways
            bufs = [bytearray(b"x" * 4096), bytearray(4096), bytearray(b"y" * 4096), bytearray(4096)]
            bsrc, cdst, csrc, bdst = b.register(bufs[0]), c.register(bufs[1]), c.register(bufs[2]), b.register(bufs[3])
            for _ in range(50):
                await asyncio.gather(b.write(bsrc, cdst.descriptor, imm=2), c.write(csrc, bdst.descriptor, imm=3))
            await asyncio.gather(c.imms.wait(2, 50, timeout=30), b.imms.wait(3, 50, timeout=30))
            assert bufs[1] == bufs[0] and bufs[3] == bufs[2]
            del churn


def _worker_threads() -> set[str]:
    out = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == "aiote-worker":
                    out.add(tid)
        except OSError:
            continue
    return out


def _cpu_ns(tid: str) -> int:
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


async def test_a_refused_post_is_retried_with_backoff_not_in_a_hot_loop():
    """shm: a post the peer cannot take yet (here: our connection request, the peer stopped) is
    refused with EAGAIN.  The worker used to offer it again in a sched_yield loop, a core's worth
    of attempts that each take the peer's region lock, which the peer's own progress needs to
    take the request (the lead for the torchrun demo's rare 10 s stalls, docs/reliability.md).
    After 50 us of refusal it now waits 1/16 of the refusal so far (at most 1 ms) between
    attempts, napping meanwhile; the post still goes through once the peer takes it."""
    async with PeerProcess("shm") as peer:
        addr = await peer.call("address")
        before = _worker_threads()
        async with aiote.TransferEngine("shm", peer_timeout=60) as eng:
            (tid,) = _worker_threads() - before
            peer.pause()
            try:
                sent = eng.send(addr, b"held")
                while eng.stats()["eagain"] == 0:  # our request waits in the stopped peer's queue
                    await asyncio.sleep(0.001)  # noqa: sleep-ok (polls a C counter: no event to await)
                # a measuring window, not a synchronisation: the backoff reaches its 1 ms cap
                # after 16 ms of refusal; count the attempts over the next second
                await asyncio.sleep(0.1)  # noqa: sleep-ok
                s0, cpu0, t0 = eng.stats(), _cpu_ns(tid), time.monotonic()
                await asyncio.sleep(1.0)  # noqa: sleep-ok
                s1, cpu1, t1 = eng.stats(), _cpu_ns(tid), time.monotonic()
            finally:
                peer.resume()
            attempts, window = s1["eagain"] - s0["eagain"], t1 - t0
            assert 0 < attempts <= 1.2 * window * 1000 + 20, attempts  # at most one per ms
            assert s1["retry_naps"] > s0["retry_naps"]
            assert cpu1 - cpu0 < 0.25 * window * 1e9  # naps, not a spinning core
            # nothing lost: once the peer runs again it takes the request and the message
            echo = peer.call("echo_messages", 1)
            got = await asyncio.wait_for(asyncio.gather(eng.recv(), sent, echo), 60)
            assert got[0][0] == b"re:held"
            assert peer.alive


async def _echoed_in_order(peer, eng, sent, payloads) -> None:
    """The peer (running again) answers each of our messages; every send completes and the
    answers come back in the order the messages were sent."""
    echo = peer.call("echo_messages", len(payloads))
    got = [(await asyncio.wait_for(eng.recv(), 60))[0] for _ in payloads]
    await asyncio.wait_for(asyncio.gather(*sent, echo), 60)
    assert got == [b"re:" + p for p in payloads]


async def test_messages_to_a_peer_that_refuses_them_keep_their_order():
    """Messages to one peer leave in submission order even while the provider refuses them: a
    later message never overtakes a refused (or deferred, above) earlier one to the same peer.
    The KV demo's client takes token i only after token i-1; a reordered pair lost tokens."""
    async with PeerProcess("shm") as peer:
        addr = await peer.call("address")
        async with aiote.TransferEngine("shm") as eng:
            peer.pause()
            try:
                sends = [eng.send(addr, b"m%03d" % i) for i in range(50)]
                while eng.stats()["eagain"] == 0:  # the first waits in the stopped peer's queue
                    await asyncio.sleep(0.001)  # noqa: sleep-ok (polls a C counter: no event to await)
                # long enough for the first to be deferred (backoff from 50 us on), not a sync
                await asyncio.sleep(0.05)  # noqa: sleep-ok
            finally:
                peer.resume()
            await _echoed_in_order(peer, eng, sends, [b"m%03d" % i for i in range(50)])


async def test_many_messages_held_for_one_peer_dont_hold_up_another():
    """Twenty messages wait for a stopped shm peer (its connection request untaken); a message
    to another engine still goes out at once.  The pending scan used to stop after 8 refused
    operations, so a ninth queued for the stuck peer held back every peer behind it until
    ``peer_timeout``; operations that wait behind a refused one to the same peer are now
    skipped without counting."""
    async with PeerProcess("shm") as peer:
        addr = await peer.call("address")
        async with aiote.TransferEngine("shm", peer_timeout=60) as eng, \
                aiote.TransferEngine("shm") as other:
            peer.pause()
            try:
                held = [eng.send(addr, b"h%02d" % i) for i in range(20)]
                while eng.stats()["eagain"] == 0:
                    await asyncio.sleep(0.001)  # noqa: sleep-ok (polls a C counter: no event to await)
                await asyncio.wait_for(asyncio.gather(eng.send(other.address, b"free"), other.recv()), 10)
                assert not any(f.done() for f in held)
            finally:
                peer.resume()
            await _echoed_in_order(peer, eng, held, [b"h%02d" % i for i in range(20)])


async def test_closing_before_a_peer_took_our_connection_request_spares_the_peer():
    """shm (libfabric 1.17): the first post to a peer queues a connection request naming the
    sender's endpoint and is refused (EAGAIN) until the peer's progress takes it, which maps the
    sender's region by that name.  An engine that closed before then used to remove the name, and
    the peer, taking the request later, dereferenced NULL and died of SIGSEGV in fi_cq_read (the
    torchrun KV demo: the router closed the sending engine of a worker it had given up on while
    the worker was still alive).  The closing engine now keeps its endpoints instead."""
    async with PeerProcess("shm") as peer:
        addr = await peer.call("address")
        peer.pause()
        try:
            eng = aiote.TransferEngine("shm").open()
            first = eng.send(addr, b"never")
            while eng.stats()["eagain"] == 0:  # our request waits in the stopped peer's queue
                await asyncio.sleep(0.001)  # noqa: sleep-ok (polls a C counter: no event to await)
            await eng.close()
        finally:
            peer.resume()
        with pytest.raises(aiote.EngineClosed):
            await first
        # the peer takes our request, then a new sender's (its queue is in order): an answer
        # to the new sender means it took ours and lived
        echo = peer.call("echo_messages", 1)
        async with aiote.TransferEngine("shm") as other:
            got = await asyncio.wait_for(asyncio.gather(other.recv(), other.send(addr, b"ping"), echo), 60)
        data, _ = got[0]
        assert data == b"re:ping"
        assert peer.alive
