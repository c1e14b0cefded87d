"""Loop-spin mode (TransferEngine(loop_spin_us=...), issue 2's latency): the asyncio loop
spins on the engines' events inside select() and drives their progress.  Outcomes only:
imms counted exactly, futures resolved, timers and other fds served, the selector put
back; no timed assertions (speed is benchmarks/bench_write.py's business)."""

import asyncio
import socket
import time

import pytest

import aiote
from aiote import _spin
from aiote.errors import InvalidArgument


def _selector(loop=None):
    return (loop or asyncio.get_running_loop())._selector


@pytest.mark.parametrize("bad", [-1, 1.5, "100", True, None, 10_000_001])
def test_option_validation(bad):
    with pytest.raises(InvalidArgument):
        aiote.TransferEngine("shm", loop_spin_us=bad)


async def test_ping_pong_with_a_spinning_peer(provider, host, aiote_make_peer):
    """Both sides spin: 300 round trips of a write with imm; every imm counted exactly once,
    the bytes of the last write in place, and the selector restored when the engine closes."""
    peer = await aiote_make_peer(loop_spin_us=2000)
    rid, pdesc = await peer.call("register", 4096, 0)
    pdesc = aiote.MrDescriptor.from_bytes(pdesc)
    inner = _selector()
    eng = await aiote.TransferEngine(provider, host=host, loop_spin_us=2000).__aenter__()
    try:
        assert eng.loop_spinning and isinstance(_selector(), _spin._SpinSelector)
        buf = bytearray(4096)
        mr = eng.register(buf)
        src = eng.register(bytearray(4096))
        n = 300
        # the peer echoes: one write of ours with imm 1 -> one write of its with imm 2
        echo = asyncio.ensure_future(peer.call("pong_n", mr.descriptor.to_bytes(), rid, n, 1, 2))
        for _ in range(n):
            await eng.write(src, pdesc, 64, imm=1)
            await eng.imms.wait(2, 1, timeout=30)
        await echo
        assert eng.imms.pending(2) == 0
        st, pst = eng.stats(), await peer.call("stats")
        assert st["imms_received"] == n and pst["imms_received"] == n
        assert st["loop_passes"] > 0 and pst["loop_passes"] > 0  # the loops drove progress
        assert await peer.call("pending", 1) == 0
    finally:
        await eng.close()
    assert _selector() is inner


async def test_timers_fds_and_threads_while_spinning(provider, host):
    """A loop that spins (a 10 s budget) still runs call_later timers, reader callbacks of
    other fds and run_in_executor results, and engine traffic goes on meanwhile."""
    loop = asyncio.get_running_loop()
    async with aiote.TransferEngine(provider, host=host, loop_spin_us=10_000_000) as a, \
            aiote.TransferEngine(provider, host=host) as b:
        assert a.loop_spinning
        dst = b.register(bytearray(64))
        src = a.register(bytearray(b"z" * 64))

        fired = loop.create_future()
        loop.call_later(0.002, fired.set_result, "timer")
        assert await asyncio.wait_for(fired, 5) == "timer"

        r, w = socket.socketpair()
        r.setblocking(False)
        got = loop.create_future()
        loop.add_reader(r.fileno(), lambda: got.done() or got.set_result(r.recv(16)))
        try:
            w.send(b"ping")
            assert await asyncio.wait_for(got, 5) == b"ping"
        finally:
            loop.remove_reader(r.fileno())
            r.close()
            w.close()

        assert await asyncio.wait_for(loop.run_in_executor(None, lambda: 41 + 1), 5) == 42

        for _ in range(50):
            await a.write(src, dst.descriptor, 64, imm=3)
        await asyncio.wait_for(b.imms.wait(3, 50), 10)
        await asyncio.sleep(0)  # select(0) with ready handles: one progress round, no spin
        assert a.stats()["ops_completed"] >= 50


