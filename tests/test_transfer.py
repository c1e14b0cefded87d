"""Writes, imms and messages between two real processes on shm and tcp;ofi_rxm."""

import asyncio
import os
import random

import pytest

import aiote
from aiote.testing import PeerProcess


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


SIZES = [0, 1, 7, 64, 4095, 4096, 65537, 1 << 20, (16 << 20) + 3, 64 << 20]


async def test_bytes_land_exactly(engine, peer):
    """Sizes 0 B .. 64 MiB with unaligned offsets; only the written range changes."""
    region = 64 << 20
    rid, desc = await peer.call("register", region + 64, 0xEE)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = bytearray(pattern(region + 64, 1))
    mr = engine.register(src)
    for i, size in enumerate(SIZES):
        src_off, dst_off = (i * 13) % 61, (i * 29) % 63
        await engine.write(mr, d, size, src_off, dst_off, imm=i)
        assert await peer.call("wait_imm", i, 1, 30)
        if size:
            got = await peer.call("read", rid, dst_off, size)
            assert got == bytes(src[src_off:src_off + size]), f"size {size}"
        before = await peer.call("read", rid, dst_off - 1, 1) if dst_off else b""
        after = await peer.call("read", rid, dst_off + size, 1)
        assert after == b"\xee" and before in (b"", b"\xee")
        await peer.call("fill", rid, dst_off, b"\xee" * size)  # restore the guard pattern


