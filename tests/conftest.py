import pytest

import aiote
from aiote.testing import PeerProcess, loopback_host

PROVIDERS = ["shm", "tcp"]


@pytest.fixture(params=PROVIDERS)
def provider(request):
    return request.param


@pytest.fixture
def host(provider):
    return loopback_host(provider)


@pytest.fixture
async def engine(provider, host):
    """An engine in this process."""
    async with aiote.TransferEngine(provider, host=host) as eng:
        yield eng


@pytest.fixture
async def peer(provider):
    """An engine in another process, driven through PeerProcess."""
    async with PeerProcess(provider) as p:
        yield p
