"""Shared pieces of the aiote benchmarks: the raw C baseline, the target
process, statistics, machine facts, JSON results and table helpers.

Not a library module: imported by the bench_*.py scripts next to it.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import itertools
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RAW_DIR = HERE / "raw"
FI_BENCH = RAW_DIR / "fi_bench"
FI_KBENCH = RAW_DIR / "fi_kbench"
# AIOTE_BENCH_RESULTS: write results elsewhere (e.g. a device machine's $OUT)
RESULTS_DIR = Path(os.environ["AIOTE_BENCH_RESULTS"]) if os.environ.get("AIOTE_BENCH_RESULTS") else HERE / "results"
IMG_DIR = ROOT / "docs" / "img"
# numpy's OpenBLAS pool spins ~100 ms of CPU after import, beside the engines under test
# (docs/benchmarks.md, "OpenBLAS threads and the 64 B tcp point"); no benchmark does BLAS
# work.  Set before any numpy import here, inherited by the target processes.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# aiote provider name -> libfabric provider string that fi_bench takes
PROVIDERS = {"shm": "shm", "tcp": "tcp;ofi_rxm"}

# extra TransferEngine keyword arguments for both sides (e.g. {"spin_us": 500}), set from the command line
ENGINE_KW: dict[str, Any] = {}


def loopback_host(provider: str) -> str | None:
    return None if provider == "shm" else "127.0.0.1"


# ---------------------------------------------------------------- sizes


def parse_size(s: str) -> int:
    s = s.strip()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    if s and s[-1].lower() in mult:
        return int(s[:-1]) * mult[s[-1].lower()]
    if s.lower().endswith("ib") and s[-3].lower() in mult:
        return int(s[:-3]) * mult[s[-3].lower()]
    return int(s)


def fmt_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= f:
            return f"{x / f:.2f} {unit}"
    return f"{x:.0f}"


# ---------------------------------------------------------------- raw C baseline


def ensure_fi_bench(rebuild: bool = False) -> Path:
    """Build benchmarks/raw/fi_bench and fi_kbench if missing or older than their sources."""
    stale = any(
        not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime
        for exe, src in ((FI_BENCH, RAW_DIR / "fi_bench.c"), (FI_KBENCH, RAW_DIR / "fi_kbench.c"))
    )
    if rebuild or stale:
        subprocess.run(["sh", str(RAW_DIR / "build.sh")], check=True)
    return FI_BENCH


def fi_bench(
    provider: str, mode: str, size: int, iters: int, inflight: int = 32, dc: int = 0, timeout: int = 60
) -> dict[str, Any]:
    """Run the raw C baseline once; returns its JSON line as a dict."""
    env = dict(os.environ, FI_BENCH_TIMEOUT=str(timeout))
    cmd = [
        str(FI_BENCH),
        PROVIDERS.get(provider, provider),
        mode,
        str(size),
        str(iters),
        str(inflight),
        str(dc),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout + 30)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {p.returncode}): {p.stderr.strip()[-500:]}")
    return json.loads(lines[-1])


def fi_kbench(
    provider: str, k: int, size: int, iters: int, inflight: int = 32, dc: int = 1, threads: int = 0, timeout: int = 60
) -> dict[str, Any]:
    """Run the raw k-NIC baseline (fi_kbench) once; returns its JSON line as a dict."""
    env = dict(os.environ, FI_BENCH_TIMEOUT=str(timeout))
    cmd = [
        str(FI_KBENCH),
        PROVIDERS.get(provider, provider),
        str(k),
        str(size),
        str(iters),
        str(inflight),
        str(dc),
        str(threads),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout + 30)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {p.returncode}): {p.stderr.strip()[-500:]}")
    return json.loads(lines[-1])


def raw_command(provider: str, mode: str, size: int, iters: int, inflight: int, dc: int) -> str:
    return f"benchmarks/raw/fi_bench '{PROVIDERS.get(provider, provider)}' {mode} {size} {iters} {inflight} {dc}"


# ---------------------------------------------------------------- statistics


def summary(values: list[float]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "values": values}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": values}


def percentile(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile, the same rule fi_bench uses."""
    n = len(sorted_vals)
    idx = min(max(int(p * n + 0.999999) - 1, 0), n - 1)
    return sorted_vals[idx]


