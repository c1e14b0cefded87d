"""aiote's pytest plugin (aiote.testing.plugin) as a user's suite sees it: pytester runs small suites
in a fresh pytest process, in pytest-asyncio's strict mode (the default a user has)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aiote.testing import EnginePair, Faults, PeerProcess, RemoteError, loopback_host  # noqa: F401 - public names

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("pytest_asyncio")


def _plugin_args(pytester: pytest.Pytester) -> list[str]:
    """The plugin comes by its entry point once aiote is installed; a bare tree loads it by name."""
    args = ["-p", "no:cacheprovider"]
    if not pytester._request.config.pluginmanager.has_plugin("aiote"):
        args += ["-p", "aiote.testing.plugin"]
    return args


USER_SUITE = '''
import asyncio
import pytest
import aiote

pytestmark = pytest.mark.asyncio


async def test_pair(aiote_engine_pair, aiote_provider):
    a, b = aiote_engine_pair
    assert aiote_engine_pair.b is b and a.provider.startswith(aiote_provider)
    dst = b.register(bytearray(64))
    src = a.register(bytearray(b"z" * 64))
    landed = b.imms.wait(3, 1, timeout=10)
    await a.write(src, dst.descriptor, imm=3)
    await landed
    assert dst.obj == src.obj


async def test_peer_writes_to_us(aiote_engine, aiote_peer):
    mr = aiote_engine.register(bytearray(16))
    rid, _ = await aiote_peer.call("register", 16, 0x61)
    await aiote_peer.call("write", rid, mr.descriptor.to_bytes(), 16, 0, 0, 9)
    await aiote_engine.imms.wait(9, 1, timeout=10)
    assert mr.obj == bytearray(b"a" * 16)


@pytest.mark.aiote_providers("tcp")
async def test_killed_peer(aiote_make_engine, aiote_peer, aiote_faults):
    eng = await aiote_make_engine(peer_timeout=2)
    _, desc = await aiote_peer.call("register", 1 << 16, 0)
    d = aiote.MrDescriptor.from_bytes(desc)
    src = eng.register(bytearray(1 << 16))
    await eng.write(src, d)
    aiote_faults.kill(aiote_peer)
    assert not aiote_peer.alive
    with pytest.raises(aiote.ProviderError):
        for _ in range(100):  # until the provider notices the peer is gone
            await asyncio.wait_for(eng.write(src, d), 30)


@pytest.mark.parametrize("aiote_provider", ["shm"])
async def test_failed_nic(aiote_make_engine, aiote_make_peer, aiote_faults, aiote_provider):
    a = await aiote_make_engine(nics=2)
    peer = await aiote_make_peer(nics=2)
    await aiote_faults.fail_nic(a, 1)
    await aiote_faults.fail_nic(peer, 0)
    assert a.nic_stats()[1]["failed"] == 1
    assert (await peer.call("nic_stats"))[0]["failed"] == 1
    aiote_faults.pause(peer)  # left paused: the fixtures resume and stop it
'''


def test_user_suite_in_strict_mode(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_user=USER_SUITE)
    r = pytester.runpytest_subprocess(*_plugin_args(pytester), "-v", timeout=240)
    r.assert_outcomes(passed=6)
    out = r.stdout.str()
    for test_id in ("test_pair[shm]", "test_pair[tcp]", "test_peer_writes_to_us[shm]", "test_peer_writes_to_us[tcp]",
                    "test_killed_peer[tcp]", "test_failed_nic[shm]"):
        assert test_id in out, out


def test_choosing_providers(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
                     "aiote_providers = tcp\n")
    pytester.makeconftest('''
import pytest

@pytest.fixture
def aiote_engine_kwargs():
    return {"nics": 2, "polling": "blocking"}
''')
    pytester.makepyfile(test_choice='''
async def test_engine(aiote_engine, aiote_provider):
    assert len(aiote_engine.nic_stats()) == 2
    print("RAN", aiote_provider)
''')
    r = pytester.runpytest_subprocess(*_plugin_args(pytester), "-s", timeout=120)
    r.assert_outcomes(passed=1)
    assert "RAN tcp" in r.stdout.str()
    r = pytester.runpytest_subprocess(*_plugin_args(pytester), "-s", "--aiote-providers=shm,tcp", timeout=120)
    r.assert_outcomes(passed=2)


def test_plugin_can_be_turned_off(pytester: pytest.Pytester):
    pytester.makepyfile(test_off='''
def test_no_fixture(request):
    import pytest
    with pytest.raises(pytest.FixtureLookupError):
        request.getfixturevalue("aiote_engine")
''')
    if not pytester._request.config.pluginmanager.has_plugin("aiote"):
        pytest.skip("the plugin is not installed by entry point here")
    r = pytester.runpytest_subprocess("-p", "no:aiote", "-p", "no:cacheprovider", timeout=60)
    r.assert_outcomes(passed=1)


def _doc_files() -> dict[str, str]:
    """docs/testing.md's python blocks that start with '# <file>.py': a small suite to run as is."""
    text = (ROOT / "docs" / "testing.md").read_text()
    files = {}
    for m in re.finditer(r"```python\n# ([\w./-]+\.py)\n(.*?)```", text, re.S):
        files[m.group(1)] = m.group(2)
    return files


def test_docs_testing_examples_run(pytester: pytest.Pytester):
    files = _doc_files()
    assert "conftest.py" in files and any(n.startswith("test_") for n in files), files.keys()
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    for name, code in files.items():
        pytester.path.joinpath(name).write_text(code)
    r = pytester.runpytest_subprocess(*_plugin_args(pytester), "-v", timeout=240)
    out = r.stdout.str()
    assert r.ret == 0, out
    assert re.search(r"\d+ passed", out) and "failed" not in out.splitlines()[-1], out
