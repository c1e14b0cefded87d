"""Soak: two processes, many write_imm operations, random sizes, imms and cancellations.

Checks, exactly: zero bytes wrong, zero imms lost, zero imms counted twice, and
every cancelled write either landed whole (and delivered its imm once) or not
at all (no byte changed, no imm).  Results: docs/reliability.md.

    .venv/bin/python benchmarks/soak.py --provider shm --ops 1000000
    .venv/bin/python benchmarks/soak.py --provider shm,tcp --ops 20000 --json out.json

How it checks (the writer is this process, the target a spawned process with
its own engine):

* Both sides build the same pseudo-random pattern P from the seed.  The writer
  registers P; every write copies P[src : src+len] to a fresh, non-overlapping
  range of the target's region, ranges separated by gaps of 1..64 bytes.  The
  target region starts filled with a sentinel byte.
* Work goes in rounds (one region's worth of ranges, at most --round ops) with
  --window writes in flight.  A fraction of the futures is cancelled, at once or
  after a random number of event-loop turns.  Every write marked for
  cancellation carries an imm of its own (unique in the run), so the target can
  tell for each one whether it landed; the other writes carry random imms from
  a hot set of 32 values and from the whole lower half of the imm space.
* At the end of a round the writer waits until its engine has finished every
  operation of the round in C (``stats()``: completed + failed = issued; a
  cancelled future gives no other signal), so it knows how many of the
  cancelled writes completed anyway: stats' ``ops_completed`` minus the futures
  that resolved.  It sends the target the list of writes that completed, the
  list of cancelled ones and that number.
* The target waits for exactly the imm counts of the completed writes
  (``imms.wait(imm, n)``; a timeout is a lost imm), waits until that many of
  the cancelled writes' imms arrived, then checks that nothing is left pending
  for any of those imms (an imm counted twice).  It compares its whole region
  with the expected image: P's bytes where a write landed, the sentinel
  everywhere else (a byte out of place, torn or stray is a wrong byte), and for
  each cancelled write: imm seen <=> its range holds P's bytes; no imm <=> its
  range still holds the sentinel (anything else is a torn cancelled write).
  Then it resets the used part of the region.
* At the end the target's ``imms_received`` must equal the writes that
  completed plus the cancelled writes that landed, and no used imm may have a
  count left.

``--inject byte|imm`` breaks one thing on purpose (the target flips one landed
byte of the first round; the writer sends one write_imm the target is not told
about) to show that the check sees it: the run then reports exactly 1 wrong byte
or 1 extra imm and exits with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as _dt
import functools
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from typing import Any

import numpy as np

import aiote

SENTINEL = 0xA5
HOT_IMMS = 32
NORMAL_IMM_SPACE = 1 << 27  # imms of ordinary writes: [0, 2**27)
CANCEL_IMM_BASE = 1 << 27  # writes marked for cancellation: 2**27 + a number unique in the run
CANCEL_DELAYS = (0, 0, 1, 2, 3, 8, 32, 128)  # event-loop turns between submitting and cancelling


def loopback_host(provider: str) -> str | None:
    return None if provider == "shm" else "127.0.0.1"


def make_pattern(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


# ---------------------------------------------------------------- target process


class _Target:
    def __init__(self, eng: aiote.TransferEngine, pattern: np.ndarray, region: np.ndarray, inject: str | None,
                 timeout: float):
        self.eng = eng
        self.pattern = pattern
        self.region = region
        self.inject = inject
        self.timeout = timeout
        self.expected = np.full(region.nbytes, SENTINEL, dtype=np.uint8)
        self.used_imms: set[int] = set()
        self.rounds = 0

    async def verify_round(self, ok: np.ndarray, maybe: np.ndarray, maybe_landed: int) -> dict[str, Any]:
        """ok, maybe: int64 arrays of rows (imm, dst, src, len)."""
        eng, res = self.eng, {"lost": 0, "extra": 0, "wrong_bytes": 0, "torn_cancelled": 0, "maybe_landed": 0,
                              "notes": []}
        # 1. exactly the imm counts of the writes that completed
        counts = collections.Counter(ok[:, 0].tolist())
        self.used_imms.update(counts)
        waits = {imm: eng.imms.wait(imm, n, timeout=self.timeout) for imm, n in counts.items()}
        for imm, r in zip(waits, await asyncio.gather(*waits.values(), return_exceptions=True)):
            if isinstance(r, aiote.ImmTimeout):
                have = eng.imms.pending(imm)
                res["lost"] += counts[imm] - have
                res["notes"].append(f"imm {imm}: {have} of {counts[imm]} arrived")
                if have:
                    await eng.imms.wait(imm, have)
            elif r is not None:
                raise r
        # 2. as many of the cancelled writes' imms as completed in the writer's engine
        mimms = maybe[:, 0].tolist()
        self.used_imms.update(mimms)
        landed: set[int] = set()
        if mimms:
            enough = asyncio.get_running_loop().create_future()
            mw = {imm: eng.imms.wait(imm, 1) for imm in mimms}

            def seen(imm: int, f: asyncio.Future[None]) -> None:
                if not f.cancelled() and f.exception() is None:
                    landed.add(imm)
                    if len(landed) >= maybe_landed and not enough.done():
                        enough.set_result(None)

            for imm, f in mw.items():
                f.add_done_callback(functools.partial(seen, imm))
            if maybe_landed == 0:
                enough.set_result(None)
            try:
                await asyncio.wait_for(enough, self.timeout)
            except asyncio.TimeoutError:
                res["notes"].append(f"{len(landed)} of {maybe_landed} cancelled-but-completed writes arrived")
            for f in mw.values():
                f.cancel()  # a cancelled wait consumes nothing (if it had fired, the count is given back)
            # the waits of `landed` consumed their imm; a count left (or given back by a wait that
            # fired after enough had landed) is an extra arrival, seen below or at the end
        res["maybe_landed"] = len(landed)
        res["lost"] += max(0, maybe_landed - len(landed))
        # 3. nothing counted twice
        for imm in set(counts) | set(mimms):
            extra = eng.imms.pending(imm)
            if extra:
                res["extra"] += extra
                res["notes"].append(f"imm {imm}: {extra} more than written")
                await eng.imms.wait(imm, extra)
        # 4. the bytes: the whole region against the expected image
        region, pattern, expected = self.region, self.pattern, self.expected
        if self.inject == "byte" and self.rounds == 0:
            for _, d, _, n in ok.tolist():
                if n:
                    region[d] ^= 0xFF
                    break
        used = 0
        for _, d, s, n in ok.tolist():
            expected[d:d + n] = pattern[s:s + n]
            used = max(used, d + n)
        for imm, d, s, n in maybe.tolist():
            used = max(used, d + n)
            if not n:
                continue
            got = region[d:d + n]
            if imm in landed:
                expected[d:d + n] = pattern[s:s + n]
                whole = np.array_equal(got, pattern[s:s + n])
            else:
                whole = bool((got == SENTINEL).all())
            if not whole:
                res["torn_cancelled"] += 1
                res["notes"].append(f"cancelled write imm {imm} ({n} B at {d}): neither whole nor untouched")
        if not np.array_equal(region, expected):
            wrong = np.flatnonzero(region != expected)
            res["wrong_bytes"] = int(wrong.size)
            res["notes"].append(f"{wrong.size} wrong bytes, first at offset {int(wrong[0])}")
        # 5. reset what the round used
        region[:used + 64] = SENTINEL
        expected[:used + 64] = SENTINEL
        self.rounds += 1
        res["notes"] = res["notes"][:5]
        return res

    def leftover(self) -> int:
        return sum(self.eng.imms.pending(imm) for imm in self.used_imms)


async def _target(conn: Any, provider: str, engine_kwargs: dict[str, Any], seed: int, pattern_size: int,
                  region_size: int, inject: str | None, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    pattern = make_pattern(seed, pattern_size)
    region = np.full(region_size, SENTINEL, dtype=np.uint8)
    async with aiote.TransferEngine(provider, host=loopback_host(provider), **engine_kwargs) as eng:
        mr = eng.register(region)
        t = _Target(eng, pattern, region, inject, timeout)
        conn.send(("ready", mr.descriptor.to_bytes()))
        while True:
            msg = await loop.run_in_executor(None, conn.recv)
            if msg[0] == "round":
                conn.send(await t.verify_round(*msg[1:]))
            elif msg[0] == "finish":
                st = eng.stats()
                conn.send({"imms_received": st["imms_received"], "leftover": t.leftover(),
                           "remote_errors": st["remote_errors"]})
                return


def _target_main(*args: Any) -> None:
    asyncio.run(_target(*args))


# ---------------------------------------------------------------- writer (this process)


class Totals:
    def __init__(self) -> None:
        self.ops = self.payload_writes = self.write_imms = self.zero_writes = 0
        self.bytes_landed = 0
        self.cancel_marked = self.cancelled = self.cancel_too_late = 0
        self.cancelled_landed = self.cancelled_withdrawn = 0
        self.failed = 0
        self.lost = self.extra = self.wrong_bytes = self.torn_cancelled = 0
        self.rounds = 0
        self.notes: list[str] = []


class _Round:
    """One round's writes: ``window`` futures outstanding, the next submitted as one finishes;
    the ones marked for cancellation are cancelled at once or after some event-loop turns."""

    def __init__(self, eng: aiote.TransferEngine, src: aiote.MemoryRegion, desc: aiote.MrDescriptor,
                 lens: list[int], srcs: list[int], dsts: list[int], imms: list[int], marked: list[bool],
                 delays: list[int], use_write_imm: list[bool]):
        self.eng, self.src, self.desc = eng, src, desc
        self.L, self.S, self.D, self.IM, self.MK, self.DL, self.WI = (
            lens, srcs, dsts, imms, marked, delays, use_write_imm)
        self.n = len(lens)
        self.status = bytearray(self.n)  # 1 ok, 2 cancelled, 3 failed
        self.cancel_result: dict[int, bool] = {}  # what fut.cancel() returned
        self.errors: list[str] = []
        self.next = self.finished = 0
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()

    async def run(self, window: int) -> None:
        if not self.n:
            return
        for _ in range(min(window, self.n)):
            self.submit()
        await self.done

    def submit(self) -> None:
        i = self.next
        if i >= self.n:
            return
        self.next = i + 1
        if self.L[i] == 0 and self.WI[i]:
            fut = self.eng.write_imm(self.desc, self.IM[i])
        else:
            fut = self.eng.write(self.src, self.desc, self.L[i], self.S[i], self.D[i], imm=self.IM[i])
        fut.add_done_callback(functools.partial(self.on_done, i))
        if self.MK[i]:
            if self.DL[i]:
                self.loop.call_soon(self.cancel_later, i, fut, self.DL[i] - 1)
            else:
                self.cancel_result[i] = fut.cancel()

    def cancel_later(self, i: int, fut: asyncio.Future[None], turns: int) -> None:
        if turns:
            self.loop.call_soon(self.cancel_later, i, fut, turns - 1)
        else:
            self.cancel_result[i] = fut.cancel()

    def on_done(self, i: int, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():
            self.status[i] = 2
        elif fut.exception() is not None:
            self.status[i] = 3
            if len(self.errors) < 5:
                self.errors.append(f"write {i} ({self.L[i]} B): {fut.exception()!r}")
        else:
            self.status[i] = 1
        self.finished += 1
        self.submit()
        if self.finished == self.n and not self.done.done():
            self.done.set_result(None)


async def soak(provider: str, ops: int, *, seed: int = 1, window: int = 128, cancel_fraction: float = 0.05,
               max_size: int = 256 << 10, zero_fraction: float = 0.1, region_size: int = 64 << 20,
               pattern_size: int = 4 << 20, round_ops: int = 4096, timeout: float = 60.0,
               inject: str | None = None, engine_kwargs: dict[str, Any] | None = None,
               progress: bool = False) -> dict[str, Any]:
    """Run the soak on one provider; returns the figures (``errors`` must be 0)."""
    engine_kwargs = engine_kwargs or {}
    assert pattern_size >= max_size and region_size >= max_size + 64
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_target_main, daemon=True,
                       args=(child, provider, engine_kwargs, seed, pattern_size, region_size, inject, timeout))
    proc.start()
    child.close()
    loop = asyncio.get_running_loop()

    async def recv() -> Any:
        if not await loop.run_in_executor(None, parent.poll, timeout * 4):
            raise TimeoutError("the target process did not answer")
        return parent.recv()

    tot = Totals()
    rng = np.random.default_rng(seed + 1)
    hot = rng.integers(0, NORMAL_IMM_SPACE, HOT_IMMS)
    cancel_serial = 0
    t0 = time.perf_counter()
    try:
        kind, desc_bytes = await recv()
        assert kind == "ready"
        async with aiote.TransferEngine(provider, host=loopback_host(provider), **engine_kwargs) as eng:
            desc = aiote.MrDescriptor.from_bytes(desc_bytes)
            src = eng.register(make_pattern(seed, pattern_size))
            t0 = time.perf_counter()
            issued_total = 0
            while tot.ops < ops:
                # -- plan a round: packed, non-overlapping ranges with gaps
                n = min(round_ops, ops - tot.ops)
                zero = rng.random(n) < zero_fraction
                lens = np.floor(np.exp2(rng.uniform(0, math.log2(max_size + 1), n))).astype(np.int64)
                lens = np.where(zero, 0, np.minimum(lens, max_size))
                gaps = rng.integers(1, 65, n)
                ends = np.cumsum(lens + gaps)
                n = int(min(n, np.searchsorted(ends, region_size - 64, side="right")))
                lens, ends = lens[:n], ends[:n]
                dsts = ends - lens
                srcs = rng.integers(0, pattern_size - lens + 1)
                marked = rng.random(n) < cancel_fraction
                imms = np.where(rng.random(n) < 0.7, hot[rng.integers(0, HOT_IMMS, n)],
                                rng.integers(0, NORMAL_IMM_SPACE, n))
                nmarked = int(marked.sum())
                imms[marked] = CANCEL_IMM_BASE + (cancel_serial + np.arange(nmarked)) % NORMAL_IMM_SPACE
                cancel_serial += nmarked
                delays = rng.choice(CANCEL_DELAYS, n)
                use_write_imm = rng.random(n) < 0.75
                L, D, S, IM = lens.tolist(), dsts.tolist(), srcs.tolist(), imms.tolist()
                MK, DL, WI = marked.tolist(), delays.tolist(), use_write_imm.tolist()

                # -- run it: `window` futures outstanding, the next submitted as one finishes
                before = eng.stats()
                rd = _Round(eng, src, desc, L, S, D, IM, MK, DL, WI)
                await asyncio.wait_for(rd.run(window), timeout)
                status, cancel_result = rd.status, rd.cancel_result
                if rd.errors:
                    tot.notes.extend(rd.errors[: max(0, 10 - len(tot.notes))])
                issued_total += n
                unreported = 0
                if inject == "imm" and tot.rounds == 0:  # one imm the target is not told about
                    await eng.write_imm(desc, int(hot[0]))
                    unreported = 1
                    issued_total += 1
                # -- every op of the round finished in C too (cancelled ones give no other signal)
                deadline = loop.time() + timeout
                while True:
                    st = eng.stats()
                    if st["ops_completed"] + st["ops_failed"] >= issued_total:
                        break
                    if loop.time() > deadline:
                        raise TimeoutError(f"{issued_total - st['ops_completed'] - st['ops_failed']} operations "
                                           "never finished in the engine")
                    await asyncio.sleep(0)
                assert st["ops_submitted"] == issued_total, (st, issued_total)
                st_ok = np.frombuffer(bytes(status), dtype=np.uint8)
                ok_idx = np.flatnonzero(st_ok == 1)
                can_idx = np.flatnonzero(st_ok == 2)
                nfailed = int((st_ok == 3).sum())
                maybe_landed = st["ops_completed"] - before["ops_completed"] - ok_idx.size - unreported
                rows = np.stack([imms, dsts, srcs, lens], axis=1).astype(np.int64)
                parent.send(("round", rows[ok_idx], rows[can_idx], maybe_landed))
                res = await recv()
                # -- tally
                tot.rounds += 1
                tot.ops += n
                tot.write_imms += int(((lens == 0) & use_write_imm).sum())
                tot.zero_writes += int((lens == 0).sum())
                tot.payload_writes += int((lens > 0).sum())
                tot.cancel_marked += nmarked
                tot.cancelled += int(can_idx.size)
                tot.cancel_too_late += sum(1 for v in cancel_result.values() if not v)
                tot.cancelled_landed += res["maybe_landed"]
                tot.cancelled_withdrawn += int(can_idx.size) - res["maybe_landed"]
                landed_bytes = int(lens[ok_idx].sum())
                tot.bytes_landed += landed_bytes
                tot.failed += nfailed
                for k in ("lost", "extra", "wrong_bytes", "torn_cancelled"):
                    setattr(tot, k, getattr(tot, k) + res[k])
                tot.notes.extend(res["notes"][: max(0, 10 - len(tot.notes))])
                if progress and tot.rounds % 20 == 0:
                    el = time.perf_counter() - t0
                    print(f"  {provider}: {tot.ops:>9,} ops  {el:6.1f} s  {tot.ops / el:9,.0f} ops/s  "
                          f"errors {tot.lost + tot.extra + tot.wrong_bytes + tot.torn_cancelled + tot.failed}",
                          flush=True)
            elapsed = time.perf_counter() - t0
            wst = eng.stats()
            parent.send(("finish",))
            fin = await recv()
    finally:
        parent.close()  # the target exits on "finish", or on EOF if we stopped early
        await loop.run_in_executor(None, proc.join, timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
    expected_imms = tot.ops - tot.cancelled - tot.failed + tot.cancelled_landed
    tot.extra += fin["leftover"]
    mismatch = fin["imms_received"] - expected_imms - (1 if inject == "imm" else 0)
    out = {
        "provider": provider,
        "ops": tot.ops,
        "rounds": tot.rounds,
        "payload_writes": tot.payload_writes,
        "zero_byte_writes": tot.zero_writes,
        "write_imm_calls": tot.write_imms,
        "bytes_landed": tot.bytes_landed,
        "cancel_marked": tot.cancel_marked,
        "cancelled": tot.cancelled,
        "cancel_too_late": tot.cancel_too_late,
        "cancelled_landed": tot.cancelled_landed,
        "cancelled_withdrawn": tot.cancelled_withdrawn,
        "imms_expected": expected_imms,
        "imms_received": fin["imms_received"],
        "failed": tot.failed,
        "lost_imms": tot.lost,
        "extra_imms": tot.extra,
        "wrong_bytes": tot.wrong_bytes,
        "torn_cancelled": tot.torn_cancelled,
        "imm_total_mismatch": mismatch,
        "remote_errors": fin["remote_errors"],
        "writer_eagain": wst["eagain"],
        "seconds": round(elapsed, 2),
        "ops_per_s": round(tot.ops / elapsed),
        "notes": tot.notes,
    }
    out["errors"] = (tot.failed + tot.lost + tot.extra + tot.wrong_bytes + tot.torn_cancelled + abs(mismatch)
                     + fin["remote_errors"])
    return out


def _machine() -> dict[str, Any]:
    import hashlib
    import subprocess

    from aiote import _native

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True).stdout.strip()
    except OSError:
        rev = ""
    with open(_native.__file__, "rb") as f:
        native = hashlib.sha256(f.read()).hexdigest()[:12]
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "nproc": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "git_rev": rev, "native_sha256": native}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--provider", default="shm,tcp", help="comma-separated: shm, tcp (default both)")
    p.add_argument("--ops", type=int, default=1_000_000, help="operations per provider (default 1,000,000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--window", type=int, default=128, help="futures outstanding (default 128)")
    p.add_argument("--cancel-fraction", type=float, default=0.05, help="futures cancelled (default 0.05)")
    p.add_argument("--max-size", type=int, default=256 << 10, help="largest write in bytes (default 256 KiB)")
    p.add_argument("--zero-fraction", type=float, default=0.1, help="0-byte writes (default 0.1)")
    p.add_argument("--region", type=int, default=64 << 20, help="target region bytes (default 64 MiB)")
    p.add_argument("--round", type=int, default=4096, help="most operations per verified round (default 4096)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds any one wait may take (default 60)")
    p.add_argument("--polling", default="adaptive", help="polling mode of both engines (default adaptive)")
    p.add_argument("--inject", choices=["byte", "imm"], default=None,
                   help="break one thing on purpose, to see the check catch it")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    machine = _machine()
    results = []
    for prov in [x.strip() for x in a.provider.split(",") if x.strip()]:
        if not a.quiet:
            print(f"soak {prov}: {a.ops:,} ops, window {a.window}, cancel {a.cancel_fraction:.0%}, "
                  f"sizes 0..{a.max_size:,} B, seed {a.seed}", flush=True)
        r = asyncio.run(soak(prov, a.ops, seed=a.seed, window=a.window, cancel_fraction=a.cancel_fraction,
                             max_size=a.max_size, zero_fraction=a.zero_fraction, region_size=a.region,
                             round_ops=a.round, timeout=a.timeout, inject=a.inject,
                             engine_kwargs={"polling": a.polling}, progress=not a.quiet))
        results.append(r)
        if not a.quiet:
            for k, v in r.items():
                if k != "notes":
                    print(f"  {k:<22} {v:,}" if isinstance(v, int) else f"  {k:<22} {v}")
            for note in r["notes"]:
                print(f"  note: {note}")
    doc = {"machine": machine, "args": vars(a), "results": results}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
