"""imms.wait(timeout=...): all of an engine's deadlines share one loop timer (a heap with
lazy deletion, re-armed only for an earlier deadline).  Outcomes only: which waits time out,
in which order, what they consume; no timed assertions (every await is bounded by
wait_for so that a timer that never fires fails the test instead of hanging it)."""

import asyncio

import pytest

import aiote

pytestmark = pytest.mark.aiote_providers("shm")


@pytest.fixture(params=[0, 500], ids=["eventfd", "loop_spin"])
async def pair(request, aiote_make_engine):
    kw = {"loop_spin_us": request.param} if request.param else {}
    return await aiote_make_engine(**kw), await aiote_make_engine(**kw)


class _FrozenClock:
    """Arm waits at one loop time, so that their deadlines are exactly ordered by timeout
    (arming takes real time; on a loaded machine a preemption could reorder them)."""

    def __enter__(self):
        self.loop = asyncio.get_running_loop()
        t0 = self.loop.time()
        self.loop.time = lambda: t0
        return self

    def __exit__(self, *exc):
        del self.loop.time


class _ShiftedClock:
    """loop.time() = the real clock + an offset the test advances: deadlines pass when the
    test says so, not when a (loaded) machine gets round to it."""

    def __enter__(self):
        self.loop = asyncio.get_running_loop()
        self.offset = 0.0
        real = self.loop.time
        self.loop.time = lambda: real() + self.offset
        return self

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def __exit__(self, *exc):
        del self.loop.time


async def _landed(a, src, desc, imm, n=1):
    for _ in range(n):
        await a.write(src, desc, imm=imm)


async def _counted(b, imm, n=1):
    """n arrivals of imm are there for a new wait (none was taken by an expired or refused one)."""
    await asyncio.wait_for(b.imms.wait(imm, n, timeout=30), 60)


async def test_mixed_timeouts_expire_in_deadline_order(pair):
    """Waits armed in shuffled deadline order expire in deadline order; a wait without a
    timeout and one with a long timeout stay pending; each expiry consumes nothing."""
    a, b = pair
    timeouts = {101: 0.04, 102: 0.01, 103: 0.03, 104: 0.0, 105: 0.02, 106: -1.0}
    order: list[int] = []
    waits = {}
    with _FrozenClock():
        for imm, t in timeouts.items():
            w = b.imms.wait(imm, 1, timeout=t)
            w.add_done_callback(lambda f, imm=imm: order.append(imm))
            waits[imm] = w
    forever, long = b.imms.wait(107, 1), b.imms.wait(108, 1, timeout=3600)
    done, _ = await asyncio.wait_for(asyncio.wait(list(waits.values())), 30)
    assert order == sorted(timeouts, key=lambda k: timeouts[k])
    for w in waits.values():
        assert isinstance(w.exception(), aiote.ImmTimeout)
    assert not forever.done() and not long.done()
    src, dst = a.register(bytearray(8)), b.register(bytearray(8))
    for imm in timeouts:  # the expired waits are disarmed: a later write goes to a new wait
        await _landed(a, src, dst.descriptor, imm)
        await _counted(b, imm)
    await _landed(a, src, dst.descriptor, 107)
    await _landed(a, src, dst.descriptor, 108)
    await asyncio.wait_for(asyncio.gather(forever, long), 30)


async def test_resolved_before_its_deadline_never_times_out(pair):
    """A wait that resolves before its deadline keeps its result when the deadline passes,
    and the count it consumed is not given back or taken twice."""
    a, b = pair
    src, dst = a.register(bytearray(8)), b.register(bytearray(8))
    with _ShiftedClock() as clock:
        early = b.imms.wait(7, 2, timeout=60)  # a deadline no loaded machine reaches by itself
        await _landed(a, src, dst.descriptor, 7, 2)
        await asyncio.wait_for(early, 30)
        later = b.imms.wait(8, 1, timeout=61)
        clock.advance(120)  # both deadlines are past: the timer goes through early's, then later's
        with pytest.raises(aiote.ImmTimeout):
            await asyncio.wait_for(later, 30)
    assert early.done() and early.exception() is None
    assert b.imms.pending(7) == 0
    await _landed(a, src, dst.descriptor, 7)
    await _counted(b, 7)
    assert b.imms.pending(7) == 0


