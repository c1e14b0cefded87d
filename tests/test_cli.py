"""The `aiote` command: info, bench (local and through a TCPStore), demo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from aiote import cli

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--sizes", "64K,1M", "--duration", "0.05", "--lat-sizes", "0,4K", "--lat-iters", "30", "--window", "8"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aiote.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, COLUMNS="160"))


def test_parse_and_format_sizes():
    assert [cli.parse_size(s) for s in ("0", "64", "4K", "4KiB", "1m", "2G")] == [0, 64, 4096, 4096, 1 << 20, 2 << 30]
    with pytest.raises(Exception, match="not a size"):
        cli.parse_size("4 parsecs")
    assert cli.format_size(4096) == "4 KiB" and cli.format_size(1 << 20) == "1 MiB" and cli.format_size(100) == "100 B"
    assert cli.mr_mode_names(16 | 4 | 64) == ["LOCAL", "VIRT_ADDR", "PROV_KEY"]


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "aiote"
    if not exe.exists():
        pytest.skip("aiote is not pip-installed in this environment (no console script)")
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("aiote "), r.stdout + r.stderr


def test_info_json_lists_providers_and_what_an_engine_gets():
    r = run("info", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    provs = {n["provider"] for n in data["nics"]}
    assert {"shm", "tcp;ofi_rxm"} <= provs
    shm = next(n for n in data["nics"] if n["provider"] == "shm")
    assert shm["rma"] and shm["cq_data_size"] >= 4 and shm["supports_write_imm"]
    engines = {e["provider"]: e for e in data["engines"]}
    assert {"shm", "tcp;ofi_rxm"} <= set(engines)
    assert all("error" not in e and e["cq_data_size"] >= 4 and "delivery_complete" in e for e in engines.values())
    assert "gpus" in data["topology"]


def test_info_tables(capsys):
    assert cli.main(["info", "--provider", "shm"]) == 0
    out = capsys.readouterr().out
    assert "NICs (libfabric" in out and "shm" in out and "What an engine gets" in out
    assert "GPU" in out  # the GPU ↔ NIC section (here: no GPU)
    assert cli.main(["info", "--provider", "no-such-provider", "--no-engines"]) == 0
    assert "no provider matching 'no-such-provider'" in capsys.readouterr().out


@pytest.mark.parametrize("provider", ["shm", "tcp"])
def test_bench_local(tmp_path, provider):
    want_plot = cli._need_matplotlib() is not None
    args = ["bench", "--provider", provider, *QUICK, "--json", str(tmp_path / "r.json")]
    if want_plot:
        args += ["--plot", str(tmp_path / "r.png")]
    r = run(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "write throughput" in r.stdout and "ping-pong latency" in r.stdout
    res = json.loads((tmp_path / "r.json").read_text())
    assert [t["size"] for t in res["throughput"]] == [64 << 10, 1 << 20]
    assert all(t["ops"] > 0 and t["gbps"] > 0 for t in res["throughput"])
    assert [x["size"] for x in res["latency"]] == [0, 4096]
    assert all(0 < x["rtt_min_us"] <= x["rtt_p50_us"] <= x["rtt_p99_us"] for x in res["latency"])
    if want_plot:
        assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_plot_without_matplotlib_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["bench", "--plot", "x.png"]) == 2
    assert "pip install 'aiote[bench]'" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bench_two_ranks_through_a_tcpstore(tmp_path):
    pytest.importorskip("torch.distributed")
    store = f"127.0.0.1:{_free_port()}"
    common = ["bench", "--provider", "tcp", "--host", "127.0.0.1", "--store", store, *QUICK]
    env = dict(os.environ, COLUMNS="160")
    procs = [subprocess.Popen([sys.executable, "-m", "aiote.cli", *common, "--rank", str(r),
                               "--json", str(tmp_path / f"r{r}.json")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            outs.append(p.communicate()[0])
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(outs)
    res = json.loads((tmp_path / "r0.json").read_text())
    assert res["provider"] == "tcp;ofi_rxm" and len(res["throughput"]) == 2 and len(res["latency"]) == 2
    assert not (tmp_path / "r1.json").exists()  # rank 1 serves; rank 0 reports
    assert "rank 1: done" in outs[1]


def test_bench_rejects_bad_arguments():
    r = run("bench", "--window", "0")
    assert r.returncode == 2 and "must be positive" in r.stderr
    r = run("bench", "--sizes", "big")
    assert r.returncode == 2 and "not a size" in r.stderr


def test_demo_passes_options_to_the_demo():
    r = run("demo", "--help")
    assert r.returncode == 0, r.stderr
    assert "python -m examples.kvcache" in r.stdout and "--provider" in r.stdout
    assert "aiote demo" in r.stderr


def test_demo_outside_a_checkout_says_where_it_is(monkeypatch, capsys):
    monkeypatch.setattr(cli, "find_examples", lambda explicit=None: None)
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "scripts/demo.sh" in err and "--examples-dir" in err


def test_find_examples(tmp_path, monkeypatch):
    monkeypatch.delenv("AIOTE_EXAMPLES", raising=False)
    assert cli.find_examples() == ROOT  # this checkout
    (tmp_path / "examples" / "kvcache").mkdir(parents=True)
    (tmp_path / "examples" / "kvcache" / "__main__.py").write_text("")
    assert cli.find_examples(str(tmp_path)) == tmp_path.resolve()


def test_info_without_discovery_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "aiote.topology", None)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "NIC discovery (aiote.nics / aiote.topology) is not available" in out
    assert "What an engine gets" in out and "shm" in out  # engines still probed: shm and tcp


def test_demo_without_torch_says_what_to_install(monkeypatch, capsys):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert cli.main(["demo"]) == 2
    assert "pip install 'aiote[demo]'" in capsys.readouterr().err
