"""Carried writes (native/src/carry.c): over tcp, two or more consecutive small writes of one
op to one peer travel as the entries of one message that the target's worker checks, copies,
counts and acknowledges.  The target is a PeerProcess; bytes, imms and counters are exact."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import random
import time

import numpy as np
import pytest

import aiote

pytestmark = pytest.mark.aiote_providers("tcp")

SMALL, BIG = 8192, 16384  # carry_max's default; a write past it goes as an RMA write


async def sent(eng: aiote.TransferEngine, msgs: int, timeout: float = 10) -> None:
    """Until the engine has sent ``msgs`` carried messages (posted to the provider)."""
    deadline = time.monotonic() + timeout
    while eng.stats()["carried_msgs"] < msgs:
        assert time.monotonic() < deadline, eng.stats()
        await asyncio.sleep(0.001)  # noqa: sleep-ok (polls a counter until it moves, bounded)


async def carrying(eng: aiote.TransferEngine, peer, timeout: float = 10) -> None:
    """Until ``eng`` carries writes to ``peer`` (2-write batches until one went carried: the first
    carriable batch to a peer goes as RMA writes and a hello, the peer's answer turns carrying
    on).  Leaves ``carried_msgs`` one higher."""
    rid, d = await region(peer, 64)
    src = eng.register(bytearray(64))
    deadline = time.monotonic() + timeout
    while True:
        before = eng.stats()["writes_carried"]
        await eng.scatter(src, [(d, 0, 0, 8), (d, 8, 8, 8)])
        if eng.stats()["writes_carried"] > before:
            break
        assert time.monotonic() < deadline, eng.stats()
        await asyncio.sleep(0.001)  # noqa: sleep-ok (polls a counter until it moves, bounded)
    src.close()


async def region(peer, size: int, fill: int = 0) -> tuple[int, aiote.MrDescriptor]:
    rid, desc = await peer.call("register", size, fill)
    return rid, aiote.MrDescriptor.from_bytes(desc)


async def test_first_batch_to_a_peer_asks_it_first(engine, peer):
    """The first carriable batch to a peer goes as RMA writes plus a hello (an older aiote would
    drop a carried message); once the peer answered, batches to it are carried.  It marks us
    too.  Connected first (a lone write, never carried): while the connection is being set up
    the batch's RMA writes wait, and the hello, a message, can go first and be answered."""
    rid, d = await region(peer, 4096)
    src = engine.register(bytearray(b"\x03" * 4096))
    await engine.write(src, d, 8, 0, 4088)
    assert engine.stats()["carry_peers"] == 0 and engine.stats()["writes_carried"] == 0
    await engine.scatter(src, [(d, 0, i * 64, 64) for i in range(8)], imm=9)
    assert engine.stats()["writes_carried"] == 0
    await carrying(engine, peer)
    assert engine.stats()["carry_peers"] == 1 and (await peer.call("stats"))["carry_peers"] == 1
    before = engine.stats()["writes_carried"]
    await engine.scatter(src, [(d, 0, 512 + i * 64, 64) for i in range(8)], imm=9)
    assert engine.stats()["writes_carried"] - before == 8
    assert await peer.call("wait_imm", 9, 16, 10)
    assert (await peer.call("read", rid, 0, 1024)) == b"\x03" * 1024


