"""Inline small writes on the direct path (branch ring): the payload travels in the target's
shared-memory ring, the target applies it, counts its imm, then acknowledges; the write's
future resolves on the acknowledgement.  Real processes (PeerProcess); no sleeps."""

import asyncio
import errno
import os

import numpy as np
import pytest

import aiote
from aiote._core import lib

pytestmark = pytest.mark.aiote_providers("shm")

U32, U64 = 2**32 - 1, 2**64 - 1

# Inline writes go only to a target that polls (its worker awake or its loop spinning; a
# sleeping one gets process_vm_writev, which needs nothing of it): targets here busy-poll,
# so which path a write takes does not depend on scheduling.


@pytest.fixture
async def peer(aiote_make_peer):
    return await aiote_make_peer(polling="busy")


@pytest.fixture
async def engine(aiote_make_engine):
    return await aiote_make_engine(polling="busy")


async def _pause(faults, peer) -> None:
    """SIGSTOP the peer and wait until every thread of it has stopped (SIGSTOP is delivered
    asynchronously; polled on /proc, no timed wait)."""
    faults.pause(peer)
    pid = peer.proc.pid
    while True:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:
                continue
        if states and all(s in "tT" for s in states):
            return
        await asyncio.sleep(0)  # noqa: sleep-ok (one loop turn between polls of /proc)


async def test_bytes_exact_around_the_threshold(aiote_make_engine, peer):
    """Sizes on both sides of the threshold, unaligned offsets: bytes and imm counts exact; what
    is at most the threshold went inline (no syscall), the rest through process_vm_writev."""
    eng = await aiote_make_engine(direct_inline=256)
    rid, d = await peer.call("register", 1 << 16, 0x5A)
    d = aiote.MrDescriptor.from_bytes(d)
    data = np.random.default_rng(3).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
    src = eng.register(bytearray(data))
    expect = bytearray(b"\x5a" * (1 << 16))
    sizes = [0, 1, 7, 63, 64, 65, 191, 255, 256, 257, 1000]
    dst = 3
    for i, n in enumerate(sizes):
        so = 11 * i + 1
        await eng.write(src, d, n, so, dst, imm=40)
        expect[dst:dst + n] = data[so:so + n]
        dst += n + 5
    assert await peer.call("wait_imm", 40, len(sizes), 10)
    assert await peer.call("pending", 40) == 0
    assert await peer.call("read", rid, 0, 1 << 16) == bytes(expect)
    st = eng.stats()
    assert st["direct_inline"] == 9 and st["direct_syscalls"] == 2, st
    assert st["direct_writes"] == len(sizes) and st["writes_posted"] == 0, st


async def test_threshold_is_configurable(aiote_make_engine, peer):
    rid, d = await peer.call("register", 4096, 0)
    d = aiote.MrDescriptor.from_bytes(d)
    off = await aiote_make_engine(direct_inline=0)
    big = await aiote_make_engine(direct_inline=1024)
    for eng in (off, big):
        src = eng.register(bytearray(b"\x21" * 4096))
        await eng.write(src, d, 1000, 0, 17)
    assert off.stats()["direct_inline"] == 0 and off.stats()["direct_syscalls"] == 1
    assert big.stats()["direct_inline"] == 1 and big.stats()["direct_syscalls"] == 0
    assert await peer.call("read", rid, 17, 1000) == b"\x21" * 1000
    with pytest.raises(aiote.InvalidArgument):
        aiote.TransferEngine("shm", direct_inline=5000)


async def test_batches_go_as_one_publish(engine, peer):
    """A prepared scatter of 32 x 64 B and a paged write of small pages: every element an
    inline entry, no syscall; bytes and counts exact over many posts."""
    rid, d = await peer.call("register", 1 << 16, 0)
    d = aiote.MrDescriptor.from_bytes(d)
    data = np.random.default_rng(4).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
    src = engine.register(bytearray(data))
    targets = [(d, 64 * i + 3, 128 * i + 1, 64) for i in range(32)]
    prep = engine.prepare_scatter(src, targets, imm=7)
    for _ in range(200):
        await prep.post()
    await engine.write_paged(src, d, 100, list(range(20)), list(range(19, -1, -1)), src_stride=100,
                             dst_stride=100, dst_offset=8192, imm=8)
    assert await peer.call("wait_imm", 7, 32 * 200, 10)
    assert await peer.call("wait_imm", 8, 20, 10)
    expect = bytearray(1 << 16)
    for _, so, do, n in targets:
        expect[do:do + n] = data[so:so + n]
    for s, t in zip(range(20), range(19, -1, -1), strict=True):
        expect[8192 + t * 100:8192 + t * 100 + 100] = data[s * 100:s * 100 + 100]
    assert await peer.call("read", rid, 0, 1 << 16) == bytes(expect)
    st = engine.stats()
    assert st["direct_inline"] == 32 * 200 + 20 and st["direct_syscalls"] == 0, st


