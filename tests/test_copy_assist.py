"""Copy assistants (issues #2, #8): a large direct run on shm is cut into chunks that the
copying thread and the engine's assistant threads share.  Two real processes each; the
test hook `aiote_direct_assist_test` makes the assistants copy every chunk (so the counts
are exact) and holds them between chunks (failure paths synchronised on that, no sleeps)."""

import asyncio

import numpy as np
import pytest

import aiote
from aiote._core import ffi, lib

pytestmark = pytest.mark.aiote_providers("shm")

CHUNK = 256 << 10


def _chunks(total: int) -> int:
    chunk = max(CHUNK, (-(-total // 256) + 4095) & ~4095)
    return -(-total // chunk)


@pytest.fixture
def hooks():
    def set_(only: bool, hold: bool) -> None:
        assert lib.aiote_direct_assist_test(ffi.NULL, int(only), int(hold)) == 0

    yield set_
    set_(False, False)


async def _held() -> None:
    assert await asyncio.to_thread(lib.aiote_direct_assist_wait_held, ffi.NULL, 30000) == 1


async def _pair(make_engine, make_peer, size: int, seed: int):
    """An engine with a registered source of `size` random bytes, and a peer with a zeroed
    target region of the same size."""
    eng, peer = await make_engine(), await make_peer()
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    src = eng.register(bytearray(data))
    rid, desc = await peer.call("register", size, 0)
    return eng, peer, rid, aiote.MrDescriptor.from_bytes(desc), src, data


async def test_assistants_copy_exact_bytes(aiote_make_engine, aiote_make_peer, hooks):
    """With every chunk left to the assistant: single writes at unaligned offsets (on the
    calling thread and, above direct_max, on a copy thread) and a scatter of unmerged
    elements whose chunks cut through iovecs land exactly; imms exact; the chunk count is
    the one the cut gives."""
    eng, peer, rid, d, src, data = await _pair(aiote_make_engine, aiote_make_peer, 16 << 20, 11)
    expect = bytearray(len(data))
    hooks(True, False)
    chunks = 0
    for n, so, do in ((512 << 10, 0, 0), ((1 << 20) + 3, 5, 7), ((7 << 20) + 123, 1001, (8 << 20) + 3)):
        await eng.write(src, d, n, so, do, imm=1)
        expect[do:do + n] = data[so:so + n]
        chunks += _chunks(n)
    # 300 elements of 4099 bytes, every other 8 KiB at the source, reversed at the target
    wrs = [(d, i * 8192 + 1, (300 - i) * 4100 + 17, 4099) for i in range(300)]
    await eng.scatter(src, wrs, imm=2)
    for _, so, do, n in wrs:
        expect[do:do + n] = data[so:so + n]
    chunks += _chunks(300 * 4099)
    assert await peer.call("wait_imm", 1, 3, 10) and await peer.call("wait_imm", 2, 300, 10)
    assert await peer.call("pending", 1) == 0 and await peer.call("pending", 2) == 0
    assert await peer.call("read", rid, 0, len(data)) == bytes(expect)
    st = eng.stats()
    assert st["direct_assisted"] == chunks and st["writes_posted"] == 0, st


async def test_shared_chunks_land_exactly(aiote_make_engine, aiote_make_peer):
    """Caller and assistant sharing runs as they happen to (no hook): many 1–6 MiB writes in
    flight, each with its own bytes; every byte and imm exact."""
    size = 24 << 20
    eng, peer, rid, d, src, data = await _pair(aiote_make_engine, aiote_make_peer, size, 12)
    rng = np.random.default_rng(12)
    expect = bytearray(size)
    futs = []
    off = 0
    for i in range(8):
        n = (1 + i % 6) << 20 if off + ((1 + i % 6) << 20) <= size else 0
        if not n:
            break
        so = int(rng.integers(0, size - n))
        futs.append(eng.write(src, d, n, so, off, imm=3))
        expect[off:off + n] = data[so:so + n]
        off += n
    await asyncio.gather(*futs)
    assert await peer.call("wait_imm", 3, len(futs), 10) and await peer.call("pending", 3) == 0
    assert await peer.call("read", rid, 0, size) == bytes(expect)


async def test_no_assistants_when_off(aiote_make_engine, aiote_make_peer, hooks):
    """direct_assist=0: large runs are copied by one thread (none of them assisted)."""
    eng = await aiote_make_engine(direct_assist=0)
    peer = await aiote_make_peer()
    rid, desc = await peer.call("register", 4 << 20, 0)
    data = bytes(range(256)) * (4 << 12)
    src = eng.register(bytearray(data))
    hooks(True, False)  # nothing to leave the chunks to: the caller copies them
    await eng.write(src, aiote.MrDescriptor.from_bytes(desc), 4 << 20, imm=1)
    assert await peer.call("read", rid, 0, 4 << 20) == data
    st = eng.stats()
    assert st["direct_assisted"] == 0 and st["direct_writes"] == 1, st


@pytest.mark.parametrize("bad", [-1, 16, "2", 1.0])
async def test_bad_direct_assist_is_refused(bad):
    with pytest.raises(aiote.InvalidArgument):
        aiote.TransferEngine("shm", direct_assist=bad)


async def _held_write(eng, peer, size=4 << 20):
    """A write of `size` random bytes (imm 5) whose chunks the assistant copies; held after
    its first chunk (the last one of the range)."""
    rid, desc = await peer.call("register", size, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    data = np.random.default_rng(13).integers(0, 256, size, dtype=np.uint8).tobytes()
    src = eng.register(bytearray(data))
    fut = eng.write(src, d, size, imm=5)
    await _held()
    return rid, d, src, data, fut


async def test_dead_target_during_an_assisted_copy(aiote_make_engine, aiote_make_peer, aiote_faults, hooks):
    """The target is killed while the assistant is between two chunks: the write fails with
    PeerUnreachable; the engine goes on writing to a live peer."""
    eng = await aiote_make_engine(direct_max=4096)  # large ops on a copy thread: the loop stays free
    peer, other = await aiote_make_peer(), await aiote_make_peer()
    hooks(True, True)
    _, d, src, data, fut = await _held_write(eng, peer)
    aiote_faults.kill(peer)
    hooks(True, False)
    with pytest.raises(aiote.PeerUnreachable):
        await asyncio.wait_for(fut, 30)
    rid2, desc2 = await other.call("register", 4 << 20, 0)
    await eng.write(src, aiote.MrDescriptor.from_bytes(desc2), 4 << 20, imm=6)
    assert await other.call("read", rid2, 0, 4 << 20) == data
    assert await other.call("wait_imm", 6, 1, 10)


async def test_deregistration_during_an_assisted_copy(aiote_make_engine, aiote_make_peer, hooks):
    """The target closes the region while the assistant is between two chunks: the run that
    had begun lands whole (the caller's hold covers the assistants' chunks) and the write
    succeeds; the close returns; a later write fails with the stale-key error and lands
    nothing."""
    eng = await aiote_make_engine(direct_max=4096)
    peer = await aiote_make_peer()
    hooks(True, True)
    rid, d, src, data, fut = await _held_write(eng, peer)
    closing = asyncio.ensure_future(peer.call("close_region", rid))
    hooks(True, False)
    await fut
    await closing
    assert await peer.call("read", rid, 0, 4 << 20) == data
    assert await peer.call("wait_imm", 5, 1, 10)
    with pytest.raises(aiote.ProviderError) as ei:
        await eng.write(src, d, 4 << 20, imm=5)
    assert "EKEYREJECTED" in str(ei.value) or "rejected" in str(ei.value).lower(), ei.value
    assert await peer.call("pending", 5) == 0


async def test_cancel_and_close_during_an_assisted_copy(aiote_make_engine, aiote_make_peer, hooks):
    """Cancelling the write while its run is being copied: the run in progress finishes (a
    run is never torn), the future is cancelled.  Closing the engine while the assistant is
    held: the held assistant lets go, the run lands whole, close returns; the write either
    completed before close or fails with EngineClosed, never anything else."""
    eng = await aiote_make_engine(direct_max=4096)
    peer = await aiote_make_peer()
    hooks(True, True)
    rid, d, src, data, fut = await _held_write(eng, peer)
    fut.cancel()
    hooks(True, False)
    with pytest.raises(asyncio.CancelledError):
        await fut
    await eng.write(src, d, 4 << 20, imm=7)  # the engine goes on
    assert await peer.call("read", rid, 0, 4 << 20) == data
    assert await peer.call("wait_imm", 7, 1, 10)

    hooks(True, True)
    rid2, d2, src2, data2, fut2 = await _held_write(eng, peer)
    close = asyncio.ensure_future(eng.close())
    try:
        await fut2
    except aiote.EngineClosed:
        pass
    await close
    assert await peer.call("read", rid2, 0, 4 << 20) == data2