async def test_mixed_batch_lands_exactly_and_counts(engine, peer):
    """Runs of small writes (carried) around large ones (RMA) and a lone small one (RMA),
    unaligned offsets, three regions: every byte and imm exact, the carried count exact."""
    rng = random.Random(7)
    regions = [await region(peer, 1 << 18, 0x5A) for _ in range(3)]
    src_buf = bytearray(rng.randbytes(1 << 18))
    src = engine.register(src_buf)
    sizes = [rng.randrange(0, 4001) for _ in range(10)] + [BIG] + [17] + [BIG + 3] + \
        [rng.randrange(1, 300) for _ in range(20)]
    batch, want = [], {rid: bytearray([0x5A]) * (1 << 18) for rid, _ in regions}
    dst_next = {rid: 3 for rid, _ in regions}
    for i, n in enumerate(sizes):
        rid, d = regions[i % 3] if i >= 13 else regions[0]
        so, do = rng.randrange(0, (1 << 18) - n), dst_next[rid]
        dst_next[rid] += n + 1
        batch.append((d, so, do, n))
        want[rid][do:do + n] = src_buf[so:so + n]
    await carrying(engine, peer)
    before, tbefore = engine.stats(), await peer.call("stats")
    await engine.scatter(src, batch, imm=11)
    assert await peer.call("wait_imm", 11, len(batch), 10)
    assert await peer.call("pending", 11) == 0
    for rid, _ in regions:
        assert await peer.call("read", rid, 0, 1 << 18) == bytes(want[rid]), rid
    after, tafter = engine.stats(), await peer.call("stats")
    assert after["writes_carried"] - before["writes_carried"] == 30  # 10 + 20; the lone 17 B went alone
    assert after["carried_msgs"] - before["carried_msgs"] == 2
    assert after["writes_posted"] - before["writes_posted"] == len(batch)
    assert tafter["carried_applied"] - tbefore["carried_applied"] == 30
    assert tafter["imms_received"] - tbefore["imms_received"] == len(batch)


async def test_paged_writes_fill_several_messages(engine, peer):
    """900 pages of 256 B: carried, four messages (a message holds msg_size bytes and then some:
    252 entries of 276 B here), every page and imm exact."""
    npages, page = 900, 256
    rid, d = await region(peer, npages * page)
    src_buf = bytearray(random.Random(1).randbytes(npages * page))
    src = engine.register(src_buf)
    perm = list(range(npages))
    random.Random(2).shuffle(perm)
    await carrying(engine, peer)
    before = engine.stats()
    await engine.write_paged(src, d, page, list(range(npages)), perm, imm=12)
    assert await peer.call("wait_imm", 12, npages, 10)
    got = await peer.call("read", rid, 0, npages * page)
    for s, t in enumerate(perm):
        assert got[t * page:(t + 1) * page] == src_buf[s * page:(s + 1) * page], s
    after = engine.stats()
    assert after["writes_carried"] - before["writes_carried"] == npages
    assert after["carried_msgs"] - before["carried_msgs"] == 4


async def test_carry_off(aiote_make_engine, peer):
    eng = await aiote_make_engine(carry_max=0)
    rid, d = await region(peer, 4096)
    src = eng.register(bytearray(b"\x07" * 4096))
    await eng.scatter(src, [(d, i * 64, i * 64, 64) for i in range(32)], imm=13)
    assert await peer.call("wait_imm", 13, 32, 10)
    assert await peer.call("read", rid, 0, 2048) == b"\x07" * 2048
    assert eng.stats()["writes_carried"] == 0


@pytest.mark.parametrize("bad", [-1, 64 * 1024 + 1, 1.5, "8k"])
async def test_bad_carry_max(aiote_provider, aiote_host, bad):
    with pytest.raises(aiote.InvalidArgument, match="carry_max"):
        aiote.TransferEngine(aiote_provider, host=aiote_host, carry_max=bad)


async def test_a_small_msg_size_takes_the_default_down(aiote_provider, aiote_host, monkeypatch):
    """msg_size below 8 KiB with carry_max left alone opens (the default follows it down; it
    used to fail with InvalidArgument), and so does AIOTE_CARRY_MAX above it; an explicit
    carry_max above msg_size is still refused.  Over tcp the engine's messages still work."""
    async with aiote.TransferEngine(aiote_provider, host=aiote_host, msg_size=4096) as e:
        await e.send(e.address, b"small")
        assert await asyncio.wait_for(e.recv(), 10) == (b"small", e.address)
    monkeypatch.setenv("AIOTE_CARRY_MAX", "65536")
    async with aiote.TransferEngine(aiote_provider, host=aiote_host, msg_size=2048):
        pass
    with pytest.raises(aiote.InvalidArgument, match="carry_max"):
        aiote.TransferEngine(aiote_provider, host=aiote_host, msg_size=4096, carry_max=8192)