async def test_imm_counts_exact_from_several_initiators(engine, aiote_make_peer):
    """Three initiator processes, 1,500 concurrent 64 B writes each with one imm into this
    engine: exactly 4,500 imms, every byte in place."""
    peers = [await aiote_make_peer(polling="busy") for _ in range(3)]
    buf = np.zeros(3 * 1500 * 64, dtype=np.uint8)
    mr = engine.register(buf)
    desc = mr.descriptor.to_bytes()
    calls = []
    for k, p in enumerate(peers):
        rid, _ = await p.call("register", 64, 0x11 * (k + 1))
        items = [(64, 0, (k * 1500 + i) * 64, 9) for i in range(1500)]
        calls.append(p.call("write_many", rid, desc, items))
    await asyncio.gather(*calls)
    await engine.imms.wait(9, 4500, timeout=30)
    assert engine.imms.pending(9) == 0
    for k in range(3):
        assert (buf[k * 1500 * 64:(k + 1) * 1500 * 64] == 0x11 * (k + 1)).all()
    for p in peers:
        assert (await p.call("stats"))["direct_inline"] > 0


async def test_imm_never_counted_before_its_bytes(engine, peer):
    """While 2,000 small writes with an imm stream in, every look at the count finds at least
    that many writes' bytes in place (the count is read first, then the bytes)."""
    n = 2000
    buf = np.zeros(n * 64, dtype=np.uint8)
    mr = engine.register(buf)
    rid, _ = await peer.call("register", 64, 0x77)
    task = asyncio.ensure_future(peer.call("write_many", rid, mr.descriptor.to_bytes(),
                                           [(64, 0, i * 64, 11) for i in range(n)]))
    looks = 0
    while True:
        c = engine.imms.pending(11)
        landed = int((buf.reshape(n, 64) == 0x77).all(axis=1).sum())
        assert landed >= c, (landed, c)
        looks += 1
        if c == n:
            break
        await asyncio.sleep(0)  # noqa: sleep-ok (one loop turn between polls of /proc)
    await task
    assert looks > 0


async def test_forged_entries_fail_typed_and_leave_the_target_whole(engine, peer):
    """Raw entries with a wrong key, generation or slot, out of bounds, or longer than their
    payload: each gets its error status, no byte lands, no imm is counted; a valid raw entry
    and later writes still work.  After the region closes, its entries fail as stale."""
    rid, d = await peer.call("register", 4096, 0x10)
    desc = aiote.MrDescriptor.from_bytes(d)
    src = engine.register(bytearray(b"\x42" * 4096))
    await engine.write(src, desc, 8, imm=50)  # resolves the descriptor, claims the lane
    h, rd = engine._h, engine._rdesc(desc)
    key = desc.keys[0]

    def raw(slot=U32, state=U64, k=U64, off=0, ln=8, payload=8, imm=51):
        return lib.aiote_direct_inline_raw(h, rd, slot, state, k, off, ln, payload, 1, imm)

    assert raw(k=key ^ 1) == -lib.AIOTE_E_NO_MR
    assert raw(slot=8000) == -lib.AIOTE_E_NO_MR
    assert raw(slot=U32 - 1) == -lib.AIOTE_E_NO_MR
    assert raw(off=4092) == -lib.AIOTE_E_BOUNDS
    assert raw(off=U64 - 3) == -lib.AIOTE_E_BOUNDS
    assert raw(ln=200, payload=8) == -lib.AIOTE_E_INVAL
    assert raw(ln=2**32 - 1, payload=8) == -lib.AIOTE_E_INVAL
    assert await peer.call("pending", 51) == 0
    expect = bytearray(b"\x10" * 4096)
    expect[0:8] = b"\x42" * 8
    assert await peer.call("read", rid, 0, 4096) == bytes(expect)
    assert raw(off=100, ln=5, payload=5, imm=52) == 0  # the hook's payload is 0xAB
    expect[100:105] = b"\xab" * 5
    assert await peer.call("wait_imm", 52, 1, 10)
    await engine.write(src, desc, 16, 0, 200, imm=53)
    expect[200:216] = b"\x42" * 16
    assert await peer.call("wait_imm", 53, 1, 10)
    assert await peer.call("read", rid, 0, 4096) == bytes(expect)

    await peer.call("close_region", rid)
    assert raw(imm=54) == -lib.AIOTE_E_NO_MR
    with pytest.raises(aiote.ProviderError) as ei:
        await engine.write(src, desc, 8, 0, 300, imm=55)
    assert ei.value.fi_errno == errno.EKEYREJECTED
    assert await peer.call("read", rid, 0, 4096) == bytes(expect)
    assert await peer.call("pending", 54) == 0 and await peer.call("pending", 55) == 0


