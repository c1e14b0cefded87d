"""aiote's own tests use aiote's pytest plugin (aiote.testing.plugin): these are its fixtures
under the short names the suite has always used."""

import os
import subprocess
import sys
import time
from importlib.metadata import entry_points

import pytest


def _plugin_autoloaded() -> bool:
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(ep.value == "aiote.testing.plugin" for ep in entry_points(group="pytest11"))


# the plugin comes through its entry point once aiote is installed (pip install -e .); a tree
# run without that (or with autoload off) loads it here
pytest_plugins = ["pytester"] + ([] if _plugin_autoloaded() else ["aiote.testing.plugin"])


@pytest.fixture
def provider(aiote_provider):
    """"shm" or "tcp": each test that uses a provider-dependent fixture runs on both."""
    return aiote_provider


@pytest.fixture
def host(aiote_host):
    return aiote_host


@pytest.fixture
def engine(aiote_engine):
    """An engine in this process."""
    return aiote_engine


@pytest.fixture
def peer(aiote_peer):
    """An engine in another process, driven through PeerProcess."""
    return aiote_peer


# Runs in a process of its own, so that the suite's own process keeps exactly its fds and
# threads (tests/test_leaks.py counts them).  argv: the tag, the names present at the start.
# Records every new /dev/shm/<pid>:... file (name, inode) whose owner carries the tag in its
# environment; on EOF of stdin, looks once more and removes the recorded files whose owner
# has exited (and that are still the same file).
_SAMPLER = r"""
import os, sys, select
tag = sys.argv[1].encode()
judged = set(sys.argv[2:])
ours = {}
def owner(name):
    head, sep, _ = name.partition(":")
    return int(head) if sep and head.isdigit() else 0
def sample():
    for name in os.listdir("/dev/shm"):
        pid = owner(name)
        if name in judged or not pid:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            ino = os.stat("/dev/shm/" + name).st_ino
        except OSError:
            continue  # its owner is gone already: unknown, left alone
        judged.add(name)
        if tag in env:
            ours[name] = ino
while not select.select([sys.stdin], [], [], 0.5)[0]:
    sample()
sample()
for name, ino in ours.items():
    pid = owner(name)
    try:
        os.kill(pid, 0)
        continue  # still running
    except ProcessLookupError:
        pass
    except PermissionError:
        continue
    try:
        if os.stat("/dev/shm/" + name).st_ino == ino:
            os.unlink("/dev/shm/" + name)
    except OSError:
        pass
"""


@pytest.fixture(scope="session", autouse=True)
def _remove_shm_files_our_dead_processes_left():
    """libfabric's shm and aiote name their /dev/shm files after the owner's pid
    (``<pid>:...``); a process the tests SIGKILL leaves them behind (harmless: an engine
    sweeps its own pid's leftovers when it opens, but they pile up, 16 MiB of address space
    each).  At the end of the session remove those that a process of *this* session created
    and that outlived it -- never another session's or anything that was there before: every
    process started by the tests inherits a tag in its environment, a sampler process records
    each new file (name and inode) whose owner carries our tag, and only recorded files whose
    owner is gone are removed; and, last, the files this process itself created."""
    if not os.path.isdir("/dev/shm"):
        yield
        return
    value = f"{os.getpid()}.{time.time_ns()}"
    os.environ["AIOTE_TEST_SESSION"] = value
    before = set(os.listdir("/dev/shm"))
    sampler = subprocess.Popen([sys.executable, "-c", _SAMPLER, f"AIOTE_TEST_SESSION={value}", *sorted(before)],
                               stdin=subprocess.PIPE, close_fds=True)
    yield
    sampler.stdin.close()
    try:
        sampler.wait(30)
    except subprocess.TimeoutExpired:
        sampler.kill()
    # this process's own: engines whose teardown was deferred (kept mapped for peers that
    # might still answer them, docs/reliability.md) keep their files for good (libfabric 1.17
    # removes none at exit); the tests are over, every peer is gone, the mappings stay valid
    me = f"{os.getpid()}:"
    for name in os.listdir("/dev/shm"):
        if name.startswith(me) and name not in before:
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass
