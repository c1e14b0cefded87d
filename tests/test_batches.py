"""Paged writes, scatter, barrier and peer groups across real processes (issue 3)."""

import asyncio
import random

import numpy as np
import pytest

import aiote


def expected_paged(dst: bytearray, src: bytes, page_len, src_pages, dst_pages, src_stride, dst_stride,
                   src_off=0, dst_off=0) -> bytearray:
    out = bytearray(dst)
    for s, d in zip(src_pages, dst_pages):
        so, do = src_off + s * src_stride, dst_off + d * dst_stride
        out[do:do + page_len] = src[so:so + page_len]
    return out


@pytest.mark.parametrize("kind", ["list", "numpy", "torch"])
async def test_random_permutation_strided_pages(engine, peer, kind):
    """Strides larger than pages, offsets, the very last page of both regions; index types."""
    rng = random.Random(kind)
    page_len, src_stride, dst_stride, npages = 1000, 1536, 1024 + 7, 700
    src_off, dst_off = 5, 11
    src_size = src_off + (npages - 1) * src_stride + page_len  # last page ends exactly at the end
    dst_size = dst_off + (npages - 1) * dst_stride + page_len
    src = rng.randbytes(src_size)
    mr = engine.register(bytearray(src))
    rid, desc = await peer.call("register", dst_size, 0x11)
    src_pages = list(range(npages))
    dst_pages = list(range(npages))
    rng.shuffle(src_pages)
    rng.shuffle(dst_pages)
    if kind == "numpy":
        sp, dp = np.array(src_pages, dtype=np.int32), np.array(dst_pages, dtype=np.int64)
    elif kind == "torch":
        torch = pytest.importorskip("torch")
        sp, dp = torch.tensor(src_pages, dtype=torch.int32), torch.tensor(dst_pages)
    else:
        sp, dp = src_pages, dst_pages
    await engine.write_paged(mr, aiote.MrDescriptor.from_bytes(desc), page_len, sp, dp, src_stride=src_stride,
                             dst_stride=dst_stride, src_offset=src_off, dst_offset=dst_off, imm=21)
    assert await peer.call("wait_imm", 21, npages, 30)
    got = await peer.call("read", rid, 0, dst_size)
    assert got == expected_paged(bytearray([0x11]) * dst_size, src, page_len, src_pages, dst_pages, src_stride,
                                 dst_stride, src_off, dst_off)
    assert await peer.call("pending", 21) == 0


async def test_ten_thousand_pages(engine, peer):
    page_len, npages = 256, 10_000
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, page_len * npages, dtype=np.uint8)
    mr = engine.register(src)
    rid, desc = await peer.call("register", page_len * npages, 0)
    perm = rng.permutation(npages)
    await engine.write_paged(mr, aiote.MrDescriptor.from_bytes(desc), page_len, np.arange(npages), perm, imm=99)
    assert await peer.call("wait_imm", 99, npages, 60)
    got = np.frombuffer(await peer.call("read", rid, 0, page_len * npages), dtype=np.uint8)
    want = np.empty_like(src)
    want.reshape(npages, page_len)[perm] = src.reshape(npages, page_len)
    assert np.array_equal(got, want)


async def test_bad_page_posts_nothing(engine, peer):
    """One out-of-range page: typed error naming it, no byte and no imm delivered."""
    rid, desc = await peer.call("register", 4096, 0x22)
    d = aiote.MrDescriptor.from_bytes(desc)
    mr = engine.register(bytearray(b"\x99" * 4096))
    posted = engine.stats()["writes_posted"]
    for dst_pages, bad in (([0, 1, 2, 4], 3), ([0, -1, 2, 3], 1)):
        with pytest.raises(aiote.OutOfBounds) as ei:
            engine.write_paged(mr, d, 1024, [0, 1, 2, 3], dst_pages, imm=5)
        assert ei.value.index == bad and f"page {bad}" in str(ei.value)
    with pytest.raises(aiote.OutOfBounds) as ei:
        engine.write_paged(mr, d, 1024, [0, 1, 2, 3, 4], [0, 1, 2, 3, 0], imm=5)  # source page 4 is past the end
    assert ei.value.index == 4
    with pytest.raises(aiote.InvalidArgument):
        engine.write_paged(mr, d, 1024, [0, 1], [0], imm=5)
    with pytest.raises(aiote.InvalidArgument):
        engine.write_paged(mr, d, 1024, ["a"], [0], imm=5)
    assert engine.stats()["writes_posted"] == posted
    # the engine is still usable, and the target saw nothing of the refused batches
    await engine.write(mr, d, 16, imm=6)
    assert await peer.call("wait_imm", 6, 1, 10)
    assert await peer.call("pending", 5) == 0
    assert await peer.call("read", rid, 16, 4096 - 16) == b"\x22" * (4096 - 16)


async def test_scatter_to_three_peers_overlapping_sources(engine, aiote_make_peer):
    rng = random.Random(3)
    src = rng.randbytes(8192)
    mr = engine.register(bytearray(src))
    peers = list(await asyncio.gather(*(aiote_make_peer() for _ in range(3))))
    regs = [await p.call("register", 4096, 0) for p in peers]
    descs = [aiote.MrDescriptor.from_bytes(d) for _, d in regs]
    # overlapping source ranges, several targets per peer
    targets = [(descs[0], 0, 0, 3000), (descs[1], 1000, 100, 3000), (descs[2], 2000, 4096 - 2500, 2500),
               (descs[0], 500, 3000, 1096)]
    await engine.scatter(mr, targets, imm=8)
    counts = [2, 1, 1]
    assert all(await asyncio.gather(*(p.call("wait_imm", 8, c, 30) for p, c in zip(peers, counts))))
    want = [bytearray(4096) for _ in peers]
    for d, so, do, ln in targets:
        want[descs.index(d)][do:do + ln] = src[so:so + ln]
    for p, (rid, _), w in zip(peers, regs, want):
        assert await p.call("read", rid, 0, 4096) == w

    # peer group: barrier and scatter rounds reuse resolved peers
    group = engine.peer_group(descs)
    for rnd in range(5):
        await group.barrier(100 + rnd)
        await engine.barrier(descs, 200 + rnd)
    await group.scatter(mr, [10, 20, 30], src_offsets=[0, 100, 200], dst_offsets=0, imm=300)
    for p, (rid, _), so, ln in zip(peers, regs, [0, 100, 200], [10, 20, 30]):
        assert await p.call("wait_imm", 300, 1, 10)
        assert await p.call("read", rid, 0, ln) == src[so:so + ln]
        for rnd in range(5):
            assert await p.call("pending", 100 + rnd) == 1
            assert await p.call("pending", 200 + rnd) == 1
    with pytest.raises(aiote.OutOfBounds) as ei:
        group.scatter(mr, [10, 5000, 10])
    assert ei.value.index == 1


async def test_scatter_bad_element_names_it(engine, peer):
    rid, desc = await peer.call("register", 1024, 0x33)
    d = aiote.MrDescriptor.from_bytes(desc)
    mr = engine.register(bytearray(2048))
    with pytest.raises(aiote.OutOfBounds) as ei:
        engine.scatter(mr, [(d, 0, 0, 10), (d, 0, 0, 10), (d, 0, 1020, 10)], imm=1)
    assert ei.value.index == 2
    with pytest.raises(aiote.OutOfBounds) as ei:
        engine.scatter(mr, [(d, 2040, 0, 10)], imm=1)
    assert ei.value.index == 0
    assert await peer.call("read", rid, 0, 1024) == b"\x33" * 1024
    assert await peer.call("pending", 1) == 0
