"""Imm entries of the direct shm path while the target's worker sleeps with nobody
waiting (issue #2): initiators then skip the wake-up per write, and whoever reads the
counts (imms.pending, imms.wait) gets them exact all the same.  Real processes, no sleeps."""

import asyncio
import random

import pytest

pytestmark = pytest.mark.aiote_providers("shm")

KIB = 1 << 10


async def test_unwaited_imms_are_counted_exactly(engine, aiote_make_peer):
    """3,000 writes with an imm land while nothing waits on it (three rings' worth: the
    initiator wakes the target when its ring is half full, queues when it is full):
    pending() counts every one at once, a wait for all of them is satisfied at once and
    consumes them, the bytes are there."""
    peer = await aiote_make_peer()
    size = 64 * KIB
    buf = bytearray(size)
    mr = engine.register(buf)
    rid, _ = await peer.call("register", size, 0x5A)
    n = 3000
    await peer.call("write_many", rid, mr.descriptor.to_bytes(),
                    [(KIB, 0, (i % 64) * KIB, 9) for i in range(n)])
    assert engine.imms.pending(9) == n
    w = engine.imms.wait(9, n, timeout=30)
    await w
    assert engine.imms.pending(9) == 0
    assert buf == bytearray(b"\x5a") * size


async def test_wait_armed_after_unwaited_writes_wakes_the_worker(engine, aiote_make_peer):
    """Writes land unwaited; then a wait for more than arrived is armed: it consumes
    nothing yet, and the later writes (which must now wake the target) complete it."""
    peer = await aiote_make_peer()
    mr = engine.register(bytearray(64 * KIB))
    rid, _ = await peer.call("register", 4 * KIB, 0x33)
    desc = mr.descriptor.to_bytes()
    await peer.call("write_many", rid, desc, [(4 * KIB, 0, i * 4 * KIB, 11) for i in range(10)])
    w = engine.imms.wait(11, 15, timeout=30)
    assert not w.done()
    await peer.call("write_many", rid, desc, [(4 * KIB, 0, i * 4 * KIB, 11) for i in range(5)])
    await w
    assert engine.imms.pending(11) == 0


async def test_waits_and_unwaited_streams_from_three_writers(engine, aiote_make_peer):
    """Three writers stream 1,500 writes each with random imms 0..5 while this side arms
    waits at random moments (some before their imms land, some after): every wait
    resolves, and what is left pending is exactly what no wait consumed."""
    peers = [await aiote_make_peer() for _ in range(3)]
    mr = engine.register(bytearray(256 * KIB))
    desc = mr.descriptor.to_bytes()
    rng = random.Random(7)
    plans, totals = [], [0] * 6
    for k, p in enumerate(peers):
        rid, _ = await p.call("register", KIB, 0x40 + k)
        items = []
        for i in range(1500):
            imm = rng.randrange(6)
            totals[imm] += 1
            items.append((KIB if i % 3 else 64, 0, ((k * 1500 + i) % 256) * KIB, imm))
        plans.append((p, rid, items))
    streams = [asyncio.ensure_future(p.call("write_many", rid, desc, items)) for p, rid, items in plans]
    waits, asked = [], [0] * 6

    def arm(part_of: int) -> None:
        for imm in range(6):
            part = totals[imm] // part_of
            waits.append(engine.imms.wait(imm, part, timeout=60))
            asked[imm] += part

    arm(4)  # before anything landed
    await streams[0]
    arm(4)  # after one writer's imms landed, while the others may still stream
    await asyncio.gather(*streams)
    await asyncio.gather(*waits)
    for imm in range(6):
        assert engine.imms.pending(imm) == totals[imm] - asked[imm]
