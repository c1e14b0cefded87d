"""The peers benchmark driver's pure-Python parts (no peers installed, no processes)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest

PEERS = Path(__file__).resolve().parent.parent / "benchmarks" / "peers"


@pytest.fixture(scope="module")
def rp() -> Any:
    sys.path.insert(0, str(PEERS))
    try:
        yield importlib.import_module("run_peers")
    finally:
        sys.path.remove(str(PEERS))


def _res(system: str, mode: str, size: int, ops_per_s: float, lat_us: float | None = None) -> dict[str, Any]:
    return {"system": system, "mode": mode, "size": size, "ops_per_s": ops_per_s,
            "gbps": size * ops_per_s / 1e9, "lat_us_p50": lat_us}


def _data(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {"sizes": [64, 1 << 20], "runs": runs, "config": {"runs": 3}}


def _run(system: str, rates: dict[int, float], lat: float, error: str | None = None) -> dict[str, Any]:
    res = []
    for size, r in rates.items():
        res += [_res(system, "pipe", size, r), _res(system, "one", size, r / 10, lat)]
    return {"results": res, "error": error, "ready": {}, "load": [0.1]}


def test_json_lines_skips_log_noise(rp: Any) -> None:
    text = "2026 NIXL INFO  Backend UCX\n{\"ready\": true, \"ctl_port\": 5}\n{broken\n  {\"a\": 1}\n"
    assert rp.json_lines(text) == [{"ready": True, "ctl_port": 5}, {"a": 1}]


def test_error_line_keeps_ucx_error_and_last_line(rp: Any) -> None:
    err = ("Traceback (most recent call last):\n  File x\n"
           "[1.2] [vm:1:0] select.c:722 UCX  ERROR   no active messages transport\n"
           "nixlBackendError: NIXL_ERR_BACKEND\n")
    line = rp.error_line(err)
    assert "UCX  ERROR   no active messages transport" in line
    assert line.endswith("nixlBackendError: NIXL_ERR_BACKEND")
    assert rp.error_line("") == "(no output)"


def test_summary_ratio_and_tables(rp: Any) -> None:
    mb = 1 << 20
    data = _data({
        "aiote-tcp": [_run("aiote", {64: 50e3, mb: 3e3}, 40.0) for _ in range(3)],
        "mooncake-tcp": [_run("mooncake", {64: 10e3, mb: 4e3}, 50.0) for _ in range(3)],
        "nixl-tcp": [_run("nixl", {64: 20e3, mb: 1e3}, 80.0), _run("nixl", {}, 0, error="boom")],
    })
    summ = rp.summarize(data)
    assert summ["aiote-tcp"]["pipe"][64]["ops"]["median"] == 50e3
    cfgs = rp.configs()
    r, who = rp.ratio_vs_best_peer(summ, cfgs, "tcp", "pipe", 64, "ops")
    assert r == pytest.approx(2.5) and who == "NIXL/UCX tcp"
    r, who = rp.ratio_vs_best_peer(summ, cfgs, "tcp", "pipe", mb, "gbps")
    assert r == pytest.approx(0.75) and who == "Mooncake TE tcp"
    # latency: best peer / aiote, so > 1 means aiote is faster
    r, _ = rp.ratio_vs_best_peer(summ, cfgs, "tcp", "one", 64, "lat")
    assert r == pytest.approx(50.0 / 40.0)
    assert rp.fmt_ratio(0.75, "x") == "**0.75** ✗ (x)" and rp.fmt_ratio(None, "") == "—"
    md = rp.tables(data)
    assert "| 64 B | 50.00 k | 10.00 k | 20.00 k | **2.50** ✓ (NIXL/UCX tcp) |" in md
    assert "shm" not in md.split("**TCP")[0]  # no shm table without shm configs
    checks = "\n".join(rp.target_check(data))
    assert "missed** at 1 MiB (0.75× Mooncake TE tcp)" in checks
    assert "aiote tcp / Mooncake TE tcp: **5.00×** (met" in checks
    assert "aiote tcp / NIXL/UCX tcp: **2.50×** (missed" in checks
    assert any("NIXL/UCX tcp** failed in 1 of 2 runs: `boom`" in f for f in rp.failures(data))


def test_best_aiote_row_verdict(rp: Any) -> None:
    """A missed size is checked again with aiote's best row (another polling discipline)."""
    mb = 1 << 20
    data = _data({
        "aiote-tcp": [_run("aiote", {64: 50e3, mb: 3e3}, 40.0)],
        "aiote-tcp-busy": [_run("aiote", {64: 40e3, mb: 5e3}, 30.0)],
        "nixl-tcp": [_run("nixl", {64: 20e3, mb: 4e3}, 80.0)],
    })
    checks = "\n".join(rp.target_check(data))
    assert "tcp, pipelined GB/s, aiote ≥ best peer at every size: **missed** at 1 MiB (0.75× NIXL/UCX tcp)" in checks
    assert "best row at each size (`aiote-tcp`, `aiote-tcp-busy`): **met**" in checks
    data["runs"]["aiote-tcp-busy"] = [_run("aiote", {64: 40e3, mb: 2e3}, 30.0)]
    checks = "\n".join(rp.target_check(data))
    assert "(`aiote-tcp`, `aiote-tcp-busy`): **missed** at 1 MiB (0.75× NIXL/UCX tcp)" in checks


def test_cell_formats(rp: Any) -> None:
    s = {"median": 12.345, "min": 11.0, "max": 13.0, "values": [11.0, 12.345, 13.0]}
    assert rp.cell(s, "gbps") == "12.35 (11.00–13.00)"
    assert rp.cell({"median": 1500.0, "min": 1500.0, "max": 1500.0, "values": [1500.0]}, "lat") == "1,500"
    assert rp.cell(None, "ops") == "—"


def test_doc_block_replaced_between_markers(rp: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = tmp_path / "b.md"
    doc.write_text(f"# x\n\n{rp.SECTION}\n\nintro\n\n{rp.BEGIN}\nold\n{rp.END}\n\nnotes kept\n")
    monkeypatch.setattr(rp, "DOC", doc)
    monkeypatch.setattr(rp, "generated", lambda data: f"{rp.BEGIN}\nnew\n{rp.END}")
    rp.write_doc({})
    text = doc.read_text()
    assert "new" in text and "old" not in text and "intro" in text and "notes kept" in text


def test_plan_is_deterministic_and_bounded() -> None:
    sys.path.insert(0, str(PEERS))
    try:
        k = importlib.import_module("_ctl")
    finally:
        sys.path.remove(str(PEERS))
    for size in (64, 4096, 1 << 16, 1 << 20, 16 << 20, 64 << 20):
        assert k.pipe_ops(size) % k.INFLIGHT == 0 and k.pipe_ops(size) >= k.INFLIGHT
        assert 4 <= k.one_ops(size) <= k.ONE_MAX
        assert k.pattern(size, "pipe") != k.pattern(size, "one")
        assert 1 <= k.pattern(size, "one") <= 251
