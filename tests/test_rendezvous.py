"""aiote.rendezvous: all-gathers through a store (torch's TCPStore, or any set/get/check store)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import aiote
import aiote.rendezvous as rdv

ROOT = Path(__file__).resolve().parents[1]


class DictStore:
    """The three methods aiote.rendezvous uses, in memory."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.calls = 0

    def set(self, key, value):
        self.calls += 1
        self.data[key] = value if isinstance(value, bytes) else value.encode()

    def get(self, key):
        return self.data[key]

    def check(self, keys):
        self.calls += 1
        return all(k in self.data for k in keys)


@pytest.fixture
def tcpstore():
    """A TCPStore served here, and a factory of client connections to it."""
    pytest.importorskip("torch.distributed")
    master = rdv.create_store("127.0.0.1", 0, is_master=True, timeout=30)

    def client():
        return rdv.create_store("127.0.0.1", master.port, is_master=False, timeout=30)

    return master, client


async def test_exchange_gathers_in_rank_order():
    store = DictStore()
    world = 5
    got = await asyncio.gather(*(rdv.exchange(store, "k", f"v{r}".encode(), r, world, timeout=10)
                                 for r in reversed(range(world))))
    assert all(g == [f"v{r}".encode() for r in range(world)] for g in got)
    assert store.data["k/3"] == b"v3"


async def test_exchange_over_tcpstore_does_not_block_the_loop(tcpstore):
    master, client = tcpstore
    stores = [master] + [await asyncio.to_thread(client) for _ in range(3)]
    ticks = 0
    stop = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.get_running_loop().create_task(ticker())
    early = [asyncio.ensure_future(rdv.exchange(stores[r], "job/x", bytes([r]) * 3, r, 4, timeout=20))
             for r in range(3)]
    before = ticks
    while ticks < before + 200:  # rank 3 is late: the loop keeps running meanwhile
        await asyncio.sleep(0)
    assert not any(f.done() for f in early)
    last = await rdv.exchange(stores[3], "job/x", b"\x03\x03\x03", 3, 4, timeout=20)
    results = await asyncio.gather(*early)
    stop.set()
    await t
    assert last == [bytes([r]) * 3 for r in range(4)] and all(r == last for r in results)


async def test_timeout_names_the_missing_ranks():
    store = DictStore()
    await rdv.put(store, "k/2", b"two")
    with pytest.raises(rdv.RendezvousTimeout) as ei:
        await rdv.exchange(store, "k", b"zero", 0, 4, timeout=0.05)
    assert "ranks [1, 3] of 4" in str(ei.value) and ei.value.missing == ["k/1", "k/3"]
    assert isinstance(ei.value, TimeoutError) and isinstance(ei.value, aiote.AioteError)


async def test_cancel_leaves_nothing_waiting():
    store = DictStore()
    task = asyncio.ensure_future(rdv.get(store, "never", timeout=None))
    while store.calls < 3:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    calls = store.calls
    for _ in range(50):
        await asyncio.sleep(0)
    assert store.calls == calls  # no poller left behind


async def test_bad_arguments():
    store = DictStore()
    with pytest.raises(aiote.InvalidArgument):
        await rdv.exchange(store, "k", b"x", 2, 2)
    with pytest.raises(aiote.InvalidArgument):
        await rdv.exchange(store, "", b"x", 0, 1)
    with pytest.raises(aiote.InvalidArgument):
        await rdv.exchange(store, "k", 12, 0, 1)
    with pytest.raises(aiote.InvalidArgument):
        rdv.Group(store, 0, 0)
    with pytest.raises(aiote.InvalidArgument, match="MASTER_ADDR"):
        rdv.from_env(env={"RANK": "0", "WORLD_SIZE": "1"})


async def test_group_rounds_reuse_keys_and_barrier():
    store = DictStore()
    groups = [rdv.Group(store, r, 3, prefix="run1") for r in range(3)]
    first = await asyncio.gather(*(g.exchange("x", f"a{g.rank}") for g in groups))
    second = await asyncio.gather(*(g.exchange("x", f"b{g.rank}") for g in groups))
    assert first[0] == [b"a0", b"a1", b"a2"] and second[2] == [b"b0", b"b1", b"b2"]
    await asyncio.gather(*(g.barrier() for g in groups))
    assert "run1/x/1/2" in store.data


async def test_engines_meet_and_write(aiote_provider, aiote_make_engine):
    """Two engines swap addresses and descriptors through the store, then write to each other."""
    store = DictStore()
    engines = [await aiote_make_engine(), await aiote_make_engine()]
    bufs = [bytearray(4096), bytearray(4096)]
    regions = [e.register(b) for e, b in zip(engines, bufs)]

    async def rank(r):
        eng = engines[r]
        addrs = await rdv.exchange_addresses(store, eng, r, 2)
        descs = await rdv.exchange_descriptors(store, "buf", regions[r].descriptor, r, 2)
        assert addrs[r] == eng.address
        other = 1 - r
        src = eng.register(bytearray([r + 1]) * 4096)
        await eng.write(src, descs[other], imm=r)
        await eng.imms.wait(other, 1, timeout=10)
        return addrs

    a0, a1 = await asyncio.gather(rank(0), rank(1))
    assert a0 == a1 and bufs[0] == bytearray([2]) * 4096 and bufs[1] == bytearray([1]) * 4096
    await rdv.publish_engine(store, engines[0], 0, key="eng")
    await rdv.publish_engine(store, engines[1], 1, key="eng")
    assert await rdv.peer_addresses(store, 2, key="eng") == a0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_SCRIPT = textwrap.dedent("""
    import asyncio, aiote, aiote.rendezvous

    async def main():
        group = await asyncio.to_thread(aiote.rendezvous.from_env)
        async with aiote.TransferEngine("tcp", host="127.0.0.1") as eng:
            buf = bytearray(1 << 16)
            mr = eng.register(buf)
            descs = await group.exchange_descriptors("buf", mr.descriptor)
            src = eng.register(bytearray([group.rank + 1]) * (1 << 16))
            peer = 1 - group.rank
            await eng.write(src, descs[peer], imm=7)
            await eng.imms.wait(7, 1, timeout=30)
            assert buf == bytearray([peer + 1]) * (1 << 16)
            await group.barrier()
        await group.leave()  # rank 0 serves the store: it waits here until rank 1 is done with it
        print("rank", group.rank, "ok", group)

    asyncio.run(main())
""")


def test_two_processes_from_env(tmp_path):
    """Two processes launched like torchrun's ranks (MASTER_ADDR/PORT, RANK, WORLD_SIZE; rank 0 serves)."""
    pytest.importorskip("torch.distributed")
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(r),
                                       WORLD_SIZE="2"))
             for r in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=90)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            outs.append(p.communicate()[0])
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    assert "rank 0 ok Group(rank=0, world_size=2, prefix='aiote/manual/0')" in outs[0]
    assert "rank 1 ok" in outs[1]


def test_without_torch_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.distributed", None)
    with pytest.raises(ImportError, match="pip install torch"):
        rdv.create_store("127.0.0.1", 0, is_master=True)