async def test_stopped_target_the_loop_stays_free_then_it_lands(engine, peer, aiote_faults):
    """A stopped target can't apply: the write is handed to the worker (the event loop runs
    on: a write to another target completes meanwhile) and resolves once it runs again."""
    rid, d = await peer.call("register", 4096, 0)
    d = aiote.MrDescriptor.from_bytes(d)
    src = engine.register(bytearray(b"\x3c" * 4096))
    await engine.write(src, d, 8, imm=1)
    assert await peer.call("wait_imm", 1, 1, 10)
    await _pause(aiote_faults, peer)
    fut = asyncio.ensure_future(engine.write(src, d, 8, 0, 64, imm=2))
    # a second small write while the first waits: not inline (one batch per target at a
    # time), copied with process_vm_writev into the stopped process: complete at once
    await engine.write(src, d, 8, 0, 128)
    aiote_faults.resume(peer)
    await asyncio.wait_for(fut, 30)
    assert await peer.call("wait_imm", 2, 1, 10)
    data = await peer.call("read", rid, 0, 256)
    assert data[64:72] == b"\x3c" * 8 and data[128:136] == b"\x3c" * 8


async def test_dead_target_fails_typed(engine, peer, aiote_faults):
    """A target killed while an inline write waits for it: PeerUnreachable; later small writes
    fail the same way at once."""
    rid, d = await peer.call("register", 4096, 0)
    d = aiote.MrDescriptor.from_bytes(d)
    src = engine.register(bytearray(4096))
    await engine.write(src, d, 8)
    await _pause(aiote_faults, peer)
    fut = asyncio.ensure_future(engine.write(src, d, 8, imm=3))
    await asyncio.sleep(0)  # noqa: sleep-ok (one loop turn: the write is submitted before the kill)
    aiote_faults.kill(peer)
    with pytest.raises(aiote.PeerUnreachable):
        await asyncio.wait_for(fut, 30)
    with pytest.raises(aiote.PeerUnreachable):
        await engine.write(src, d, 8)


async def test_dead_initiator_leaves_no_half_entry(engine, aiote_make_peer, aiote_faults):
    """An initiator killed while it streams small writes: every 64 B block is whole or
    untouched, and a new initiator's inline writes land exactly."""
    a = await aiote_make_peer(polling="busy")
    n = 20000
    buf = np.zeros(n * 64, dtype=np.uint8)
    mr = engine.register(buf)
    rid, _ = await a.call("register", 64, 0x66)
    task = asyncio.ensure_future(a.call("write_many", rid, mr.descriptor.to_bytes(),
                                        [(64, 0, i * 64, 12) for i in range(n)]))
    await engine.imms.wait(12, 100, timeout=30)
    aiote_faults.kill(a)
    with pytest.raises(Exception):  # noqa: B017 - the call dies with its process
        await task
    blocks = buf.reshape(n, 64)
    whole = (blocks == 0x66).all(axis=1)
    assert (whole | (blocks == 0).all(axis=1)).all()
    b = await aiote_make_peer(polling="busy")
    rid_b, _ = await b.call("register", 64, 0x99)
    await b.call("write_many", rid_b, mr.descriptor.to_bytes(), [(64, 0, i * 64, 13) for i in range(50)])
    await engine.imms.wait(13, 50, timeout=30)
    assert (blocks[:50] == 0x99).all()
    assert (await b.call("stats"))["direct_inline"] > 0  # the rest: process_vm_writev while one waited