async def test_several_engines_share_one_wrapper(provider, host):
    """Two spinning engines on one loop: both work, closing one keeps the other spinning,
    closing the last restores the loop's own selector; an engine without the option is
    untouched and still served (through its eventfd)."""
    inner = _selector()
    plain = await aiote.TransferEngine(provider, host=host, await_spin_us=0).__aenter__()
    a = await aiote.TransferEngine(provider, host=host, loop_spin_us=500).__aenter__()
    b = await aiote.TransferEngine(provider, host=host, loop_spin_us=50).__aenter__()
    try:
        w = _selector()
        assert isinstance(w, _spin._SpinSelector) and a.loop_spinning and b.loop_spinning
        assert not plain.loop_spinning
        regs = {e: e.register(bytearray(64)) for e in (plain, a, b)}
        for x, y, imm in ((a, b, 10), (b, a, 11), (plain, a, 12), (a, plain, 13), (b, plain, 14)):
            await asyncio.gather(*(x.write(regs[x], regs[y].descriptor, 8, imm=imm) for _ in range(20)))
            await asyncio.wait_for(y.imms.wait(imm, 20), 10)
        await a.close()
        assert _selector() is w and b.loop_spinning
        await b.write(regs[b], regs[plain].descriptor, 8, imm=15)
        await asyncio.wait_for(plain.imms.wait(15, 1), 10)
        await b.close()
        assert _selector() is inner
        await plain.write(regs[plain], regs[plain].descriptor, 8, imm=16)
        await asyncio.wait_for(plain.imms.wait(16, 1), 10)
    finally:
        for e in (a, b, plain):
            await e.close()
    assert _selector() is inner


@pytest.mark.parametrize("spin", [{"loop_spin_us": 1000}, {"await_spin_us": 1_000_000}], ids=["loop", "await"])
async def test_worker_steps_in_while_the_loop_is_busy(provider, host, spin):
    """The loop thread submits and then blocks in plain Python (never reaching select):
    the workers of both spinning engines notice and post, progress and count on their own."""
    async with aiote.TransferEngine(provider, host=host, **spin) as a, \
            aiote.TransferEngine(provider, host=host, **spin) as b:
        dst = b.register(bytearray(1024))
        src = a.register(bytearray(b"q" * 1024))
        await a.write(src, dst.descriptor, 8, imm=1)  # connect, warm up (through select)
        await b.imms.wait(1, 1, timeout=10)
        futs = [a.write(src, dst.descriptor, 1024, imm=2) for _ in range(10)]
        deadline = time.monotonic() + 20
        while b.imms.pending(2) < 10:  # blocks the loop: only the worker threads can progress
            assert time.monotonic() < deadline, "workers did not step in"
        await asyncio.wait_for(asyncio.gather(*futs), 10)
        await b.imms.wait(2, 10, timeout=10)


def test_uvloop_falls_back_to_the_eventfd():
    """A loop without a wrappable selector: the engine works as without the option."""
    uvloop = pytest.importorskip("uvloop")

    async def main():
        async with aiote.TransferEngine("shm", loop_spin_us=500) as e:
            assert not e.loop_spinning
            mr = e.register(bytearray(64))
            await e.write(mr, mr.descriptor, 8, imm=5)
            await e.imms.wait(5, 1, timeout=10)
        async with aiote.TransferEngine("tcp", host="127.0.0.1") as e:  # await-spin's default
            assert e.await_spin_us == 0 and not e.loop_spinning
            mr = e.register(bytearray(64))
            await e.write(mr, mr.descriptor, 8, imm=6)
            await e.imms.wait(6, 1, timeout=10)

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


async def test_cancel_and_close_while_spinning(provider, host):
    """A cancelled wait consumes nothing; closing a spinning engine fails its pending waits
    with EngineClosed and gives the loop its own selector back."""
    inner = _selector()
    async with aiote.TransferEngine(provider, host=host, await_spin_us=0) as a:
        b = await aiote.TransferEngine(provider, host=host, loop_spin_us=1000).__aenter__()
        dst = b.register(bytearray(64))
        src = a.register(bytearray(64))
        w = b.imms.wait(21, 1)
        w.cancel()
        await a.write(src, dst.descriptor, 8, imm=21)
        await b.imms.wait(21, 1, timeout=10)  # the cancelled wait took nothing
        assert b.imms.pending(21) == 0
        pending = [b.imms.wait(22, 1), b.imms.wait(23, 2, timeout=60)]
        await b.close()
        for f in pending:
            with pytest.raises(aiote.EngineClosed):
                await f
        assert _selector() is inner