async def test_imm_counts_many_values_concurrent_writers(engine, provider):
    """Thousands of random imm values from two writer processes: counts exact, each consumed once."""
    mr = engine.register(bytearray(4096))
    d = mr.descriptor.to_bytes()
    rng = random.Random(7)
    values = [rng.randrange(0, aiote.IMM_MAX + 1) for _ in range(300)] + [5] * 200
    counts: dict[int, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    keys = list(counts)
    rng.shuffle(keys)
    # arm half the waits before anything is sent, the rest after it all landed
    early = keys[: len(keys) // 2]
    late = keys[len(keys) // 2:]
    early_waits = [engine.imms.wait(k, counts[k], timeout=60) for k in early]
    async with PeerProcess(provider) as w1, PeerProcess(provider) as w2:
        half = len(values) // 2
        shuffled = values[:]
        rng.shuffle(shuffled)
        await asyncio.gather(w1.call("write_imm_many", d, shuffled[:half]),
                             w2.call("write_imm_many", d, shuffled[half:]))
    await asyncio.gather(*early_waits)
    for k in late:
        assert engine.imms.pending(k) == counts[k]
    await asyncio.gather(*(engine.imms.wait(k, counts[k], timeout=10) for k in late))
    # consumed, never double counted
    assert all(engine.imms.pending(k) == 0 for k in keys)
    with pytest.raises(aiote.ImmTimeout):
        await engine.imms.wait(5, 1, timeout=0.05)
    assert engine.stats()["imms_received"] == len(values)


async def test_waiters_on_one_imm_are_served_in_order(engine, peer):
    d = engine.register(bytearray(64)).descriptor.to_bytes()
    first = engine.imms.wait(3, 2)
    second = engine.imms.wait(3, 1)
    await peer.call("write_imm_many", d, [3])
    await asyncio.sleep(0)
    assert not first.done() and not second.done()  # the FIFO head needs 2
    await peer.call("write_imm_many", d, [3, 3])
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert engine.imms.pending(3) == 0


async def test_send_recv_both_ways(engine, peer):
    echo = peer.call("echo_messages", 20)
    msgs = [pattern(random.Random(i).randrange(0, 60000), i) for i in range(20)]
    addr = await peer.call("address")
    await asyncio.gather(*(engine.send(addr, m) for m in msgs))
    replies = [await engine.recv() for _ in msgs]
    await echo
    assert sorted(r for r, _ in replies) == sorted(b"re:" + m for m in msgs)
    assert all(sender == addr for _, sender in replies)


async def test_message_too_large(engine, peer):
    with pytest.raises(aiote.MessageTooLarge):
        engine.send(await peer.call("address"), bytes(64 * 1024 + 1))


async def test_paged_write_between_processes(engine, peer):
    page, npages = 1024, 2000
    rid, desc = await peer.call("register", page * npages, 0)
    src = bytearray(pattern(page * npages, 3))
    mr = engine.register(src)
    perm = list(range(npages))
    random.Random(1).shuffle(perm)
    await engine.write_paged(mr, aiote.MrDescriptor.from_bytes(desc), page, list(range(npages)), perm, imm=11)
    assert await peer.call("wait_imm", 11, npages, 30)
    got = await peer.call("read", rid, 0, page * npages)
    for i, p in enumerate(perm[:200]):
        assert got[p * page:(p + 1) * page] == src[i * page:(i + 1) * page]
    inv = [0] * npages
    for i, p in enumerate(perm):
        inv[p] = i
    assert got == b"".join(bytes(src[inv[j] * page:(inv[j] + 1) * page]) for j in range(npages))


async def test_peer_writes_into_us(engine, peer):
    """The other direction: the peer writes, our ImmCounter sees it."""
    dst = bytearray(1 << 20)
    mr = engine.register(dst)
    rid, _ = await peer.call("register", 1 << 20, 0x5A)
    w = engine.imms.wait(77)
    await peer.call("write", rid, mr.descriptor.to_bytes(), 1 << 20, 0, 0, 77)
    await asyncio.wait_for(w, 10)
    assert dst == b"\x5a" * (1 << 20)


async def test_host_buffer_huge_page_aligned_and_usable(aiote_engine_pair):
    """aiote.host_buffer: 2 MiB-aligned (THP-advised) memory that registers and carries writes."""
    import numpy as np

    a, b = aiote_engine_pair
    n = (8 << 20) + 3
    src_mv, dst_mv = aiote.host_buffer(n), aiote.host_buffer(n, huge_pages=False)
    src_np = np.frombuffer(src_mv, dtype=np.uint8)
    assert src_np.ctypes.data % (2 << 20) == 0 and len(src_mv) == n and not src_mv.readonly
    src_np[:] = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8)
    src, dst = a.register(src_mv), b.register(dst_mv)
    w = b.imms.wait(31, 1, timeout=30)
    await a.write(src, dst.descriptor, imm=31)
    await w
    assert bytes(dst_mv) == bytes(src_mv)
    with pytest.raises(aiote.RegistrationError):
        aiote.host_buffer(0)


async def test_the_idle_spin_yields_its_cpu_except_on_shm(aiote_make_engine, peer):
    """Adaptive polling: between looks at its queues a non-shm worker's idle spin gives its CPU to
    any thread woken onto it (sched_yield, counted in ``spin_yields``) after it handed events to
    its loop (here: the write's completion); shm's spins as before.  The write's bytes and imm
    land either way."""
    eng = await aiote_make_engine(polling="adaptive")
    rid, desc = await peer.call("register", 4096, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = eng.register(bytearray(b"\x5c" * 4096))
    await eng.write(src, d, 4096, imm=41)
    assert await peer.call("wait_imm", 41, 1, 10)
    assert await peer.call("read", rid, 0, 4096) == b"\x5c" * 4096
    if eng.provider == "shm":
        assert eng.stats()["spin_yields"] == 0
        return
    # the worker goes idle after the write's completion and spins (spin_us 50 > 0) before it
    # sleeps: wait for that, one event-loop turn at a time (no timer)
    for _ in range(1_000_000):
        if eng.stats()["spin_yields"]:
            break
        await asyncio.sleep(0)
    assert eng.stats()["spin_yields"] > 0
    busy = await aiote_make_engine(polling="busy")
    await busy.write(busy.register(bytearray(64)), d, 64, imm=42)
    assert await peer.call("wait_imm", 42, 1, 10)
    assert busy.stats()["spin_yields"] == 0  # busy polling keeps its core


async def test_the_spin_window_stays_in_its_bounds(aiote_make_engine, peer):
    """Adaptive polling's spin window after traffic of mixed pacing (one write at a time, then
    batches in flight): on shm between 2 µs and ``spin_us``; elsewhere never below ``spin_us``
    (one-at-a-time writes) and stretched at most to 8 x ``spin_us`` (streams whose gaps are a
    little longer than the spin).  Every write lands and every imm is counted."""
    spin_us = 30
    eng = await aiote_make_engine(polling="adaptive", spin_us=spin_us)
    rid, desc = await peer.call("register", 1 << 20, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = eng.register(bytearray(b"\x3e" * (1 << 20)))
    for _ in range(50):
        await eng.write(src, d, 4096, imm=43)
    for _ in range(10):
        await asyncio.gather(*(eng.write(src, d, 1 << 16, dst_offset=i << 16, imm=43) for i in range(16)))
    assert await peer.call("wait_imm", 43, 50 + 160, 20)
    assert await peer.call("read", rid, 0, 1 << 20) == b"\x3e" * (1 << 20)
    win = eng.stats()["spin_window_ns"]
    if eng.provider == "shm":
        assert 2000 <= win <= spin_us * 1000
    else:
        assert spin_us * 1000 <= win <= 8 * spin_us * 1000


async def test_a_large_write_streaming_in_keeps_the_target_worker_awake(aiote_make_engine, peer):
    """Adaptive polling, not shm: a 16 MiB write arrives over the socket for milliseconds and
    completes nothing until its last byte.  A sleep that the socket's bytes end with nothing
    complete starts a stream spin (``stream_spins``): the target's worker spins until the write
    completes (or no bytes came for 2 ms) instead of sleeping and being woken again every time
    it catches up with the sender.  The bytes land, every imm is counted, and once the writes
    are done the worker sleeps again (its timed naps go on: ``wakeups`` grows).  On shm the direct path
    copies the bytes; nothing streams there."""
    eng = await aiote_make_engine(polling="adaptive")
    n = 16 << 20
    dst = bytearray(n)
    mr = eng.register(dst)
    rid, _ = await peer.call("register", n, 0x6B)
    waited = eng.imms.wait(61, 4, timeout=60)
    for _ in range(4):
        await peer.call("write", rid, mr.descriptor.to_bytes(), n, 0, 0, 61)
    await waited
    assert dst == b"\x6b" * n
    st = eng.stats()
    if eng.provider == "shm":
        assert st["stream_spins"] == 0
        return
    assert st["stream_spins"] > 0
    deadline = asyncio.get_running_loop().time() + 30
    while eng.stats()["wakeups"] < st["wakeups"] + 3:  # it sleeps (10 ms naps), not spins on
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.005)  # noqa: sleep-ok (polls a C counter: no event to await)


async def test_a_stream_spin_lasts_as_long_as_the_bytes_flow(aiote_make_engine, peer):
    """Adaptive polling, not shm: a 64 MiB write over tcp streams in for 10-20 ms.  While the
    target's worker spins on such a stream, signs of bytes (a progress pass long enough to have
    copied some in, or bytes behind its CQ's fd) keep the stream spin going, so one stream spin
    covers the whole write instead of one per 2 ms (6-8 per write before).  A sender that loses
    its CPU for over 2 ms (another process's turn) starves the stream and the worker rightly
    sleeps: up to three sets of writes are tried, and one must show at most 2 stream spins per
    write (unloaded: 1).
    Every byte lands and every imm counts; on shm nothing streams."""
    eng = await aiote_make_engine(polling="adaptive")
    n, writes = 64 << 20, 3
    dst = bytearray(n)
    mr = eng.register(dst)
    desc = mr.descriptor.to_bytes()
    rid, _ = await peer.call("register", n, 0x4E)
    await peer.call("write", rid, desc, 4096, 0, 0, 62)  # connects first
    await eng.imms.wait(62, 1, timeout=30)
    seen = []
    for _ in range(3):
        before = eng.stats()["stream_spins"]
        for _ in range(writes):
            await peer.call("write", rid, desc, n, 0, 0, 63)
            await eng.imms.wait(63, 1, timeout=60)
        assert dst == b"\x4e" * n
        seen.append(eng.stats()["stream_spins"] - before)
        if eng.provider == "shm" or seen[-1] <= 2 * writes:
            break
        dst[:] = bytes(n)
    if eng.provider == "shm":
        assert seen == [0]
    else:
        assert 0 < seen[-1] <= 2 * writes, seen


async def test_the_spin_yields_only_after_the_worker_woke_someone(aiote_make_engine, peer):
    """Adaptive polling, not shm: between looks the worker's idle spin calls sched_yield
    (``spin_yields``) only when what it just did may have put another thread on its CPU: it
    handed events to its event loop, or posted to a peer.  A target that only takes in bytes
    and imms (nothing on its side awaits them) spins without yielding; the initiator, whose
    worker posted the writes, yields.  The bytes land and every imm counts either way; on
    shm the worker never yields."""
    eng = await aiote_make_engine(polling="adaptive")
    n = 1 << 20
    dst = bytearray(n)
    mr = eng.register(dst)
    desc = mr.descriptor.to_bytes()
    rid, _ = await peer.call("register", n, 0x5D)
    await peer.call("write", rid, desc, n, 0, 0, 70)  # connects (the target answers a hello: a post)
    await eng.imms.wait(70, 1, timeout=30)  # an event for our loop: the next idle spin yields
    await peer.call("write", rid, desc, n, 0, 0, 72)  # its imm ends that idle period
    before, pbefore = eng.stats(), await peer.call("stats")
    for _ in range(20):
        await peer.call("write", rid, desc, n, 0, 0, 71)
    after, pafter = eng.stats(), await peer.call("stats")
    await eng.imms.wait(71, 20, timeout=30)
    await eng.imms.wait(72, 1, timeout=30)
    assert dst == b"\x5d" * n
    assert after["spin_yields"] == before["spin_yields"], (before, after)
    if eng.provider == "shm":
        assert after["spin_yields"] == 0 and pafter["spin_yields"] == 0
    else:
        assert pafter["spin_yields"] > pbefore["spin_yields"]


async def test_the_worker_warms_its_pools_with_messages_to_itself(provider, host):
    """tcp;ofi_rxm grows its buffer pools on an endpoint's first send and first segmented
    message (~10 ms each here); the worker sends itself one small and one segmented message
    at start so that no exchange pays that.  They are dropped: recv() gets only what was sent
    to it, a write to our own region afterwards lands; shm sends none."""
    async with aiote.TransferEngine(provider, host=host) as eng:
        want = 2 if provider == "tcp" else 0
        deadline = asyncio.get_running_loop().time() + 30
        while eng.stats()["warm_msgs"] < want:
            assert asyncio.get_running_loop().time() < deadline, eng.stats()
            await asyncio.sleep(0.001)  # noqa: sleep-ok (polls a C counter: no event to await)
        st = eng.stats()
        assert st["warm_msgs"] == want and st["msgs_sent"] == want and st["msgs_received"] == 0
        await eng.send(eng.address, b"mine")
        assert await asyncio.wait_for(eng.recv(), 10) == (b"mine", eng.address)
        mr = eng.register(bytearray(b"x" * 16) + bytearray(16))
        await eng.write(mr, mr.descriptor, 16, 0, 16, imm=5)
        await eng.imms.wait(5, 1, timeout=10)
        assert mr.obj == bytearray(b"x" * 32)


def _threads() -> dict[str, str]:
    """tid -> name of this process's threads."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                out[tid] = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
    return out


async def test_engine_threads_are_named(provider, host):
    """top -H, perf and py-spy tell the engine's threads apart (docs/deploying.md): the
    names are set before the engine is returned."""
    before = _threads()
    async with aiote.TransferEngine(provider, host=host) as eng:
        new = {t: n for t, n in _threads().items() if t not in before}
        assert list(new.values()).count("aiote-worker") == 1, new
        if eng.provider == "shm":
            assert "aiote-watchdog" in new.values(), new
    ours = {t for t, n in new.items() if n.startswith("aiote-")}
    assert not ours & set(_threads())  # joined at close