async def test_cancel_does_not_withdraw_a_published_entry(engine, peer, aiote_faults):
    """Cancelling the future of an inline write that waits for its target: the entry is
    published and still lands (documented); the engine goes on normally."""
    rid, d = await peer.call("register", 4096, 0)
    d = aiote.MrDescriptor.from_bytes(d)
    src = engine.register(bytearray(b"\x5e" * 4096))
    await engine.write(src, d, 8)
    await _pause(aiote_faults, peer)
    fut = asyncio.ensure_future(engine.write(src, d, 8, 0, 512, imm=4))
    await asyncio.sleep(0)  # noqa: sleep-ok (one loop turn: the write is submitted before the cancel)
    fut.cancel()
    aiote_faults.resume(peer)
    assert await peer.call("wait_imm", 4, 1, 10)
    assert (await peer.call("read", rid, 512, 8)) == b"\x5e" * 8
    await engine.write(src, d, 8, 0, 1024, imm=5)
    assert await peer.call("wait_imm", 5, 1, 10)


async def test_initiator_close_while_waiting(aiote_make_engine, peer, aiote_faults):
    """The initiator engine closes while an inline write waits for a stopped target: the write
    fails with EngineClosed; the target applies the entry when it runs again, unharmed."""
    eng = await aiote_make_engine()
    rid, d = await peer.call("register", 4096, 0)
    d = aiote.MrDescriptor.from_bytes(d)
    src = eng.register(bytearray(b"\x71" * 4096))
    await eng.write(src, d, 8)
    await _pause(aiote_faults, peer)
    fut = asyncio.ensure_future(eng.write(src, d, 8, 0, 256, imm=6))
    await asyncio.sleep(0)  # noqa: sleep-ok (one loop turn: the write is submitted before the close)
    await eng.close()
    aiote_faults.resume(peer)
    with pytest.raises(aiote.EngineClosed):
        await fut
    assert await peer.call("wait_imm", 6, 1, 10)
    assert await peer.call("read", rid, 256, 8) == b"\x71" * 8


async def test_target_engine_closed_while_waiting(engine, aiote_make_peer, aiote_faults):
    """The target's engine closes (its process lives on) before it applied our entry: the
    write fails typed (PeerUnreachable), nothing hangs."""
    peer = await aiote_make_peer(polling="busy")
    rid, d = await peer.call("register", 4096, 0)
    d = aiote.MrDescriptor.from_bytes(d)
    src = engine.register(bytearray(4096))
    await engine.write(src, d, 8)
    await _pause(aiote_faults, peer)
    fut = asyncio.ensure_future(engine.write(src, d, 8, imm=7))
    await asyncio.sleep(0)  # noqa: sleep-ok (one loop turn: the write is submitted first)
    aiote_faults.resume(peer)
    await peer.call("exit")
    try:
        await asyncio.wait_for(fut, 30)  # applied before the close: fine
    except aiote.PeerUnreachable:
        pass


async def test_ring_full_falls_back(aiote_make_engine, peer, aiote_faults):
    """A batch that timed out (stopped target) leaves its entries in the ring; the next batch
    that does not fit goes through process_vm_writev and completes; after the target runs
    again, everything landed and inline writes work again."""
    eng = await aiote_make_engine(peer_timeout=0.3)
    rid, d = await peer.call("register", 1 << 16, 0)
    d = aiote.MrDescriptor.from_bytes(d)
    src = eng.register(bytearray(b"\x13" * (1 << 16)))
    big = eng.prepare_scatter(src, [(d, 0, 64 * i, 64) for i in range(256)], imm=8)  # 512 cells
    await eng.write(src, d, 8, 0, 40000)
    await _pause(aiote_faults, peer)
    with pytest.raises(aiote.PeerUnreachable):  # ETIMEDOUT: the entries stay published
        await big.post()
    await big.post()  # no room: copied with process_vm_writev into the stopped process
    assert eng.stats()["direct_inline_full"] == 1
    aiote_faults.resume(peer)
    assert await peer.call("wait_imm", 8, 512, 10)
    assert await peer.call("read", rid, 0, 256 * 64) == b"\x13" * (256 * 64)
    before = eng.stats()["direct_inline"]
    await eng.write(src, d, 8, 0, 50000)
    assert eng.stats()["direct_inline"] == before + 1


