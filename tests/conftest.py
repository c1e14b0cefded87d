import pytest

from aiote.testing import loopback_host

PROVIDERS = ["shm", "tcp"]


@pytest.fixture(params=PROVIDERS)
def provider(request):
    return request.param


@pytest.fixture
def host(provider):
    return loopback_host(provider)
