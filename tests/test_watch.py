"""Watchers: a word written by another thread, process or GPU kernel fires prepared transfers in C."""

import asyncio
import multiprocessing as mp
import threading
from multiprocessing import shared_memory

import pytest

import aiote

PAGE = 1024


@pytest.fixture
def pair(aiote_engine_pair):
    return aiote_engine_pair


def layer_setup(a, b, layers):
    src = a.register(bytearray(bytes(range(256)) * (PAGE * layers // 256)))
    dst = b.register(bytearray(PAGE * layers))
    # layer k: its page goes to page (layers - 1 - k) of the destination, imm 100 + k
    preps = [a.prepare_paged(src, dst.descriptor, PAGE, [k], [layers - 1 - k], imm=100 + k) for k in range(layers)]
    return src, dst, preps


def check_layers(src, dst, layers):
    for k in range(layers):
        d = layers - 1 - k
        assert dst.obj[d * PAGE:(d + 1) * PAGE] == src.obj[k * PAGE:(k + 1) * PAGE], k


async def test_thread_writer_with_jumps_fires_every_threshold_once(pair):
    a, b = pair
    layers = 10
    src, dst, preps = layer_setup(a, b, layers)
    w = a.watcher()
    fired = [w.arm(k + 1, preps[k]) for k in range(layers)]
    seen = [w.wait(k + 1) for k in range(layers)]
    writer = threading.Thread(target=lambda: [w.set(v) for v in (3, 7, 10)])  # jumps of several steps
    writer.start()
    await asyncio.wait_for(asyncio.gather(*fired), 30)
    values = await asyncio.gather(*seen)
    writer.join()
    for k in range(layers):
        await asyncio.wait_for(b.imms.wait(100 + k, 1), 30)
        assert b.imms.pending(100 + k) == 0  # exactly once
    check_layers(src, dst, layers)
    assert all(v >= k + 1 for k, v in enumerate(values)) and values == sorted(values)
    assert a.stats()["writes_posted"] == layers


def _child_writer(name, values):
    shm = shared_memory.SharedMemory(name=name)
    try:
        for v in values:
            shm.buf[:8] = int(v).to_bytes(8, "little")
    finally:
        shm.close()


async def test_process_writer_through_shared_memory(pair):
    a, b = pair
    layers = 6
    src, dst, preps = layer_setup(a, b, layers)
    shm = shared_memory.SharedMemory(create=True, size=4096)
    try:
        w = a.watcher(buffer=shm.buf)
        fired = [w.arm(k + 1, preps[k]) for k in range(layers)]
        p = mp.get_context("spawn").Process(target=_child_writer, args=(shm.name, [1, 2, 6]))
        p.start()
        await asyncio.wait_for(asyncio.gather(*fired), 30)
        await asyncio.get_running_loop().run_in_executor(None, p.join)
        check_layers(src, dst, layers)
        w.close()
    finally:
        shm.close()
        shm.unlink()


async def test_prepared_fires_again_after_rearming_and_changes_iterates(pair):
    a, b = pair
    src = a.register(bytearray(b"\x05" * 64))
    dst = b.register(bytearray(64))
    p = a.prepare_write(src, dst.descriptor, 64, imm=7)
    w = a.watcher()
    values = []

    async def follow():
        async for v in w.changes():
            values.append(v)
            if v >= 3:
                return

    follower = asyncio.ensure_future(follow())
    for round_ in (1, 2, 3):
        f = w.arm(round_, p)
        w.set(round_)
        await asyncio.wait_for(f, 30)
        await asyncio.wait_for(b.imms.wait(7, 1), 30)
    await asyncio.wait_for(follower, 30)
    assert values[-1] == 3 and values == sorted(set(values))
    assert bytes(dst.obj) == b"\x05" * 64
    assert a.stats()["writes_posted"] == 3
    # a prepared barrier: an imm-only write to each target
    other = b.register(bytearray(8))
    bar = a.prepare_barrier([dst.descriptor, other.descriptor], imm=8)
    f = w.arm(4, bar)
    w.set(4)
    await asyncio.wait_for(f, 30)
    await asyncio.wait_for(b.imms.wait(8, 2), 30)


async def test_cancel_disarms_and_close_fails_armed(pair):
    a, b = pair
    src = a.register(bytearray(64))
    dst = b.register(bytearray(64))
    p = a.prepare_write(src, dst.descriptor, imm=9)
    w = a.watcher()
    f = w.arm(5, p)
    f.cancel()
    await asyncio.sleep(0)  # let the done-callback run (it disarms)
    w.set(10)
    probe = w.wait(10)  # a later reaction: once it fires, the word has been read past 5
    assert await asyncio.wait_for(probe, 30) == 10
    assert a.stats()["writes_posted"] == 0
    # closing with reactions armed: they fail, typed
    g, h = w.arm(20, p), w.wait(30)
    with pytest.raises(aiote.RegionInUse):
        p.close()  # a reaction refers to it
    with pytest.raises(aiote.RegionInUse):
        src.close()  # the prepared transfer holds its region
    w.close()
    for fut in (g, h):
        with pytest.raises(aiote.EngineClosed):
            await fut
    p.close()
    src.close()


async def test_engine_close_fails_armed_reactions(aiote_make_engine):
    a, b = await aiote_make_engine(), await aiote_make_engine()
    src, dst = a.register(bytearray(64)), b.register(bytearray(64))
    w = a.watcher()
    fired, seen = w.arm(1, a.prepare_write(src, dst.descriptor)), w.wait(1)
    await a.close()
    for fut in (fired, seen):
        with pytest.raises(aiote.EngineClosed):
            await fut
    assert w.closed


async def test_bad_arguments(pair):
    a, b = pair
    src, dst = a.register(bytearray(64)), b.register(bytearray(64))
    w = a.watcher()
    with pytest.raises(aiote.OutOfBounds):
        a.prepare_write(src, dst.descriptor, 65)
    with pytest.raises(aiote.OutOfBounds) as ei:
        a.prepare_paged(src, dst.descriptor, 32, [0, 2], [0, 1])
    assert ei.value.index == 1
    with pytest.raises(aiote.InvalidArgument):
        w.arm(-1, a.prepare_write(src, dst.descriptor))
    with pytest.raises(aiote.InvalidArgument):
        w.arm(1, "not prepared")
    with pytest.raises(aiote.InvalidArgument):
        w.set(1 << 64)
    with pytest.raises(aiote.InvalidArgument):
        _ = w.tensor  # not device-mapped
    with pytest.raises(aiote.InvalidArgument):
        a.watcher(buffer=bytearray(8), offset=4)
