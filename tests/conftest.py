"""aiote's own tests use aiote's pytest plugin (aiote.testing.plugin): these are its fixtures
under the short names the suite has always used."""

import os
import threading
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


_SHM = "/dev/shm"


def _shm_pid(name: str) -> int:
    head, sep, _ = name.partition(":")
    return int(head) if sep and head.isdigit() else 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session", autouse=True)
def _remove_shm_files_our_dead_processes_left():
    """libfabric's shm and aiote name their /dev/shm files after the owner's pid
    (``<pid>:...``); a process the tests SIGKILL leaves them behind (harmless: an engine
    sweeps its own pid's leftovers when it opens, but they pile up, 16 MiB of address space
    each).  At the end of the session remove those that a process of *this* session created
    and that outlived it -- never another session's or anything that was there before: every
    process started by the tests inherits a tag in its environment, a sampler records each
    new file (name and inode) whose owner carries our tag, and only recorded files whose
    owner is gone are removed; and, last, the files this process itself created."""
    if not os.path.isdir(_SHM):
        yield
        return
    tag = f"AIOTE_TEST_SESSION={os.getpid()}.{time.time_ns()}".encode()
    os.environ["AIOTE_TEST_SESSION"] = tag.decode().partition("=")[2]
    before = set(os.listdir(_SHM))
    ours: dict[str, int] = {}  # name -> inode
    judged: set[str] = set(before)
    stop = threading.Event()

    def sample() -> None:
        try:
            names = os.listdir(_SHM)
        except OSError:
            return
        for name in names:
            pid = _shm_pid(name)
            if name in judged or not pid:
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
                ino = os.stat(os.path.join(_SHM, name)).st_ino
            except OSError:
                continue  # its owner is gone already: unknown, left alone
            judged.add(name)
            if tag in env:
                ours[name] = ino

    def sampler() -> None:
        while not stop.wait(0.5):
            sample()

    thread = threading.Thread(target=sampler, name="shm-sampler", daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join()
    sample()
    for name, ino in ours.items():
        path = os.path.join(_SHM, name)
        try:
            if os.stat(path).st_ino == ino and not _alive(_shm_pid(name)):
                os.unlink(path)
        except OSError:
            pass
    # and this process's own: engines whose teardown was deferred (kept mapped for peers that
    # might still answer them, docs/reliability.md) keep their files until exit, and libfabric
    # 1.17 leaves them after it; the tests are over, every peer is gone, the mappings stay valid
    me = f"{os.getpid()}:"
    for name in os.listdir(_SHM):
        if name.startswith(me) and name not in before:
            try:
                os.unlink(os.path.join(_SHM, name))
            except OSError:
                pass
