"""Several NICs per engine (k domains of one provider on loopback): striping,
spreading, NIC-count-independent imm counting, NIC failure."""

import asyncio
import random

import numpy as np
import pytest

import aiote
from aiote.testing import PeerProcess

COMBOS = [(1, 2), (2, 1), (2, 2), (1, 4), (4, 1), (2, 4), (4, 4)]


@pytest.mark.parametrize("k_src,k_dst", COMBOS)
async def test_nic_combinations(provider, host, k_src, k_dst):
    rng = random.Random(k_src * 10 + k_dst)
    size = 8 << 20
    # NIC routing is the point: shm's direct path (no NIC at all) off
    async with aiote.TransferEngine(provider, host=host, nics=k_src, direct_shm=False) as a, \
            aiote.TransferEngine(provider, host=host, nics=k_dst) as b:
        assert len(a.nic_stats()) == k_src and len(b.register(bytearray(1)).descriptor.keys) == k_dst
        src = bytearray(rng.randbytes(size))
        dst = bytearray(size)
        ms, md = a.register(src), b.register(dst)
        d = md.descriptor
        # a large write is striped; the receiver still waits for exactly one
        w = b.imms.wait(1, 1, timeout=30)
        await a.write(ms, d, size - 3, 1, 2, imm=1)
        await w
        assert dst[2:size - 1] == src[1:size - 2] and dst[:2] == b"\0\0" and dst[-1:] == b"\0"
        assert b.imms.pending(1) == 0
        if k_src > 1:  # every local NIC carried a shard
            assert all(s["bytes_written"] > 0 for s in a.nic_stats())
        if k_dst > 1:
            assert sum(1 for s in b.nic_stats() if s["imms_received"] > 0) >= 2
        # tiny writes and a paged batch, spread over the NICs
        await asyncio.gather(*(a.write(ms, d, 3, i, 100 + i, imm=2) for i in range(16)))
        pages = np.arange(64)
        perm = np.array(rng.sample(range(64), 64))
        await a.write_paged(ms, d, 4096, pages, perm, dst_offset=1 << 20, imm=3)
        await asyncio.gather(b.imms.wait(2, 16, timeout=30), b.imms.wait(3, 64, timeout=30))
        assert all(dst[100 + i:103 + i] == src[i:i + 3] for i in range(16))
        got = np.frombuffer(dst, np.uint8)[1 << 20:(1 << 20) + 64 * 4096].reshape(64, 4096)
        assert np.array_equal(got[perm], np.frombuffer(src, np.uint8)[:64 * 4096].reshape(64, 4096))
        assert b.imms.pending(2) == 0 and b.imms.pending(3) == 0
        if k_src > 1:
            assert all(s["writes_posted"] > 5 for s in a.nic_stats())


async def test_cross_process_two_nics_to_one(provider):
    """A 2-NIC engine writes into a 1-NIC engine of another process and back."""
    async with aiote.TransferEngine(provider, host=aiote.testing.loopback_host(provider), nics=2) as eng, \
            PeerProcess(provider) as peer:
        rid, desc = await peer.call("register", 4 << 20, 0)
        src = bytearray(random.Random(5).randbytes(4 << 20))
        mr = eng.register(src)
        await eng.write(mr, aiote.MrDescriptor.from_bytes(desc), imm=9)
        assert await peer.call("wait_imm", 9, 1, 30)
        assert await peer.call("pending", 9) == 0
        assert await peer.call("read", rid, 0, 4 << 20) == src
        dst = bytearray(4 << 20)
        md = eng.register(dst)
        w = eng.imms.wait(10, 1, timeout=30)
        await peer.call("write", rid, md.descriptor.to_bytes(), 4 << 20, 0, 0, 10)
        await w
        assert dst == src
        # messages work between engines of different NIC counts
        echo = peer.call("echo_messages", 1)
        await eng.send(await peer.call("address"), b"two nics")
        data, sender = await eng.recv()
        await echo
        assert data == b"re:two nics"


async def test_pinned_routing_uses_one_nic(provider, host):
    async with aiote.TransferEngine(provider, host=host, nics=2, routing="pinned", pinned_nic=1,
                                    direct_shm=False) as a, \
            aiote.TransferEngine(provider, host=host, nics=2) as b:
        ms, md = a.register(bytearray(1 << 20)), b.register(bytearray(1 << 20))
        await asyncio.gather(*(a.write(ms, md.descriptor, imm=4) for _ in range(8)))
        await b.imms.wait(4, 8, timeout=10)
        s = a.nic_stats()
        assert s[0]["writes_posted"] == 0 and s[1]["writes_posted"] == 8


async def test_nic_failure_fails_only_its_operations(aiote_make_engine, aiote_make_peer, aiote_faults):
    """Writes in flight on a NIC that fails fail naming it; the other NIC carries on."""
    a = await aiote_make_engine(nics=2, stripe_threshold=1 << 40, direct_shm=False)
    peer = await aiote_make_peer(nics=2)
    rid, desc = await peer.call("register", 1 << 20, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    ms = a.register(bytearray(b"\x42" * (1 << 20)))
    for _ in range(50):  # until connections on both NICs are up
        await asyncio.gather(*(a.write(ms, d, imm=5) for _ in range(4)))
        if all(s["completions"] >= 1 for s in a.nic_stats()):
            break
    assert all(s["completions"] >= 1 for s in a.nic_stats())
    aiote_faults.pause(peer)  # nothing completes at the target now: writes stay in flight
    try:
        futs = [a.write(ms, d, imm=6) for _ in range(16)]
        deadline = asyncio.get_running_loop().time() + 30
        # (providers may refuse further posts to a stopped target: wait for NIC 1's first)
        while (s1 := a.nic_stats()[1])["writes_posted"] == s1["completions"]:
            assert asyncio.get_running_loop().time() < deadline, a.nic_stats()
            await asyncio.sleep(0)
        on_nic1 = s1["writes_posted"] - s1["completions"]
        await aiote_faults.fail_nic(a, 1)
        await asyncio.wait(futs, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        # resolved together, in one batch of events (a write may also have landed meanwhile)
        failed = [f for f in futs if f.done() and f.exception() is not None]
    finally:
        aiote_faults.resume(peer)
    assert on_nic1 >= 1 and len(failed) >= on_nic1  # (more may have been posted meanwhile)
    assert all(isinstance(f.exception(), aiote.ProviderError) and f.exception().nic == 1 for f in failed), [
        f.exception() for f in failed]
    await asyncio.wait_for(asyncio.gather(*(f for f in futs if f not in failed)), 30)
    assert a.nic_stats()[1]["failed"] == 1
    # later work goes to NIC 0 and lands
    before = a.nic_stats()[0]["writes_posted"]
    await asyncio.gather(*(a.write(ms, d, 100, imm=7) for _ in range(10)))
    assert await peer.call("wait_imm", 7, 10, 10)
    assert a.nic_stats()[0]["writes_posted"] == before + 10
    with pytest.raises(aiote.InvalidArgument):
        a.fail_nic(5)


async def test_bad_nic_arguments():
    for bad in (0, 17, ["a,b"], []):
        with pytest.raises(aiote.InvalidArgument):
            aiote.TransferEngine("shm", nics=bad)
    with pytest.raises(aiote.InvalidArgument):
        aiote.TransferEngine("shm", routing="sideways")