async def test_closed_region_inside_a_message_fails_at_its_first_write(engine, peer):
    """8 writes to an open region, 8 to a closed one, 8 to the open one, in one message: the
    target applies the first 8 and stops (a prefix); the op fails with EKEYREJECTED naming
    element 8; 8 imms counted; the connection and the engine go on."""
    r_ok, d_ok = await region(peer, 4096, 0x11)
    r_bad, d_bad = await region(peer, 4096, 0x22)
    await peer.call("close_region", r_bad)
    src = engine.register(bytearray(b"\x01" * 4096))
    await carrying(engine, peer)
    batch = [(d_ok, 0, i * 64, 64) for i in range(8)] + [(d_bad, 0, i * 64, 64) for i in range(8)]
    batch += [(d_ok, 0, 1024 + i * 64, 64) for i in range(8)]
    with pytest.raises(aiote.ProviderError) as ei:
        await asyncio.wait_for(engine.scatter(src, batch, imm=14), 10)
    assert ei.value.fi_errno == errno.EKEYREJECTED and ei.value.index == 8
    assert not isinstance(ei.value, aiote.PeerUnreachable)
    got = await peer.call("read", r_ok, 0, 4096)
    assert got[:512] == b"\x01" * 512 and got[512:] == b"\x11" * (4096 - 512)
    assert await peer.call("read", r_bad, 0, 4096) == b"\x22" * 4096
    assert await peer.call("wait_imm", 14, 8, 10) and await peer.call("pending", 14) == 0
    await engine.scatter(src, [(d_ok, 0, 2048 + i * 64, 64) for i in range(4)], imm=15)
    assert await peer.call("wait_imm", 15, 4, 10)


async def test_forged_descriptors_are_refused_by_the_target(engine, peer):
    """A descriptor claiming more than the region (the initiator's bounds check passes) or
    naming a key the target never gave: refused entry by entry, no byte outside the region."""
    rid, d = await region(peer, 4096, 0x33)
    _, guard = await region(peer, 4096, 0x44)
    src = engine.register(bytearray(b"\x09" * 8192))
    await carrying(engine, peer)
    longer = dataclasses.replace(d, length=8192)
    with pytest.raises(aiote.ProviderError) as ei:
        await engine.scatter(src, [(longer, 0, 0, 64), (longer, 0, 4090, 64)], imm=16)
    assert ei.value.fi_errno == errno.EACCES and ei.value.index == 1
    stranger = dataclasses.replace(d, keys=(random.getrandbits(64) | 1,))
    with pytest.raises(aiote.ProviderError) as ei:
        await engine.scatter(src, [(stranger, 0, 0, 64), (stranger, 0, 64, 64)], imm=16)
    assert ei.value.fi_errno == errno.EKEYREJECTED and ei.value.index == 0
    got = await peer.call("read", rid, 0, 4096)
    assert got[:64] == b"\x09" * 64 and got[64:] == b"\x33" * (4096 - 64)
    assert await peer.call("read", _, 0, 4096) == b"\x44" * 4096
    assert await peer.call("pending", 16) == 1


async def test_deregistration_during_a_stream_fails_only_what_came_after(engine, peer):
    """The target closes its region while carried posts stream to it (8 in flight): the posts
    that succeed are a prefix of them (the target applies messages in order), the rest fail
    with EKEYREJECTED, and the region holds exactly the successful ones' bytes."""
    slots = 4000
    rid, d = await region(peer, slots * 256, 0)
    src_buf = bytearray(slots * 256)
    for i in range(slots):
        src_buf[i * 256:(i + 1) * 256] = bytes([i % 251 + 1]) * 256
    src = engine.register(src_buf)
    await carrying(engine, peer)
    results: list[BaseException | None] = []
    twenty = asyncio.Event()

    async def stream() -> None:
        window: list[asyncio.Future] = []
        for i in range(slots):
            window.append(asyncio.ensure_future(engine.scatter(
                src, [(d, i * 256 + k * 64, i * 256 + k * 64, 64) for k in range(4)])))
            if len(window) == 8:
                results.append((await asyncio.gather(window.pop(0), return_exceptions=True))[0])
                if len(results) == 20:
                    twenty.set()
                if results[-1] is not None:
                    break
        results.extend(await asyncio.gather(*window, return_exceptions=True))

    task = asyncio.ensure_future(stream())
    await asyncio.wait([task, asyncio.ensure_future(twenty.wait())], return_when=asyncio.FIRST_COMPLETED)
    assert twenty.is_set(), task
    await peer.call("close_region", rid)
    await asyncio.wait_for(task, 60)
    ok = [r is None for r in results]
    k = ok.index(False)
    assert all(ok[:k]) and not any(ok[k:]) and 20 <= k < slots, ok
    for r in results[k:]:
        assert isinstance(r, aiote.ProviderError) and r.fi_errno == errno.EKEYREJECTED, r
    got = await peer.call("read", rid, 0, slots * 256)
    assert got == bytes(src_buf[:k * 256]) + bytes(256 * (slots - k))


