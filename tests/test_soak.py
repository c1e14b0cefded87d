"""The soak (benchmarks/soak.py) in small: two processes, random sizes, imms and cancellations;
zero bytes wrong, zero imms lost or counted twice, every cancelled write whole or absent.

The default run does 20,000 operations per provider (a few seconds); ``-m slow`` adds a
200,000-operation run per provider.  The full 1,000,000-operation figures are in
docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "benchmarks" / "soak.py"


def run_soak(tmp_path: Path, provider: str, ops: int, *extra: str, direct: bool = True) -> tuple[int, dict[str, Any]]:
    out = tmp_path / f"soak-{int(direct)}.json"
    env = {**os.environ, "AIOTE_DIRECT_SHM": "1" if direct else "0"}
    r = subprocess.run([sys.executable, str(SOAK), "--provider", provider, "--ops", str(ops), "--quiet",
                        "--json", str(out), *extra], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert out.exists(), r.stdout + r.stderr
    (res,) = json.loads(out.read_text())["results"]
    return r.returncode, res


def assert_clean(rc: int, res: dict[str, Any], ops: int, cancels: bool = True) -> None:
    assert res["ops"] == ops
    assert res["payload_writes"] + res["zero_byte_writes"] == ops
    for k in ("errors", "failed", "lost_imms", "extra_imms", "wrong_bytes", "torn_cancelled", "imm_total_mismatch",
              "remote_errors"):
        assert res[k] == 0, (k, res)
    assert res["imms_received"] == res["imms_expected"] == ops - res["cancelled"] + res["cancelled_landed"]
    assert res["cancel_marked"] == res["cancelled"] + res["cancel_too_late"]
    assert res["cancelled"] == res["cancelled_landed"] + res["cancelled_withdrawn"]
    if cancels:  # cancellations did happen (the direct path finishes writes in the call: nothing to cancel)
        assert res["cancelled"] > 0
    assert rc == 0


def slow_selected(config: pytest.Config) -> bool:
    """Full-count tests run only when asked for (``-m slow``): CI runs every marker."""
    return "slow" in (config.getoption("markexpr") or "")


def test_soak(aiote_provider: str, tmp_path: Path) -> None:
    rc, res = run_soak(tmp_path, aiote_provider, 20_000)
    assert_clean(rc, res, 20_000, cancels=aiote_provider != "shm")
    if aiote_provider == "shm":  # and through libfabric, where writes queue and cancellations bite
        rc, res = run_soak(tmp_path, aiote_provider, 20_000, direct=False)
        assert_clean(rc, res, 20_000)


@pytest.mark.slow
def test_soak_long(aiote_provider: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if not slow_selected(request.config):
        pytest.skip("200,000 operations: run with -m slow")
    rc, res = run_soak(tmp_path, aiote_provider, 200_000, "--seed", "7")
    assert_clean(rc, res, 200_000, cancels=aiote_provider != "shm")


@pytest.mark.aiote_providers("shm")
@pytest.mark.parametrize("fault", ["byte", "imm"])
def test_soak_sees_an_injected_fault(aiote_provider: str, fault: str, tmp_path: Path) -> None:
    """The checks are not vacuous: one flipped byte, one imm nobody wrote, are each reported once."""
    rc, res = run_soak(tmp_path, aiote_provider, 3_000, "--inject", fault)
    assert rc == 1
    assert res["errors"] == 1
    assert (res["wrong_bytes"], res["extra_imms"]) == ((1, 0) if fault == "byte" else (0, 1))
    assert res["lost_imms"] == res["torn_cancelled"] == res["failed"] == res["imm_total_mismatch"] == 0
