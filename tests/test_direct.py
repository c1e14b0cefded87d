"""The direct same-host path on shm (issues #2, #8): the initiator copies with
process_vm_writev into the target's registered memory; imms follow through the
target's key table.  Two real processes each (PeerProcess); no sleeps."""

import asyncio
import errno
import os
import random
import signal
import types

import numpy as np
import pytest

import aiote

pytestmark = pytest.mark.aiote_providers("shm")


def _direct(stats: dict) -> int:
    return stats["direct_writes"]


async def test_bytes_exact_over_direct_path(engine, aiote_make_peer):
    """write (offsets), write with imm, write_imm, paged, scatter to two peers, barrier: bytes
    and imm counts exact, and none of it went through libfabric."""
    a, b = await aiote_make_peer(), await aiote_make_peer()
    rng = np.random.default_rng(1)
    src_bytes = rng.integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
    src = engine.register(bytearray(src_bytes))
    ra, da = await a.call("register", 1 << 16, 0x11)
    rb, db = await b.call("register", 1 << 16, 0x22)
    da, db = aiote.MrDescriptor.from_bytes(da), aiote.MrDescriptor.from_bytes(db)
    expect_a, expect_b = bytearray(b"\x11" * (1 << 16)), bytearray(b"\x22" * (1 << 16))

    await engine.write(src, da, 100, src_offset=3, dst_offset=7)  # no imm: complete at return
    expect_a[7:107] = src_bytes[3:103]
    await engine.write(src, da, 4096, src_offset=5000, dst_offset=200, imm=1)
    expect_a[200:4296] = src_bytes[5000:9096]
    assert await a.call("wait_imm", 1, 1, 10)
    await engine.write_imm(da, 2)
    assert await a.call("wait_imm", 2, 1, 10)

    pages_s, pages_d = list(range(40)), random.Random(2).sample(range(40), 40)
    await engine.write_paged(src, da, 512, pages_s, pages_d, src_stride=700, dst_stride=1024,
                             dst_offset=8192, imm=3)
    for s, d in zip(pages_s, pages_d):
        expect_a[8192 + d * 1024:8192 + d * 1024 + 512] = src_bytes[s * 700:s * 700 + 512]
    assert await a.call("wait_imm", 3, 40, 10)

    await engine.scatter(src, [(da, 0, 60000, 1000), (db, 1000, 0, 3000), (db, 9, 50000, 1)], imm=4)
    expect_a[60000:61000] = src_bytes[0:1000]
    expect_b[0:3000] = src_bytes[1000:4000]
    expect_b[50000:50001] = src_bytes[9:10]
    assert await a.call("wait_imm", 4, 1, 10)
    assert await b.call("wait_imm", 4, 2, 10)

    await engine.barrier([da, db, db], 5)
    assert await a.call("wait_imm", 5, 1, 10)
    assert await b.call("wait_imm", 5, 2, 10)

    assert await a.call("read", ra, 0, 1 << 16) == bytes(expect_a)
    assert await b.call("read", rb, 0, 1 << 16) == bytes(expect_b)
    for p in (a, b):
        for imm in range(1, 6):
            assert await p.call("pending", imm) == 0
    st = engine.stats()
    assert _direct(st) == 1 + 1 + 1 + 40 + 3 + 3, st
    assert st["writes_posted"] == 0 and st["direct_fallbacks"] == 0, st


async def test_engines_of_one_process(aiote_engine_pair):
    """Two engines in one process: the direct path serves them too (CMA to oneself)."""
    a, b = aiote_engine_pair
    dst = bytearray(4096)
    mr = b.register(dst)
    src = a.register(bytearray(range(256)) * 16)
    await a.write(src, mr.descriptor, 4096, imm=9)
    await b.imms.wait(9, 1, timeout=10)
    assert dst == bytearray(range(256)) * 16
    assert _direct(a.stats()) == 1


async def test_imm_counts_exact_under_concurrency(engine, aiote_make_peer):
    """Two initiators (this process and another one) write concurrently into one target with
    interleaved imms; every count is exact, none lost or doubled, and the bytes are there
    when the count is."""
    target, other = await aiote_make_peer(), await aiote_make_peer()
    rid, desc = await target.call("register", 1 << 20, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = engine.register(bytearray(b"\xa5" * (1 << 20)))
    orid, _ = await other.call("register", 1 << 20, 0x5a)
    n_local, n_other = 3000, 2000
    local = [engine.write(src, d, 64 + (i % 7) * 100, 0, (i % 1000) * 1024, imm=10 + i % 3)
             for i in range(n_local)]
    local += [engine.write_paged(src, d, 256, [0, 1, 2, 3], [1000, 1001, 1002, 1003], imm=13)
              for _ in range(50)]
    remote = other.call("write_many", orid, desc, [(128, 0, 1024 * 1024 - 128 - (i % 64) * 256, 20 + i % 2)
                                                   for i in range(n_other)])
    await asyncio.gather(*local, remote)
    for imm, n in ((10, 1000), (11, 1000), (12, 1000), (13, 200), (20, 1000), (21, 1000)):
        assert await target.call("wait_imm", imm, n, 30)
        assert await target.call("pending", imm) == 0, imm
    data = await target.call("read", rid, 0, 1 << 20)
    assert data[0:64] == b"\xa5" * 64
    assert data[(1 << 20) - 128:] == b"\x5a" * 128
    assert _direct(engine.stats()) == n_local + 200
    assert _direct(await other.call("stats")) == n_other


async def test_stale_descriptor_fails_and_writes_nothing(engine, peer):
    """A region its owner closed: a write with the old descriptor fails (typed, stale key:
    EKEYREJECTED), delivers no imm and changes no byte, also once the slot is reused by a
    new registration; the new region's descriptor works."""
    rid, desc = await peer.call("register", 1 << 16, 0x77)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = engine.register(bytearray(b"\x01" * (1 << 16)))
    await engine.write(src, d, 16, imm=3)
    assert await peer.call("wait_imm", 3, 1, 10)
    await peer.call("close_region", rid)
    for attempt in range(2):
        with pytest.raises(aiote.ProviderError) as ei:
            await engine.write(src, d, 1 << 16, imm=4)
        assert ei.value.fi_errno == errno.EKEYREJECTED, ei.value
        with pytest.raises(aiote.ProviderError):
            await engine.write_paged(src, d, 64, [0, 1], [5, 6], imm=4)
        with pytest.raises(aiote.ProviderError):
            await engine.write_imm(d, 4)
        if attempt == 0:  # the target registers again (its slot comes back with a new key)
            rid2, desc2 = await peer.call("register", 1 << 16, 0x33)
    assert await peer.call("pending", 4) == 0
    assert await peer.call("read", rid, 16, (1 << 16) - 16) == b"\x77" * ((1 << 16) - 16)
    await engine.write(src, aiote.MrDescriptor.from_bytes(desc2), 1 << 16, imm=5)
    assert await peer.call("wait_imm", 5, 1, 10)
    assert await peer.call("read", rid2, 0, 1 << 16) == b"\x01" * (1 << 16)
    # a descriptor first seen after its region closed is stale from the start
    rid3, desc3 = await peer.call("register", 4096, 0x44)
    await peer.call("close_region", rid3)
    with pytest.raises(aiote.ProviderError) as ei:
        await engine.write(src, aiote.MrDescriptor.from_bytes(desc3), 4096)
    assert ei.value.fi_errno == errno.EKEYREJECTED
    assert await peer.call("read", rid3, 0, 4096) == b"\x44" * 4096


async def test_deregistration_while_direct_writes_are_in_flight(engine, peer):
    """The target (this process) closes its region while another process streams direct
    writes into it: close returns (waiting for a copy in flight, if any), and from then on
    not one byte lands; the writer's later writes fail with the stale-key error."""
    size = 1 << 20
    buf = bytearray(size)
    mr = engine.register(buf)
    srid, _ = await peer.call("register", 4096, 0xAB)
    n = 40000
    stream = peer.call("write_many", srid, mr.descriptor.to_bytes(),
                       [(4096, 0, (i % (size // 4096)) * 4096, 7) for i in range(n)])
    await engine.imms.wait(7, 200, timeout=30)  # the stream is running
    mr.close()  # deregistered: no byte may land from here on
    buf[:] = bytes(size)
    with pytest.raises(aiote.ProviderError) as ei:
        await stream
    assert "EKEYREJECTED" in str(ei.value) or "rejected" in str(ei.value).lower(), ei.value
    assert buf == bytearray(size), "bytes landed in a deregistered region"
    landed = engine.imms.pending(7)
    assert 200 <= landed + 200 < n, landed  # some writes landed before close, not all


async def test_dead_target_fails_typed(engine, aiote_make_peer, aiote_faults):
    """A killed target: writes fail with PeerUnreachable, right after the kill and later."""
    peer = await aiote_make_peer()
    rid, desc = await peer.call("register", 1 << 16, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = engine.register(bytearray(1 << 16))
    await engine.write(src, d, 4096, imm=1)
    assert _direct(engine.stats()) == 1
    aiote_faults.kill(peer)
    for _ in range(3):
        with pytest.raises(aiote.PeerUnreachable):
            await asyncio.wait_for(engine.write(src, d, 4096, imm=1), 30)


async def test_killed_target_not_yet_reaped_fails_typed(engine, aiote_make_peer, aiote_faults):
    """A target killed but not reaped (a zombie, its pid still taken): its worker's liveness
    word no longer proves it alive, so writes fail with PeerUnreachable and land nowhere."""
    peer = await aiote_make_peer()
    rid, desc = await peer.call("register", 1 << 16, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = engine.register(bytearray(b"\x5a" * (1 << 16)))
    for _ in range(3):  # the target's worker holds its liveness word by now: the fast check
        await engine.write(src, d, 4096, imm=1)
    assert _direct(engine.stats()) == 3
    pid = peer.proc.pid
    os.kill(pid, signal.SIGKILL)  # no join: nobody reaps it while we write
    while _proc_state(pid) != "Z":  # an event (the kernel's exit), polled; no sleep
        await asyncio.sleep(0)
    for _ in range(3):
        with pytest.raises(aiote.PeerUnreachable):
            await asyncio.wait_for(engine.write(src, d, 4096, imm=1), 30)
    assert _direct(engine.stats()) == 3
    aiote_faults.kill(peer)  # reaps it and removes its shm files


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("side", ["initiator", "target", "env"])
async def test_falls_back_to_libfabric_when_off(aiote_make_engine, aiote_make_peer, side, monkeypatch):
    """direct_shm=False on either side (or AIOTE_DIRECT_SHM=0): the same writes go through
    libfabric, bytes and counts as exact."""
    if side == "env":
        monkeypatch.setenv("AIOTE_DIRECT_SHM", "0")
    eng = await aiote_make_engine(**({"direct_shm": False} if side == "initiator" else {}))
    peer = await aiote_make_peer(**({"direct_shm": False} if side == "target" else {}))
    rid, desc = await peer.call("register", 1 << 16, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = eng.register(bytearray(range(256)) * 256)
    await eng.write(src, d, 1000, 5, 9, imm=1)
    await eng.write_paged(src, d, 256, [1, 2], [100, 101], imm=1)
    assert await peer.call("wait_imm", 1, 3, 10)
    data = await peer.call("read", rid, 0, 1 << 16)
    assert data[9:1009] == bytes(src.obj[5:1005])
    assert data[25600:26112] == bytes(src.obj[256:768])
    st = eng.stats()
    assert _direct(st) == 0 and st["writes_posted"] == 3, st


async def test_large_writes_without_copy_threads_use_libfabric(aiote_make_engine, peer):
    """direct_workers=0: ops larger than direct_max go through libfabric."""
    eng = await aiote_make_engine(direct_max=4096, direct_workers=0)
    rid, desc = await peer.call("register", 1 << 16, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = eng.register(bytearray(b"\x09" * (1 << 16)))
    await eng.write(src, d, 4096, imm=1)
    await eng.write(src, d, 1 << 16, imm=1)
    assert await peer.call("wait_imm", 1, 2, 10)
    assert await peer.call("read", rid, 0, 1 << 16) == b"\x09" * (1 << 16)
    st = eng.stats()
    assert _direct(st) == 1 and st["writes_posted"] == 1 and st["direct_worker_ops"] == 0, st


async def test_large_ops_are_copied_by_a_copy_thread(aiote_make_engine, aiote_make_peer):
    """Ops above direct_max are queued for the engine's copy thread (the call returns at
    once, the future resolves by event): write, write_paged, scatter to two peers, many in
    flight at once; bytes and imm counts exact, nothing through libfabric."""
    eng = await aiote_make_engine(direct_max=4096)
    a, b = await aiote_make_peer(), await aiote_make_peer()
    size = 1 << 20
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    src = eng.register(bytearray(data))
    ra, da = await a.call("register", size, 0)
    rb, db = await b.call("register", size, 0)
    da, db = aiote.MrDescriptor.from_bytes(da), aiote.MrDescriptor.from_bytes(db)
    expect_a, expect_b = bytearray(size), bytearray(size)
    ops = [eng.write(src, da, 300000, src_offset=11, dst_offset=5, imm=1)]
    expect_a[5:300005] = data[11:300011]
    sp = rng.permutation(1024)[:700]
    dp = rng.permutation(np.arange(300, 1024))[:700]
    ops.append(eng.write_paged(src, da, 1000, sp, dp, src_stride=1024, dst_stride=1024, imm=2))
    for s_, d_ in zip(sp.tolist(), dp.tolist(), strict=True):
        expect_a[d_ * 1024:d_ * 1024 + 1000] = data[s_ * 1024:s_ * 1024 + 1000]
    ops.append(eng.scatter(src, [(db, 0, 0, 5000), (da, 0, 1040000, 8000), (db, 7, 9000, 3000)], imm=3))
    expect_b[0:5000] = data[0:5000]
    expect_a[1040000:1048000] = data[0:8000]
    expect_b[9000:12000] = data[7:3007]
    for f in ops:
        assert not f.done()  # queued for the copy thread, not copied in the call
    await asyncio.gather(*ops)
    src.close()  # the copy thread gave the region back before the ops' events
    for p, imm, n in ((a, 1, 1), (a, 2, 700), (a, 3, 1), (b, 3, 2)):
        assert await p.call("wait_imm", imm, n, 10)
        assert await p.call("pending", imm) == 0
    assert await a.call("read", ra, 0, size) == bytes(expect_a)
    assert await b.call("read", rb, 0, size) == bytes(expect_b)
    st = eng.stats()
    assert st["direct_worker_ops"] == 3 and st["writes_posted"] == 0, st
    assert _direct(st) == 1 + 700 + 3 and st["ops_completed"] == st["ops_submitted"], st


async def test_copy_thread_ops_count_against_max_queued(aiote_make_engine, peer):
    """Copy-thread ops hold their elements in the engine's queue bound until their event:
    beyond max_queued they wait in Python (deferred) and go in as earlier ones finish;
    every page lands, counts exact.  (The copy thread is held at the test gate after the
    first op's first chunk, so the bound is reached deterministically.)"""
    eng = await aiote_make_engine(direct_max=4096, max_queued=3500)
    n, size = 1500, 2 << 20
    rid, desc = await peer.call("register", size, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    data = bytes(range(256)) * (size // 256)
    src = eng.register(bytearray(data))
    sp, dp = list(range(n)), list(reversed(range(n)))  # 1,500 target iovecs: two chunks
    _gate(eng, True)
    futs = [eng.write_paged(src, d, 1024, sp, dp, imm=6)]
    await _wait_gate(eng)  # the first op: 1,024 pages copied, held
    futs += [eng.write_paged(src, d, 1024, sp, dp, imm=6) for _ in range(5)]
    assert len(eng._deferred) == 4  # 1,500 + 1,500 in the engine; 4 more wait in Python
    _gate(eng, False)
    await asyncio.gather(*futs)
    assert await peer.call("wait_imm", 6, 6 * n, 10)
    assert await peer.call("pending", 6) == 0
    expect = bytearray(size)
    for s_, d_ in zip(sp, dp, strict=True):
        expect[d_ * 1024:(d_ + 1) * 1024] = data[s_ * 1024:(s_ + 1) * 1024]
    assert await peer.call("read", rid, 0, size) == bytes(expect)
    st = eng.stats()
    assert st["direct_worker_ops"] == 6 and st["writes_posted"] == 0, st


@pytest.mark.parametrize("where", ["call", "thread"])
async def test_merged_iovecs_edge_cases(aiote_make_engine, aiote_make_peer, where):
    """Ranges contiguous on one side or both are merged into one iovec per side (each side on
    its own): contiguous pages, contiguous only at the source or only at the target, runs
    across the 1024-iovec limit, zero-length (imm-only) elements inside a run, elements of
    another region or peer breaking a run, a range written twice.  Bytes and counts exact,
    on the calling thread and on a copy thread.  (Copy assistants off: they would cut the
    large runs into chunks of a syscall each.)"""
    eng = await aiote_make_engine(direct_max=(64 << 20) if where == "call" else 1, direct_assist=0)
    a, b = await aiote_make_peer(), await aiote_make_peer()
    size = 4 << 20
    rng = np.random.default_rng(4)
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    src = eng.register(bytearray(data))
    ra, da = await a.call("register", size, 0)
    ra2, da2 = await a.call("register", 1 << 16, 0)
    rb, db = await b.call("register", size, 0)
    da, da2, db = (aiote.MrDescriptor.from_bytes(x) for x in (da, da2, db))
    ea, ea2, eb = bytearray(size), bytearray(1 << 16), bytearray(size)

    def syscalls() -> int:
        return eng.stats()["direct_syscalls"]

    # contiguous on both sides: 3000 pages (one iovec a side, across the 1024 limit): 1 syscall
    n0 = syscalls()
    await eng.write_paged(src, da, 256, list(range(3000)), list(range(3000)), imm=1)
    ea[0:768000] = data[0:768000]
    assert syscalls() - n0 == 1
    # contiguous at the source only (target pages in steps of 2), 2500 pages: 1024+1024+452
    n0 = syscalls()
    await eng.write_paged(src, da, 128, list(range(2500)), list(range(0, 5000, 2)), dst_offset=1 << 20, imm=2)
    for i in range(2500):
        ea[(1 << 20) + 2 * i * 128:(1 << 20) + 2 * i * 128 + 128] = data[i * 128:i * 128 + 128]
    assert syscalls() - n0 == 3
    # contiguous at the target only, 2049 pages (= 2 * 1024 + 1: the last chunk holds one)
    n0 = syscalls()
    srcp = list(range(0, 2 * 2049, 2))
    await eng.write_paged(src, db, 64, srcp, list(range(2049)), imm=3)
    for i, s_ in enumerate(srcp):
        eb[i * 64:i * 64 + 64] = data[s_ * 64:s_ * 64 + 64]
    assert syscalls() - n0 == 3
    # a scatter: a run broken by imm-only elements, by another region and by another peer,
    # and one range written twice with the same bytes
    base = 3 << 20
    wrs = []
    for i in range(1100):
        wrs.append((da, base + i * 100, base + i * 100, 100))
        if i % 300 == 0:
            wrs.append((da, 0, 0, 0))  # imm only
        if i % 401 == 0:
            wrs.append((da2, i, i, 50))
            ea2[i:i + 50] = data[i:i + 50]
        if i % 500 == 0:
            wrs.append((db, base + i * 100, base + i * 100, 100))
            eb[base + i * 100:base + i * 100 + 100] = data[base + i * 100:base + i * 100 + 100]
    wrs.append((da, base, base, 100))
    ea[base:base + 110000] = data[base:base + 110000]
    n_a = sum(1 for w in wrs if w[0] is da) + sum(1 for w in wrs if w[0] is da2)
    n_b = sum(1 for w in wrs if w[0] is db)
    await eng.scatter(src, wrs, imm=4)
    for p, imm, n in ((a, 1, 3000), (a, 2, 2500), (b, 3, 2049), (a, 4, n_a), (b, 4, n_b)):
        assert await p.call("wait_imm", imm, n, 10)
        assert await p.call("pending", imm) == 0
    assert await a.call("read", ra, 0, size) == bytes(ea)
    assert await a.call("read", ra2, 0, 1 << 16) == bytes(ea2)
    assert await b.call("read", rb, 0, size) == bytes(eb)
    st = eng.stats()
    assert st["writes_posted"] == 0 and _direct(st) == 3000 + 2500 + 2049 + len(wrs), st
    assert st["direct_worker_ops"] == (4 if where == "thread" else 0), st


def _gate(eng, on: bool) -> None:
    from aiote._core import lib

    assert lib.aiote_direct_pause(eng._h, 1 if on else 0) == 0


async def _wait_gate(eng) -> None:
    from aiote._core import lib

    assert await asyncio.to_thread(lib.aiote_direct_wait_paused, eng._h, 30000) == 1


async def _gated_paged(eng, peer, n=3000, page=1024):
    """A write_paged of n random pages with imm 7 (no merging: 1024 per chunk) queued for the
    copy thread, which is held after its first chunk (synchronised on the gate, no sleep)."""
    rid, desc = await peer.call("register", n * page, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, n * page, dtype=np.uint8).tobytes()
    src = eng.register(bytearray(data))
    sp, dp = rng.permutation(n), rng.permutation(n)
    _gate(eng, True)
    fut = eng.write_paged(src, d, page, sp, dp, imm=7)
    await _wait_gate(eng)
    return types.SimpleNamespace(fut=fut, rid=rid, d=d, src=src, data=data, sp=sp.tolist(), dp=dp.tolist(), n=n)


def _landed(g, upto, page=1024):
    """The target's bytes once the first `upto` pages of _gated_paged's batch landed."""
    out = bytearray(g.n * page)
    for s_, d_ in zip(g.sp[:upto], g.dp[:upto], strict=True):
        out[d_ * page:(d_ + 1) * page] = g.data[s_ * page:(s_ + 1) * page]
    return bytes(out)


async def test_deregistration_during_a_copy_thread_copy(aiote_make_engine, peer):
    """The target closes its region while a copy thread is between two chunks of a batch:
    the rest of the batch fails with the stale-key error naming the first element not
    copied; the first chunk's pages landed and delivered exactly their imms; no later byte
    lands in the closed region."""
    eng = await aiote_make_engine(direct_max=4096)
    g = await _gated_paged(eng, peer)
    await peer.call("close_region", g.rid)
    _gate(eng, False)
    with pytest.raises(aiote.ProviderError) as ei:
        await g.fut
    assert ei.value.fi_errno == errno.EKEYREJECTED and ei.value.index == 1024, ei.value
    assert await peer.call("wait_imm", 7, 1024, 10)
    assert await peer.call("pending", 7) == 0
    assert await peer.call("read", g.rid, 0, g.n * 1024) == _landed(g, 1024)
    st = eng.stats()
    assert st["direct_worker_ops"] == 1 and _direct(st) == 1024 and st["writes_posted"] == 0, st


async def test_dead_target_during_a_copy_thread_copy(aiote_make_engine, aiote_make_peer, aiote_faults):
    """The target is killed while a copy thread is between two chunks: the op fails with
    PeerUnreachable naming the first element not copied; later large ops fail the same way."""
    eng = await aiote_make_engine(direct_max=4096)
    peer = await aiote_make_peer()
    g = await _gated_paged(eng, peer)
    aiote_faults.kill(peer)
    _gate(eng, False)
    with pytest.raises(aiote.PeerUnreachable) as ei:
        await asyncio.wait_for(g.fut, 30)
    assert ei.value.index == 1024, ei.value
    for _ in range(2):
        with pytest.raises(aiote.PeerUnreachable):
            await asyncio.wait_for(eng.write_paged(g.src, g.d, 1024, g.sp, g.dp, imm=7), 30)
    assert _direct(eng.stats()) == 1024


async def test_cancel_and_close_during_a_copy_thread_copy(aiote_make_engine, peer):
    """Cancelling an op a copy thread is copying withdraws what is not copied yet (the pages
    copied deliver their imms, nothing else lands); an op queued behind it still runs.
    Closing the engine while the thread copies fails the op and the queued ones with
    EngineClosed, exactly the copied chunk's imms delivered."""
    eng = await aiote_make_engine(direct_max=4096)
    g = await _gated_paged(eng, peer)
    rid2, desc2 = await peer.call("register", 1 << 20, 0)
    after = eng.write(g.src, aiote.MrDescriptor.from_bytes(desc2), 1 << 20, imm=8)  # queued behind
    g.fut.cancel()
    _gate(eng, False)
    await after
    assert await peer.call("wait_imm", 8, 1, 10)
    assert await peer.call("read", rid2, 0, 1 << 20) == g.data[:1 << 20]
    assert await peer.call("wait_imm", 7, 1024, 10)
    assert await peer.call("pending", 7) == 0
    assert await peer.call("read", g.rid, 0, g.n * 1024) == _landed(g, 1024)
    st = eng.stats()
    assert _direct(st) == 1024 + 1 and st["writes_posted"] == 0, st

    # close while the thread holds an op after its first chunk, another op queued behind it
    g2 = await _gated_paged(eng, peer)
    queued = eng.write(g2.src, g2.d, 1 << 20, imm=9)
    close = asyncio.ensure_future(eng.close())
    with pytest.raises(aiote.EngineClosed):
        await g2.fut
    with pytest.raises(aiote.EngineClosed):
        await queued
    await close
    assert await peer.call("wait_imm", 7, 1024, 10)
    assert await peer.call("pending", 7) == 0
    assert await peer.call("pending", 9) == 0
    assert await peer.call("read", g2.rid, 0, g2.n * 1024) == _landed(g2, 1024)


async def test_out_of_bounds_checked_before_copy(engine, peer):
    """Bounds are checked against the descriptor before any byte is copied."""
    rid, desc = await peer.call("register", 4096, 0x66)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = engine.register(bytearray(8192))
    with pytest.raises(aiote.OutOfBounds):
        engine.write(src, d, 4097)
    with pytest.raises(aiote.OutOfBounds):
        engine.scatter(src, [(d, 0, 0, 16), (d, 0, 4090, 16)], imm=1)
    # a forged descriptor: a longer region than the target registered
    forged = aiote.MrDescriptor(d.provider, d.addrs, d.base, 1 << 20, d.keys)
    with pytest.raises(aiote.ProviderError):
        await engine.write(src, forged, 8192)
    assert await peer.call("read", rid, 0, 4096) == b"\x66" * 4096
    assert await peer.call("pending", 1) == 0


async def test_write_to_a_stopped_target_lands(engine, peer):
    """The direct path needs nothing of the target's process: a write to a stopped (SIGSTOP)
    target completes with its bytes in place; the imm is counted once it runs again."""
    rid, desc = await peer.call("register", 4096, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = engine.register(bytearray(b"\x3c" * 4096))
    await engine.write(src, d, 8, imm=1)
    assert await peer.call("wait_imm", 1, 1, 10)
    peer.pause()
    try:
        await asyncio.wait_for(engine.write(src, d, 4096, imm=2), 10)
    finally:
        peer.resume()
    assert await peer.call("wait_imm", 2, 1, 10)
    assert await peer.call("read", rid, 0, 4096) == b"\x3c" * 4096


# ---- the key table's escape hatches, driven by a stand-in initiator ----------------------
# A process maps the target's key table (native/src/direct.c) and holds a region's slot as
# an initiator does around its copy; then it dies (its hold is reaped) or stays (honoured).

_HOLDER = r"""
import mmap, os, struct, sys
path, key = sys.argv[1], int(sys.argv[2])
HDR, LANE, NLANES, SLOT = 4096, 8384, 64, 64  # sizes of direct.c's structs
with open(path, "r+b") as f:
    m = mmap.mmap(f.fileno(), 0)
high = struct.unpack_from("<I", m, 40)[0]
slot = next(i for i in range(high) if struct.unpack_from("<QQ", m, HDR + NLANES * LANE + i * SLOT)[1] == key
            and struct.unpack_from("<Q", m, HDR + NLANES * LANE + i * SLOT)[0] & 1)
with open(f"/proc/{os.getpid()}/stat") as f:
    start = int(f.read().rsplit(")", 1)[1].split()[19])
lane = next(i for i in range(NLANES) if struct.unpack_from("<Q", m, HDR + i * LANE)[0] == 0)
struct.pack_into("<Q", m, HDR + lane * LANE, (os.getpid() << 42) | (start & ((1 << 42) - 1)))
struct.pack_into("<I", m, HDR + lane * LANE + 8, slot + 1)
print("held", flush=True)
if sys.argv[3] == "die":
    os.kill(os.getpid(), 9)
sys.stdin.read()
"""


def _fnv64(b: bytes) -> int:
    h = 1469598103934665603
    for x in b:
        h = ((h ^ x) * 1099511628211) & (1 << 64) - 1
    return h


async def _holder(engine, mr, mode):
    import os
    import sys

    path = f"/dev/shm/{os.getpid()}:aiote_kt_{_fnv64(engine._nic_addrs[0]):016x}"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _HOLDER, path, str(mr.descriptor.keys[0]),
                                                mode, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE)
    assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"held"
    return proc


async def test_deregistration_reaps_a_dead_initiators_hold(aiote_make_engine):
    """An initiator killed inside its copy leaves its hold: the target sees its process gone
    and deregisters (well before peer_timeout)."""
    eng = await aiote_make_engine(peer_timeout=30)
    mr = eng.register(bytearray(4096))
    proc = await _holder(eng, mr, "die")
    await proc.wait()
    t0 = asyncio.get_running_loop().time()
    mr.close()
    assert asyncio.get_running_loop().time() - t0 < 5
    assert mr.closed


async def test_deregistration_honours_a_live_initiators_hold(aiote_make_engine):
    """A live initiator (stopped, say) holding the region: close waits peer_timeout, then fails
    with RegionInUse and the region takes no new direct writes; once the holder is gone the
    close goes through."""
    eng = await aiote_make_engine(peer_timeout=0.5)
    mr = eng.register(bytearray(4096))
    proc = await _holder(eng, mr, "stay")
    try:
        with pytest.raises(aiote.RegionInUse):
            mr.close()
        assert not mr.closed
    finally:
        proc.kill()
        await proc.wait()
    mr.close()
    assert mr.closed