def paired_ratios(num: list[float], den: list[float]) -> dict[str, Any]:
    """Ratios of interleaved pairs (run i of each), summarised."""
    r = [a / b for a, b in zip(num, den, strict=False) if a is not None and b]
    return summary(r)


def fmt_med(s: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    if s["median"] is None:
        return "-"
    if len(s["values"]) == 1:
        return f"{s['median'] * scale:.{digits}f}"
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f})"


def fmt_k(s: dict[str, Any]) -> str:
    """A rate summary in thousands: '858k (406–864)'."""
    if s["median"] is None:
        return "-"
    if len(s["values"]) == 1:
        return f"{s['median'] / 1e3:.0f}k"
    return f"{s['median'] / 1e3:.0f}k ({s['min'] / 1e3:.0f}–{s['max'] / 1e3:.0f})"


def best_ratio(num: dict[str, Any], den: dict[str, Any]) -> float | None:
    """max/max of two rate summaries: noise only slows a run down, so the best runs
    are the least disturbed estimate of what each side can do."""
    if not num["max"] or not den["max"]:
        return None
    return num["max"] / den["max"]


def disturbed(*sums: dict[str, Any], limit: float = 2.0) -> bool:
    """True when any summary's max/min exceeds ``limit`` (a slow period hit some run)."""
    return any(len(s["values"]) > 1 and spread(s) > limit for s in sums)


def spread(s: dict[str, Any]) -> float:
    """max/min of a summary: > 1.5 hints at a disturbed measurement."""
    if not s["min"]:
        return float("inf")
    return s["max"] / s["min"]


# ---------------------------------------------------------------- CPU time per thread

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_cpu() -> dict[int, tuple[str, float, float]]:
    """This process's threads: tid -> (name, user s, system s), from /proc/self/task."""
    out: dict[int, tuple[str, float, float]] = {}
    for d in Path("/proc/self/task").iterdir():
        try:
            st = (d / "stat").read_text()
        except OSError:
            continue
        name = st[st.index("(") + 1 : st.rindex(")")]
        f = st[st.rindex(")") + 2 :].split()
        out[int(d.name)] = (name, int(f[11]) / _TICK, int(f[12]) / _TICK)
    return out


def cpu_delta(
    before: dict[int, tuple[str, float, float]],
    after: dict[int, tuple[str, float, float]],
    seconds: float,
    only: set[int] | None = None,
) -> dict[str, Any]:
    """Per-thread busy share of ``seconds`` (user+system) and the system part, busiest first.

    ``only``: the tids to report (e.g. the threads an engine started).  Clock-tick
    resolution (10 ms): meaningful for windows of ~0.3 s and more."""
    rows = []
    for tid, (name, u1, s1) in after.items():
        if only is not None and tid not in only:
            continue
        _, u0, s0 = before.get(tid, (name, 0.0, 0.0))
        rows.append({"tid": tid, "name": name, "busy": (u1 - u0 + s1 - s0) / seconds, "sys": (s1 - s0) / seconds})
    rows.sort(key=lambda r: -r["busy"])
    return {"threads": rows, "seconds": seconds}


# ---------------------------------------------------------------- machine facts