async def test_stopped_target_times_out_then_lands(aiote_make_engine, peer):
    """A stopped target never acknowledges: the post fails after peer_timeout with
    PeerUnreachable (ETIMEDOUT); the source region can't be closed meanwhile; when the target
    runs again it applies the message."""
    eng = await aiote_make_engine(peer_timeout=1)
    rid, d = await region(peer, 4096)
    src = eng.register(bytearray(b"\x05" * 4096))
    await carrying(eng, peer)
    await eng.scatter(src, [(d, 0, i * 64, 64) for i in range(2)], imm=17)  # carried: message 2
    peer.pause()
    try:
        post = asyncio.ensure_future(eng.scatter(src, [(d, 0, 512 + i * 64, 64) for i in range(8)], imm=17))
        await sent(eng, 3)
        with pytest.raises(aiote.RegionInUse):
            src.close()
        t0 = time.monotonic()
        with pytest.raises(aiote.PeerUnreachable) as ei:
            await asyncio.wait_for(post, 10)
        assert ei.value.fi_errno == errno.ETIMEDOUT and time.monotonic() - t0 < 5
    finally:
        peer.resume()
    assert await peer.call("wait_imm", 17, 10, 10)
    assert (await peer.call("read", rid, 0, 1024))[512:1024] == b"\x05" * 512
    await eng.scatter(src, [(d, 0, 2048 + i * 64, 64) for i in range(4)], imm=18)
    assert await peer.call("wait_imm", 18, 4, 10)


async def test_killed_target_fails_the_awaited_post(aiote_make_engine, aiote_make_peer):
    """The target dies while it owes the acknowledgement: the post fails with PeerUnreachable
    (its peer is pinged while it owes one; tcp;ofi_rxm refuses the ping while it re-tries the
    connection, and a ping refused for peer_timeout marks the peer down)."""
    eng = await aiote_make_engine(peer_timeout=2)
    peer = await aiote_make_peer()
    rid, d = await region(peer, 4096)
    src = eng.register(bytearray(b"\x06" * 4096))
    await carrying(eng, peer)
    await eng.scatter(src, [(d, 0, i * 64, 64) for i in range(2)])
    peer.pause()
    post = asyncio.ensure_future(eng.scatter(src, [(d, 0, i * 64, 64) for i in range(8)]))
    await sent(eng, 3)
    assert not post.done()
    peer.kill()
    t0 = time.monotonic()
    with pytest.raises(aiote.PeerUnreachable):
        await asyncio.wait_for(post, 20)
    assert time.monotonic() - t0 < 8
    other = await aiote_make_peer()
    r2, d2 = await region(other, 4096)
    await carrying(eng, other)
    await eng.scatter(src, [(d2, 0, i * 64, 64) for i in range(4)], imm=19)
    assert await other.call("wait_imm", 19, 4, 10)


