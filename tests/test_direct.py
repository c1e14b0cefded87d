"""The direct same-host path on shm (issues #2, #8): the initiator copies with
process_vm_writev into the target's registered memory; imms follow through the
target's key table.  Two real processes each (PeerProcess); no sleeps."""

import asyncio
import errno
import random

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


async def test_large_writes_use_libfabric(aiote_make_engine, peer):
    """Ops larger than direct_max go through libfabric (the event loop is not held for them)."""
    eng = await aiote_make_engine(direct_max=4096)
    rid, desc = await peer.call("register", 1 << 16, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = eng.register(bytearray(b"\x09" * (1 << 16)))
    await eng.write(src, d, 4096, imm=1)
    await eng.write(src, d, 1 << 16, imm=1)
    assert await peer.call("wait_imm", 1, 2, 10)
    assert await peer.call("read", rid, 0, 1 << 16) == b"\x09" * (1 << 16)
    st = eng.stats()
    assert _direct(st) == 1 and st["writes_posted"] == 1, st


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
