"""A peer engine in another process, driven from async tests.

``async with PeerProcess("shm") as peer:`` starts a child process that runs
its own TransferEngine and answers calls (register a buffer, read it back,
wait for imms, write to a descriptor, send/recv, die).  Calls are async, so
the parent's event loop keeps serving its own engine while it waits.

Errors raised in the child come back as the same aiote exception class when
there is one, otherwise as RemoteError.
"""

from __future__ import annotations

import asyncio
import glob
import itertools
import multiprocessing as mp
import os
import signal
import time
import traceback
from typing import Any

from .. import errors as _errors

__all__ = ["PeerProcess", "RemoteError", "loopback_host"]


class RemoteError(Exception):
    """An exception in the peer process that has no aiote equivalent."""


def loopback_host(provider: str) -> str | None:
    """The node to bind for a provider on this host (None for shm)."""
    return None if provider == "shm" else "127.0.0.1"


# ---------------------------------------------------------------- child side


async def _child(conn: Any, provider: str, polling: str, kwargs: dict[str, Any]) -> None:
    import aiote

    loop = asyncio.get_running_loop()
    regions: dict[int, tuple[Any, Any]] = {}
    rids = itertools.count(1)
    done = asyncio.Event()
    kwargs = {"host": loopback_host(provider), **kwargs}
    async with aiote.TransferEngine(provider, polling=polling, **kwargs) as eng:

        async def handle(method: str, args: tuple) -> Any:
            if method == "address":
                return eng.address
            if method == "info":
                return eng.info()
            if method == "stats":
                return eng.stats()
            if method == "register":
                size, fill = args
                buf = bytearray([fill]) * size if fill else bytearray(size)
                mr = eng.register(buf)
                rid = next(rids)
                regions[rid] = (buf, mr)
                return rid, mr.descriptor.to_bytes()
            if method == "register_cuda":
                # a uint8 CUDA tensor (torch) on the given device, filled with a byte
                size, fill, device = args
                import torch

                buf = torch.full((size,), fill, dtype=torch.uint8, device=f"cuda:{device}")
                torch.cuda.synchronize(device)
                mr = eng.register(buf)
                rid = next(rids)
                regions[rid] = (buf, mr)
                return rid, mr.descriptor.to_bytes()
            if method == "register_fake_cuda":
                # tests only: fake device memory (aiote.testing.fake_cuda; AIOTE_FAKE_CUDA=1)
                from .fake_cuda import FakeDeviceBuffer

                size, fill, device = args
                buf = FakeDeviceBuffer(size, device, fill)
                mr = eng.register(buf)
                rid = next(rids)
                regions[rid] = (buf, mr)
                return rid, mr.descriptor.to_bytes()
            if method == "cuda_alloc_conf":
                # torch's allocator settings from now on, e.g. "expandable_segments:True"
                import torch

                torch.cuda.memory._set_allocator_settings(args[0])
                torch.cuda.empty_cache()  # no block of an earlier kind is reused
                return None
            if method == "read":
                rid, off, n = args
                buf = regions[rid][0]
                if getattr(buf, "is_cuda", False):
                    return buf[off:off + n].cpu().numpy().tobytes()
                if hasattr(buf, "host"):  # fake device memory
                    return bytes(buf.host[off:off + n])
                return bytes(buf[off:off + n])
            if method == "digest":
                # sha256 of a region's bytes (large regions, checked without shipping them)
                import hashlib

                rid, off, n = args
                buf = regions[rid][0]
                if getattr(buf, "is_cuda", False):
                    return hashlib.sha256(buf[off:off + n].cpu().numpy().tobytes()).hexdigest()
                return hashlib.sha256(bytes(buf[off:off + n])).hexdigest()
            if method == "fill":
                rid, off, data = args
                buf = regions[rid][0]
                if getattr(buf, "is_cuda", False):
                    import torch

                    buf[off:off + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(buf.device)
                    torch.cuda.synchronize(buf.device)
                else:
                    buf[off:off + len(data)] = data
                return None
            if method == "gpu_stats":
                return eng.gpu_stats
            if method == "close_region":
                # deregister; the buffer stays readable (``read``) to check nothing lands later
                regions[args[0]][1].close()
                return None
            if method == "wait_imm":
                imm, count, timeout = args
                await eng.imms.wait(imm, count, timeout=timeout)
                return True
            if method == "pending":
                return eng.imms.pending(args[0])
            if method == "write":
                rid, desc, length, src_off, dst_off, imm = args
                d = aiote.MrDescriptor.from_bytes(desc)
                await eng.write(regions[rid][1], d, length, src_off, dst_off, imm=imm)
                return None
            if method == "staging_state":
                # the bounce pools: free and total slots, transfers open on each side
                g = eng._gpu
                if g is None:
                    return None
                st = g.staging
                return {"recv_free": len(st._recv.free) if st._recv else None,
                        "send_free": len(st._send.free) if st._send else None, "nslots": st.nslots,
                        "in": len(st._in), "out": len(st._out),
                        "busy": sum(r[1]._busy for r in regions.values())}
            if method == "write_many":
                # (rid, desc, [(length, src_off, dst_off, imm), ...]): all in flight at once
                rid, desc, items = args
                d = aiote.MrDescriptor.from_bytes(desc)
                mr = regions[rid][1]
                await asyncio.gather(*(eng.write(mr, d, ln, so, do, imm=im) for ln, so, do, im in items))
                return None
            if method == "write_imm_many":
                desc, imms = args
                d = aiote.MrDescriptor.from_bytes(desc)
                await asyncio.gather(*(eng.write_imm(d, i) for i in imms))
                return None
            if method == "write_paged":
                rid, desc, kw = args
                d = aiote.MrDescriptor.from_bytes(desc)
                await eng.write_paged(regions[rid][1], d, **kw)
                return None
            if method == "send":
                addr, data = args
                await eng.send(addr, data)
                return None
            if method == "recv":
                return await eng.recv()
            if method == "pong_n":
                # n times: await one imm `ping`, then write 64 bytes of region rid with imm `pong`
                # into desc (a ping-pong partner)
                desc, rid, n, ping, pong = args
                d = aiote.MrDescriptor.from_bytes(desc)
                mr, futs = regions[rid][1], []
                for _ in range(n):
                    await eng.imms.wait(ping, 1, timeout=30)
                    futs.append(eng.write(mr, d, 64, imm=pong))
                await asyncio.gather(*futs)
                return n
            if method == "echo_messages":
                # answer every message with b"re:" + payload, args[0] times
                for _ in range(args[0]):
                    data, sender = await eng.recv()
                    await eng.send(sender, b"re:" + data)
                return None
            if method == "fail_nic":
                eng.fail_nic(args[0])
                return None
            if method == "nic_stats":
                return eng.nic_stats()
            if method == "exit":
                done.set()
                return None
            raise RemoteError(f"unknown method {method!r}")

        async def serve(call_id: int, method: str, args: tuple) -> None:
            try:
                res = ("ok", await handle(method, args))
            except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
                res = ("err", (type(e).__name__, str(e), traceback.format_exc()))
            try:
                conn.send((call_id, *res))
            except (BrokenPipeError, OSError):
                done.set()

        def on_readable() -> None:
            try:
                call_id, method, args = conn.recv()
            except (EOFError, OSError):
                done.set()
                return
            loop.create_task(serve(call_id, method, args))

        loop.add_reader(conn.fileno(), on_readable)
        conn.send((0, "ok", "ready"))
        await done.wait()
        loop.remove_reader(conn.fileno())


def _child_main(conn: Any, provider: str, polling: str, kwargs: dict[str, Any]) -> None:
    asyncio.run(_child(conn, provider, polling, kwargs))


# ---------------------------------------------------------------- parent side


def _all_threads_stopped(pid: int) -> bool:
    """Every thread of pid is stopped (state T/t), or the process is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


class PeerProcess:
    """A TransferEngine in a child process (spawned, so no inherited state).

    ``await peer.call(method, *args)`` runs ``method`` in the child:

    | method | args | returns |
    |---|---|---|
    | `address`, `info`, `stats`, `nic_stats` | | the peer engine's |
    | `register` | size, fill byte | `(rid, descriptor bytes)` |
    | `register_cuda` | size, fill byte, device | `(rid, descriptor bytes)` (a torch CUDA tensor) |
    | `register_fake_cuda` | size, fill byte, device | `(rid, descriptor bytes)` (tests only: fake device memory) |
    | `cuda_alloc_conf` | settings | None (torch's allocator settings, e.g. `"expandable_segments:True"`) |
    | `gpu_stats` | | the peer engine's `gpu_stats` |
    | `staging_state` | | free/total bounce slots, open staged transfers, busy regions (or None) |
    | `read` / `fill` | rid, offset, n / rid, offset, data | bytes / None |
    | `digest` | rid, offset, n | sha256 hex digest of those bytes |
    | `close_region` | rid | None |
    | `wait_imm` | imm, count, timeout | True |
    | `pending` | imm | imms counted and not consumed |
    | `write` | rid, descriptor bytes, length, src_off, dst_off, imm | None |
    | `write_many` | rid, descriptor bytes, [(length, src_off, dst_off, imm), ...] | None |
    | `write_imm_many` | descriptor bytes, [imm, ...] | None |
    | `write_paged` | rid, descriptor bytes, kwargs of `write_paged` | None |
    | `send` / `recv` | address, data / | None / `(data, sender)` |
    | `echo_messages` | n | None (answers n messages with `b"re:" + data`) |
    | `fail_nic` | nic | None |

    Faults: `kill()` (SIGKILL), `pause()` / `resume()` (SIGSTOP / SIGCONT),
    `await fail_nic(i)`.
    """

    def __init__(self, provider: str = "shm", polling: str = "adaptive", **engine_kwargs: Any):
        self.provider = provider
        self._polling = polling
        self._kwargs = engine_kwargs
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self.proc: Any = None
        self._conn: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paused = False

    async def start(self, timeout: float = 30) -> PeerProcess:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child_main, args=(child, self.provider, self._polling, self._kwargs),
                                daemon=True)
        self.proc.start()
        child.close()
        self._conn = parent
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[Any] = self._loop.create_future()
        self._calls[0] = ready
        self._loop.add_reader(parent.fileno(), self._on_readable)
        await asyncio.wait_for(ready, timeout)
        return self

    def _on_readable(self) -> None:
        try:
            call_id, status, value = self._conn.recv()
        except (EOFError, OSError):
            self._fail_all(RemoteError(f"peer process {self.pid} exited"))
            return
        fut = self._calls.pop(call_id, None)
        if fut is None or fut.done():
            return
        if status == "ok":
            fut.set_result(value)
        else:
            name, msg, tb = value
            cls = getattr(_errors, name, None)
            exc = cls(msg) if isinstance(cls, type) and issubclass(cls, Exception) else RemoteError(
                f"{name}: {msg}\n{tb}")
            fut.set_exception(exc)

    def _fail_all(self, exc: Exception) -> None:
        if self._loop is not None and self._conn is not None:
            try:
                self._loop.remove_reader(self._conn.fileno())
            except (ValueError, OSError):
                pass
        calls, self._calls = self._calls, {}
        for f in calls.values():
            if not f.done():
                f.set_exception(exc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, method: str, *args: Any) -> asyncio.Future[Any]:
        """Start a call in the peer; await the returned future for its result."""
        assert self._loop is not None, "start() the peer first"
        call_id = next(self._ids)
        fut = self._loop.create_future()
        self._calls[call_id] = fut
        self._conn.send((call_id, method, args))
        return fut

    @property
    def alive(self) -> bool:
        """The peer process is running (it may be paused)."""
        return self.proc is not None and self.proc.is_alive()

    def kill(self) -> None:
        """SIGKILL the peer process (a crash, as far as its peers can tell).

        Once it is reaped, the shm region files it leaves in /dev/shm (``<pid>:...``;
        a real crash leaves them too) are removed, so test runs don't pile them up."""
        if self.alive:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)
        if not self.proc.is_alive():
            for f in glob.glob(f"/dev/shm/{self.proc.pid}:*"):
                try:
                    os.unlink(f)
                except OSError:
                    pass

    def pause(self) -> None:
        """SIGSTOP the peer: its engine stops progressing (writes to it stay in flight).

        Returns once every thread of the peer is stopped (``/proc``): the signal itself is
        asynchronous, and on a loaded machine a thread of the peer was seen answering a
        message sent right after ``kill()`` returned."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        self._paused = True
        deadline = time.monotonic() + 5
        while not _all_threads_stopped(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.0005)

    def resume(self) -> None:
        """SIGCONT a paused peer."""
        self._paused = False
        if self.alive:
            os.kill(self.proc.pid, signal.SIGCONT)

    async def fail_nic(self, nic: int) -> None:
        """Take the peer engine's NIC ``nic`` out of service (``TransferEngine.fail_nic``)."""
        await self.call("fail_nic", nic)

    async def stop(self, timeout: float = 10) -> None:
        if self.proc is None:
            return
        if self._paused:
            self.resume()  # a stopped process can't answer "exit"
        if self.proc.is_alive():
            try:
                await asyncio.wait_for(self.call("exit"), timeout)
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
            await asyncio.get_running_loop().run_in_executor(None, self.proc.join, timeout)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        self._fail_all(RemoteError("peer stopped"))
        self._conn.close()

    async def __aenter__(self) -> PeerProcess:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
