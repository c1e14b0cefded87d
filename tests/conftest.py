"""aiote's own tests use aiote's pytest plugin (aiote.testing.plugin): these are its fixtures
under the short names the suite has always used."""

import os
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