async def test_an_earlier_deadline_rearms_the_timer(pair):
    """A long deadline arms the timer; a shorter one armed after it must still expire on its
    own deadline (the timer is re-armed), and the long one stays pending."""
    a, b = pair
    long = b.imms.wait(20, 1, timeout=3600)
    with pytest.raises(aiote.ImmTimeout):
        await asyncio.wait_for(b.imms.wait(21, 1, timeout=0.01), 30)
    # and once more, with the earliest deadline now a stale entry
    with pytest.raises(aiote.ImmTimeout):
        await asyncio.wait_for(b.imms.wait(22, 1, timeout=0.01), 30)
    assert not long.done()
    src, dst = a.register(bytearray(8)), b.register(bytearray(8))
    await _landed(a, src, dst.descriptor, 20)
    await asyncio.wait_for(long, 30)


async def test_many_waits_some_resolved_the_rest_time_out(pair):
    """500 timed waits on 500 imms, every other one written: exactly those resolve, the
    others fail with ImmTimeout in deadline order, and no count is lost or doubled."""
    a, b = pair
    src, dst = a.register(bytearray(8)), b.register(bytearray(8))
    imms = list(range(1000, 1500))
    timeouts = {imm: 0.02 + (imm * 7919 % 500) / 10000 for imm in imms}  # 20..70 ms, shuffled
    order: list[int] = []
    waits = {}
    with _FrozenClock():
        for imm in imms:
            w = b.imms.wait(imm, 1, timeout=timeouts[imm])
            w.add_done_callback(lambda f, imm=imm: order.append(imm) if f.exception() else None)
            waits[imm] = w
    written = imms[::2]
    await asyncio.gather(*(a.write(src, dst.descriptor, imm=imm) for imm in written))
    await asyncio.wait_for(asyncio.wait(list(waits.values())), 30)
    late = [imm for imm in written if waits[imm].exception() is not None]  # landed after its deadline
    for imm in imms:
        w = waits[imm]
        if imm in written and imm not in late:
            assert w.exception() is None
            assert b.imms.pending(imm) == 0
        else:
            assert isinstance(w.exception(), aiote.ImmTimeout)
            if imm in late:  # landed after its deadline: the expired wait took nothing
                await _counted(b, imm)
            assert b.imms.pending(imm) == 0
    assert order == sorted(order, key=lambda k: timeouts[k])
    assert len(order) == len(imms) - len(written) + len(late)


async def test_finished_waits_do_not_pile_up(pair):
    """Thousands of timed waits that all resolve keep the deadline heap bounded."""
    a, b = pair
    src, dst = a.register(bytearray(8)), b.register(bytearray(8))
    pending = b.imms.wait(31, 1, timeout=3600)  # a live entry at the top of the heap
    for _ in range(3000):
        w = b.imms.wait(30, 1, timeout=3600)
        await a.write(src, dst.descriptor, imm=30)
        await asyncio.wait_for(w, 30)
    assert len(b.imms._deadlines) <= 2 * 1 + 256 + 1
    pending.cancel()


async def test_cancel_close_and_bad_timeouts(pair, aiote_make_engine):
    """A cancelled timed wait consumes nothing and leaves the other deadlines alone; closing
    the engine fails the timed waits with EngineClosed (the timer fires no more); a timeout
    that is not a number is refused before anything is armed."""
    a, b = pair
    src, dst = a.register(bytearray(8)), b.register(bytearray(8))
    c = b.imms.wait(40, 1, timeout=0.01)
    other = b.imms.wait(41, 1, timeout=0.02)
    c.cancel()
    with pytest.raises(aiote.ImmTimeout):
        await asyncio.wait_for(other, 30)
    await _landed(a, src, dst.descriptor, 40)
    await _counted(b, 40)
    for bad in ("1", float("nan"), object()):
        with pytest.raises(aiote.InvalidArgument):
            b.imms.wait(42, 1, timeout=bad)
    await _landed(a, src, dst.descriptor, 42)
    await _counted(b, 42)  # nothing was armed by the refused waits
    e = await aiote_make_engine()
    soon, later = e.imms.wait(43, 1, timeout=0.01), e.imms.wait(44, 1, timeout=3600)
    await e.close()
    for w in (soon, later):
        with pytest.raises(aiote.EngineClosed):
            await w