async def test_cancel_and_close_with_an_acknowledgement_owed(aiote_make_engine, peer):
    """Cancelling the awaited post raises CancelledError at once (the message may still be
    applied); closing the engine fails a post still owed an acknowledgement with EngineClosed."""
    eng = await aiote_make_engine(peer_timeout=30)
    rid, d = await region(peer, 4096)
    src = eng.register(bytearray(b"\x08" * 4096))
    await carrying(eng, peer)
    await eng.scatter(src, [(d, 0, i * 64, 64) for i in range(2)])
    peer.pause()
    try:
        post = asyncio.ensure_future(eng.scatter(src, [(d, 0, i * 64, 64) for i in range(8)], imm=20))
        await sent(eng, 3)
        post.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(post, 5)
        owed = asyncio.ensure_future(eng.scatter(src, [(d, 0, 1024 + i * 64, 64) for i in range(8)], imm=20))
        await sent(eng, 4)
        await asyncio.wait_for(eng.close(), 10)
        with pytest.raises(aiote.EngineClosed):
            await owed
    finally:
        peer.resume()
    assert await peer.call("wait_imm", 20, 16, 10)  # both messages were applied once it ran


async def test_random_batches_with_cancellations(engine, peer):
    """200 batches of 1-24 writes of 0 B-12 KiB (carried runs, RMA writes past carry_max, lone
    small ones) into fresh, separated ranges of two regions, 16 in flight, 10 % cancelled at a
    random moment: every completed batch's bytes are in place, every write of a cancelled batch
    landed whole or not at all, the imm count is exactly the writes that landed, and no byte
    outside a write's range changed."""
    rng = random.Random(11)
    size = 8 << 20
    regions = [await region(peer, size, 0xA5) for _ in range(2)]
    pattern = bytes(rng.choice([b for b in range(256) if b != 0xA5]) for _ in range(1 << 16))  # never the fill
    src = engine.register(bytearray(pattern))
    await carrying(engine, peer)
    carried = engine.stats()["writes_carried"]
    nxt = [0, 0]
    batches = []  # (future, [(region index, dst, src, len)])
    inflight: list[asyncio.Future] = []
    for _ in range(200):
        ws = []
        for _ in range(rng.randrange(1, 25)):
            n = rng.choice([0, rng.randrange(1, 257), rng.randrange(1, 8193), rng.randrange(8193, 12289)])
            r = rng.randrange(2)
            dst = nxt[r] + rng.randrange(1, 64)
            nxt[r] = dst + n
            assert nxt[r] < size
            ws.append((r, dst, rng.randrange(0, len(pattern) - n + 1), n))
        fut = asyncio.ensure_future(engine.scatter(src, [(regions[r][1], s, d, n) for r, d, s, n in ws], imm=23))
        batches.append((fut, ws))
        inflight.append(fut)
        if rng.random() < 0.1:
            for _ in range(rng.choice([0, 1, 3, 20])):
                await asyncio.sleep(0)
            fut.cancel()
        if len(inflight) >= 16:
            await asyncio.gather(inflight.pop(0), return_exceptions=True)
    await asyncio.gather(*inflight, return_exceptions=True)
    got = [np.frombuffer(await peer.call("read", rid, 0, size), dtype=np.uint8) for rid, _ in regions]
    pat = np.frombuffer(pattern, dtype=np.uint8)
    outside = [np.ones(size, dtype=bool), np.ones(size, dtype=bool)]
    landed = zero_cancelled = 0
    for fut, ws in batches:
        for r, d, s, n in ws:
            outside[r][d:d + n] = False
            if n == 0:
                zero_cancelled += fut.cancelled()
                landed += not fut.cancelled()
            elif np.array_equal(got[r][d:d + n], pat[s:s + n]):
                landed += 1
            else:
                assert fut.cancelled(), (r, d, n)  # only a cancelled batch may miss a write
                assert (got[r][d:d + n] == 0xA5).all(), (r, d, n)  # ... and then wholly
    for r in range(2):  # bytes outside every write's range are untouched
        assert (got[r][outside[r]] == 0xA5).all()
    # the imm count is the writes that landed (a cancelled batch's 0-byte writes have no bytes
    # to look at: they may or may not have been counted)
    pending = await peer.call("pending", 23)
    assert landed <= pending <= landed + zero_cancelled, (landed, pending, zero_cancelled)
    assert engine.stats()["writes_carried"] - carried > 1000  # most of them went carried
