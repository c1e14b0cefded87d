"""The documentation site builds with `mkdocs build --strict` (needs the docs extra: pip install -e '.[docs]')."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

for _mod in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "material"):
    pytest.importorskip(_mod, reason=f"{_mod} is not installed (pip install -e '.[docs]')")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_builds_strict(site: Path):
    for page in ("index", "tutorial/index", "concepts/index", "rendezvous/index", "testing/index", "cli/index",
                 "deploying/index", "guide-kvcache/index", "guide-rl-weights/index", "guide-moe/index", "api/index"):
        assert (site / f"{page}.html").is_file(), page


def test_api_reference_comes_from_the_docstrings(site: Path):
    api = (site / "api" / "index.html").read_text()
    for name in ("TransferEngine", "write_paged", "ImmCounter", "MrDescriptor", "exchange_descriptors",
                 "aiote_engine_pair", "PeerProcess", "OutOfBounds"):
        assert name in api, name


def test_links_out_of_docs_become_repository_paths():
    """docs/ pages link to repository files (fine on a code host); the site shows those as paths
    and leaves every other link to mkdocs' own checks."""
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = SimpleNamespace(file=SimpleNamespace(src_uri="concepts.md"))
    md = ("See [the demo](../examples/kvcache/), [`native/build.py`](../native/build.py), "
          "[concepts](concepts.md#failures), [gone](../no/such/file.md), [web](https://example.org/x.md) "
          "and ![img](img/x.png).\n```\n[kept](../native/build.py)\n```")
    out = hooks.on_page_markdown(md, page, {"docs_dir": str(ROOT / "docs")}, None)
    assert "the demo (`examples/kvcache/` in the repository)" in out
    assert "`native/build.py`," in out
    for kept in ("[concepts](concepts.md#failures)", "[gone](../no/such/file.md)", "[web](https://example.org/x.md)",
                 "![img](img/x.png)", "[kept](../native/build.py)"):
        assert kept in out, kept