# -- await-spin (await_spin_us): the loop spins only while it awaits the engine ----------


@pytest.mark.parametrize("bad", [-1, 1.5, "100", True, 1_000_001])
def test_await_spin_validation(bad):
    with pytest.raises(InvalidArgument):
        aiote.TransferEngine("shm", await_spin_us=bad)


async def test_await_spin_defaults(provider, host, monkeypatch):
    """On by default over tcp (500 µs), off on shm; AIOTE_AWAIT_SPIN_US overrides the
    default, an explicit argument overrides both; it is not latency mode."""
    inner = _selector()
    async with aiote.TransferEngine(provider, host=host) as e:
        assert not e.loop_spinning
        if provider == "tcp":
            assert e.await_spin_us == 500 and isinstance(_selector(), _spin._SpinSelector)
        else:
            assert e.await_spin_us == 0 and _selector() is inner
    assert _selector() is inner
    monkeypatch.setenv("AIOTE_AWAIT_SPIN_US", "0" if provider == "tcp" else "300")
    async with aiote.TransferEngine(provider, host=host) as e:
        assert e.await_spin_us == (0 if provider == "tcp" else 300)
    async with aiote.TransferEngine(provider, host=host, await_spin_us=42) as e:
        assert e.await_spin_us == 42 and isinstance(_selector(), _spin._SpinSelector)
    assert _selector() is inner
    for bad in ("-1", "2000000", "fast"):  # checked as the argument is, not clamped
        monkeypatch.setenv("AIOTE_AWAIT_SPIN_US", bad)
        with pytest.raises(aiote.InvalidArgument, match="AIOTE_AWAIT_SPIN_US|await_spin_us"):
            aiote.TransferEngine(provider, host=host)


async def test_await_spin_resolves_writes_in_select(provider, host, aiote_make_peer):
    """One-at-a-time writes to another process: with await-spin the loop finds their
    completions itself (loop_found), every imm lands once and the last bytes are in place;
    with it off the loop never runs a progress pass."""
    peer = await aiote_make_peer()
    rid, pdesc = await peer.call("register", 4096, 0)
    pdesc = aiote.MrDescriptor.from_bytes(pdesc)
    n = 200
    for budget, imm in ((1_000_000, 31), (0, 32)):
        async with aiote.TransferEngine(provider, host=host, await_spin_us=budget) as eng:
            buf = bytearray(range(256)) * 16
            src = eng.register(buf)
            for i in range(n):
                await eng.write(src, pdesc, 64, src_offset=i, imm=imm)
            assert await peer.call("wait_imm", imm, n, 30) is True
            assert await peer.call("read", rid, 0, 64) == bytes(buf[n - 1:n + 63])
            st = eng.stats()
            if budget and provider == "tcp":  # shm: the direct path completes them in the call
                assert st["loop_found"] > 0
            if not budget:
                assert st["loop_passes"] == 0


async def test_await_spin_stops_after_long_waits(provider, host):
    """A wait that outlasts half the budget stops the spinning: the next awaited wait runs
    no progress pass in the loop (it sleeps in epoll at once); short round trips (tcp)
    bring the spin back."""
    async with aiote.TransferEngine(provider, host=host, await_spin_us=5000) as eng:
        mr = eng.register(bytearray(64))
        with pytest.raises(aiote.ImmTimeout):
            await eng.imms.wait(77, 1, timeout=0.2)  # spins 5 ms, then sleeps out the 200 ms
        passes = eng.stats()["loop_passes"]
        with pytest.raises(aiote.ImmTimeout):
            await eng.imms.wait(78, 1, timeout=0.2)
        assert eng.stats()["loop_passes"] == passes
        for _ in range(100):  # to itself: in flight over tcp, done in the call on shm
            await eng.write(mr, mr.descriptor, 8, imm=79)
        await eng.imms.wait(79, 100, timeout=10)
        if provider == "tcp":
            assert eng.stats()["loop_passes"] > passes
