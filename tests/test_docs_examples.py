"""Every Python example in the README and docs runs (in a fresh interpreter)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks():
    for doc in DOCS:
        for i, m in enumerate(re.finditer(r"```python\n(.*?)```", doc.read_text(), re.S)):
            code = m.group(1)
            if "asyncio.run(" in code or "__main__" in code:  # complete programs only
                yield pytest.param(code, id=f"{doc.name}-{i}")


@pytest.mark.parametrize("code", list(blocks()))
def test_example_runs(code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("provider", ["shm", "tcp"])
def test_hello_write_imm(provider):
    r = subprocess.run([sys.executable, "examples/hello_write_imm.py", "--provider", provider], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