def _sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"({e})"


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    import aiote

    fi_ver = _sh("pkg-config --modversion libfabric") if shutil.which("pkg-config") else ""
    if shutil.which("fi_info"):
        fi_ver += " / " + " ".join(_sh("fi_info --version").split())
    if not fi_ver.strip(" /"):
        fi_ver = _fi_version_ctypes()
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": _sh("nproc"),
        "lscpu": _sh("lscpu | head -n 15"),
        "kernel": platform.release(),
        "libfabric": fi_ver,
        "python": sys.version.split()[0],
        "aiote": getattr(aiote, "__version__", "?"),
        "git": _sh(f"git -C {ROOT} rev-parse --short HEAD")
        + (" (dirty)" if _sh(f"git -C {ROOT} status --porcelain -- aiote native") else ""),
        "native_so_sha256": _native_hash(),
        "aiote_path": str(Path(aiote.__file__).resolve().parent),
        # set by whoever runs a build other than this checkout's (e.g. an export of one commit)
        "aiote_rev": os.environ.get("AIOTE_BENCH_REV", ""),
        "loadavg_start": loadavg(),
    }


def _fi_version_ctypes() -> str:
    """libfabric's runtime version via fi_version(), where no tools are installed."""
    import ctypes

    try:
        v = ctypes.CDLL("libfabric.so.1").fi_version()
        return f"{v >> 16}.{v & 0xFFFF} (fi_version)"
    except OSError:
        return "?"


def _native_hash() -> str:
    """Which build of the native part ran (the tree may be edited while benchmarks run)."""
    import hashlib

    import aiote._native as n

    try:
        return hashlib.sha256(Path(n.__file__).read_bytes()).hexdigest()[:16]
    except OSError:
        return "?"


# ---------------------------------------------------------------- results