@pytest.mark.parametrize("spin", [0, 200])
async def test_ping_pong_inline(aiote_make_engine, aiote_make_peer, spin):
    """A 64 B ping-pong with imms, with and without a spinning loop on both sides: every
    round's bytes and imm in place; both sides wrote inline."""
    polling = "adaptive" if spin else "busy"  # a spinning loop polls the rings itself
    eng = await aiote_make_engine(loop_spin_us=spin, polling=polling)
    peer = await aiote_make_peer(loop_spin_us=spin, polling=polling)
    buf = np.zeros(4096, dtype=np.uint8)
    mr = eng.register(buf)
    rid, pd = await peer.call("register", 4096, 0x2D)
    d = aiote.MrDescriptor.from_bytes(pd)
    src = eng.register(bytearray(b"\x2e" * 64))
    n = 300
    task = asyncio.ensure_future(peer.call("pong_n", mr.descriptor.to_bytes(), rid, n, 20, 21))
    for _ in range(n):
        await eng.write(src, d, 64, imm=20)
        await eng.imms.wait(21, 1, timeout=30)
    assert await task == n
    assert (buf[:64] == 0x2E).all()  # our bytes, sent back
    assert await peer.call("read", rid, 0, 64) == b"\x2e" * 64
    if spin:  # the loops spin while rounds keep coming: inline as long as they do
        assert eng.stats()["direct_inline"] > 0 and (await peer.call("stats"))["direct_inline"] > 0
    else:
        assert eng.stats()["direct_inline"] == n
        assert (await peer.call("stats"))["direct_inline"] == n


async def test_deregistration_while_inline_writes_are_in_flight(engine, peer):
    """The target (this process, busy-polling) closes its region while another process
    streams 64 B inline writes into it: from close() on not one byte lands (the target's own
    copy holds the slot as an initiator's does), and the writer's later writes fail with the
    stale-key error."""
    size = 1 << 20
    buf = bytearray(size)
    mr = engine.register(buf)
    srid, _ = await peer.call("register", 64, 0xAB)
    n = 40000
    stream = peer.call("write_many", srid, mr.descriptor.to_bytes(),
                       [(64, 0, (i % (size // 64)) * 64, 7) for i in range(n)])
    await engine.imms.wait(7, 200, timeout=30)  # the stream is running
    mr.close()  # deregistered: no byte may land from here on
    buf[:] = bytes(size)
    with pytest.raises(aiote.ProviderError) as ei:
        await stream
    assert "EKEYREJECTED" in str(ei.value) or "rejected" in str(ei.value).lower(), ei.value
    assert buf == bytearray(size), "bytes landed in a deregistered region"
    landed = engine.imms.pending(7)
    assert 200 <= landed + 200 < n, landed
    assert (await peer.call("stats"))["direct_inline"] > 0


async def test_malformed_ring_is_dropped_and_the_target_goes_on(engine, peer):
    """Raw bytes in a lane's inline ring, written straight into the target's key table (a
    process of the same user can): an entry of 0 cells, one longer than what was published,
    one past the ring's end, and a head far ahead of done.  The target drops them
    (bad_msgs), acknowledges, copies nothing, and serves inline writes as before."""
    import mmap
    import struct

    rid, d = await peer.call("register", 4096, 0x31)
    desc = aiote.MrDescriptor.from_bytes(d)
    src = engine.register(bytearray(b"\x32" * 64))
    await engine.write(src, desc, 64)  # the table exists and our lane is claimed
    pid = peer.proc.pid
    name = next(f for f in os.listdir("/dev/shm") if f.startswith(f"{pid}:aiote_kt_"))
    hdr, lane, nlanes, slot, nslots = 4096, 8384, 64, 64, 8192  # sizes of direct.c's structs
    ir_off, ir_size = hdr + nlanes * lane + nslots * slot, 128 + 1024 * 64
    base = ir_off + 63 * ir_size  # the last lane: no initiator here owns it
    with open(f"/dev/shm/{name}", "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        try:
            before = (await peer.call("stats"))["bad_msgs"]
            for ncells, publish in ((0, 1), (9, 3), (2000, 2000)):
                head = struct.unpack_from("<Q", m, base)[0]
                at = head % 1024
                struct.pack_into("<IIII", m, base + 128 + at * 64, ncells, 1, 0, 8)
                struct.pack_into("<Q", m, base, head + publish)
                struct.pack_into("<I", m, 48, 1)  # imm_pending: look at the rings
                while struct.unpack_from("<Q", m, base + 64)[0] != head + publish:
                    await asyncio.sleep(0)  # noqa: sleep-ok (polls the target's done word)
            assert (await peer.call("stats"))["bad_msgs"] == before + 3
        finally:
            m.close()
    assert await peer.call("read", rid, 0, 4096) == b"\x32" * 64 + b"\x31" * (4096 - 64)
    await engine.write(src, desc, 64, 0, 100, imm=60)
    assert await peer.call("wait_imm", 60, 1, 10)
    assert await peer.call("read", rid, 100, 64) == b"\x32" * 64