def rel(path: Path) -> str:
    """A path relative to the repository root where it lies inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = dict(data)
    data.setdefault("machine", {})["loadavg_end"] = loadavg()
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    text = json.dumps(data, indent=2, default=str)
    path.write_text(text)
    (RESULTS_DIR / f"{name}-latest.json").write_text(text)
    return path


# ---------------------------------------------------------------- target process
#
# A spawned child that owns the target side: it opens an aiote engine on
# request (so no engine of ours spins while the raw baseline runs), registers
# a region, hands back its descriptor, counts imms, and can answer a
# ping-pong.  Calls go over a multiprocessing pipe, served on both sides by
# the asyncio loop (add_reader), so neither loop blocks.


async def _target(conn: Any) -> None:
    import aiote

    loop = asyncio.get_running_loop()
    st: dict[str, Any] = {"eng": None, "mr": None, "buf": None}
    done = asyncio.Event()

    async def close_engine() -> None:
        eng, st["eng"] = st["eng"], None
        if st["mr"] is not None and not st["mr"].closed:
            try:
                st["mr"].close()
            except Exception:  # noqa: BLE001 - the engine close deregisters anyway
                pass
        st["mr"] = st["buf"] = None
        if eng is not None:
            await eng.close()

    async def handle(cmd: str, args: tuple) -> Any:
        if cmd == "open":
            provider, polling, dc, region, *rest = args
            kw = rest[0] if rest else {}
            await close_engine()
            eng = aiote.TransferEngine(
                provider, host=loopback_host(provider), polling=polling, delivery_complete=dc, **kw
            )
            tids = set(thread_cpu())
            eng.open()
            st["engine_tids"] = set(thread_cpu()) - tids  # the worker thread(s)
            buf = bytearray(b"\0") * region  # touches every page, like fi_bench's memset
            st.update(eng=eng, buf=buf, mr=eng.register(buf))
            return st["mr"].descriptor.to_bytes()
        if cmd == "wait":
            imm, count, timeout = args
            await st["eng"].imms.wait(imm, count, timeout=timeout)
            return True
        if cmd == "check":  # every byte in [off, off+n) equals value?
            off, n, value = args
            return st["buf"][off : off + n] == bytes([value]) * n
        if cmd == "pong":
            # answer each `ping` imm with a write carrying `pong`, `total` times
            desc, size, total, ping, pong = args
            eng, mr = st["eng"], st["mr"]
            d = aiote.MrDescriptor.from_bytes(desc)
            futs = []
            for _ in range(total):
                await eng.imms.wait(ping, 1, timeout=60)
                futs.append(eng.write(mr, d, size, 0, 0, imm=pong))
            await asyncio.gather(*futs)
            return True
        if cmd == "stats":
            return st["eng"].stats()
        if cmd == "nic_stats":
            return st["eng"].nic_stats()
        if cmd == "cpu":  # (snapshot of this process's threads, tids of the engine's threads)
            return thread_cpu(), st.get("engine_tids", set())
        if cmd == "close":
            await close_engine()
            return True
        if cmd == "exit":
            await close_engine()
            done.set()
            return True
        raise ValueError(f"unknown command {cmd!r}")

    async def serve(cid: int, cmd: str, args: tuple) -> None:
        try:
            res = (cid, "ok", await handle(cmd, args))
        except BaseException as e:  # noqa: BLE001 - report everything to the parent
            res = (cid, "err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        try:
            conn.send(res)
        except OSError:
            done.set()

    def readable() -> None:
        try:
            cid, cmd, args = conn.recv()
        except (EOFError, OSError):
            done.set()
            return
        loop.create_task(serve(cid, cmd, args))

    loop.add_reader(conn.fileno(), readable)
    conn.send((0, "ok", os.getpid()))
    await done.wait()
    loop.remove_reader(conn.fileno())


def _target_main(conn: Any) -> None:
    asyncio.run(_target(conn))


class Target:
    """The target process; ``await t.call("open", provider, polling, dc, region)`` etc."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self.proc: Any = None

    async def start(self) -> Target:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_target_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self._loop = asyncio.get_running_loop()
        self._calls[0] = self._loop.create_future()
        self._loop.add_reader(self._conn.fileno(), self._readable)
        await asyncio.wait_for(self._calls[0], 60)
        return self

    def _readable(self) -> None:
        try:
            cid, status, value = self._conn.recv()
        except (EOFError, OSError):
            self._loop.remove_reader(self._conn.fileno())
            for f in self._calls.values():
                if not f.done():
                    f.set_exception(RuntimeError("target process exited"))
            self._calls.clear()
            return
        f = self._calls.pop(cid, None)
        if f is None or f.done():
            return
        if status == "ok":
            f.set_result(value)
        else:
            f.set_exception(RuntimeError(f"target: {value}"))

    def call(self, cmd: str, *args: Any) -> asyncio.Future[Any]:
        cid = next(self._ids)
        f = self._loop.create_future()
        self._calls[cid] = f
        self._conn.send((cid, cmd, args))
        return f

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.is_alive():
            try:
                await asyncio.wait_for(self.call("exit"), 20)
            except Exception:  # noqa: BLE001
                pass
            await self._loop.run_in_executor(None, self.proc.join, 10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        try:
            self._loop.remove_reader(self._conn.fileno())
        except (ValueError, OSError):
            pass
        self._conn.close()
        self.proc = None

    async def __aenter__(self) -> Target:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# ---------------------------------------------------------------- output


def console() -> Any:
    from rich.console import Console

    return Console(width=max(shutil.get_terminal_size((200, 40)).columns, 200))


def header(con: Any, title: str, info: dict[str, Any]) -> None:
    con.rule(title)
    con.print(
        f"{info['date']}  nproc={info['nproc']}  kernel={info['kernel']}  libfabric={info['libfabric']}  "
        f"aiote={info['aiote']} ({info.get('aiote_rev') or info['git']}, {info.get('aiote_path', '')})  "
        f"load={info['loadavg_start']}"
    )
    if info["nproc"] and int(info["nproc"] or 0) <= 2:
        con.print(
            "[yellow]note: 2 cores; busy-polling processes share them with anything else running "
            "(other engineers' tests): medians of interleaved runs, check min–max spreads.[/]"
        )
