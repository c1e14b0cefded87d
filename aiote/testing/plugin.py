"""pytest plugin: fixtures for async test suites of code that uses aiote.

Installed with aiote (entry point `pytest11`: `aiote`), so it is active in
any pytest run of an environment that has aiote; `-p no:aiote` turns it
off.  The fixtures are pytest-asyncio fixtures (function scope; their event
loop follows `asyncio_default_fixture_loop_scope`):

| fixture | what it gives |
|---|---|
| `aiote_provider` | `"shm"` or `"tcp"`: a test that uses any aiote fixture runs once per provider |
| `aiote_host` | the provider's loopback bind address (None on shm) |
| `aiote_engine_kwargs` | `{}`; override it in conftest.py to give every engine and peer options (`{"nics": 2}`) |
| `aiote_engine` | an open TransferEngine in this process |
| `aiote_engine_pair` | two open engines in this process: `a, b = aiote_engine_pair` |
| `aiote_make_engine` | `await aiote_make_engine(nics=2)`: more engines |
| `aiote_peer` | a `PeerProcess`: an engine in another process |
| `aiote_make_peer` | `await aiote_make_peer(nics=2)`: more peers |
| `aiote_faults` | `Faults`: kill / pause a peer, fail a NIC |

Everything a fixture opened is closed when the test ends (peers stopped,
paused peers resumed first, engines closed).

Choosing providers: `pytest --aiote-providers=tcp`, the ini option
`aiote_providers = shm tcp`, or per test `@pytest.mark.aiote_providers("tcp")`;
a test may also `@pytest.mark.parametrize("aiote_provider", [...])` itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from . import PROVIDERS, EnginePair, Faults, PeerProcess, loopback_host, open_engine

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - exercised only without pytest-asyncio
    pytest_asyncio = None

_NEEDS_ASYNCIO = "aiote's pytest fixtures need pytest-asyncio: pip install pytest-asyncio (or 'aiote[test]')"


def _async_fixture(fn: Callable[..., Any]) -> Any:
    """pytest_asyncio.fixture, or (without pytest-asyncio) a fixture that fails saying so."""
    if pytest_asyncio is not None:
        return pytest_asyncio.fixture(fn)

    def missing(request: pytest.FixtureRequest) -> None:
        pytest.fail(_NEEDS_ASYNCIO, pytrace=False)

    missing.__doc__ = fn.__doc__
    return pytest.fixture(name=fn.__name__)(missing)


# ---------------------------------------------------------------- configuration


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("aiote")
    group.addoption("--aiote-providers", dest="aiote_providers", default=None, metavar="P[,P...]",
                    help="providers aiote's fixtures run on (default: shm,tcp)")
    parser.addini("aiote_providers", type="args", default=list(PROVIDERS),
                  help="providers aiote's fixtures run on (default: shm tcp)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "aiote_providers(*names): run this test's aiote fixtures on these providers")


def configured_providers(config: pytest.Config) -> list[str]:
    """The providers from --aiote-providers, else the ini option, else shm and tcp."""
    opt = config.getoption("aiote_providers", default=None)
    if opt:
        names = [p.strip() for p in opt.split(",") if p.strip()]
    else:
        try:
            names = list(config.getini("aiote_providers"))
        except ValueError:  # the plugin was registered after the ini options were parsed
            names = []
    return names or list(PROVIDERS)


def _parametrize_args(mark: pytest.Mark) -> list[str]:
    names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
    if isinstance(names, str):
        names = names.split(",")
    return [n.strip() for n in names]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "aiote_provider" not in metafunc.fixturenames:
        return
    if any("aiote_provider" in _parametrize_args(m) for m in metafunc.definition.iter_markers("parametrize")):
        return  # the test chose its providers itself
    mark = metafunc.definition.get_closest_marker("aiote_providers")
    providers = list(mark.args) if mark is not None and mark.args else configured_providers(metafunc.config)
    metafunc.parametrize("aiote_provider", providers, indirect=True, ids=providers)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def aiote_provider(request: pytest.FixtureRequest) -> str:
    """The provider this test runs on ("shm" or "tcp", or what --aiote-providers names)."""
    return getattr(request, "param", None) or configured_providers(request.config)[0]


@pytest.fixture
def aiote_host(aiote_provider: str) -> str | None:
    """Where an engine of ``aiote_provider`` binds on this host: None on shm, 127.0.0.1 otherwise."""
    return loopback_host(aiote_provider)


@pytest.fixture
def aiote_engine_kwargs() -> dict[str, Any]:
    """Options for every engine and peer the fixtures open; override in your conftest.py."""
    return {}


@_async_fixture
async def aiote_make_engine(aiote_provider: str, aiote_host: str | None,
                            aiote_engine_kwargs: dict[str, Any]) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """A factory: ``eng = await aiote_make_engine(**options)`` opens one more engine on the test's
    provider (``provider=`` to override); all are closed when the test ends."""
    engines: list[Any] = []

    async def make(provider: str | None = None, **kwargs: Any) -> Any:
        prov = provider or aiote_provider
        opts = {**aiote_engine_kwargs, **kwargs}
        if provider is None and "host" not in opts:
            opts["host"] = aiote_host
        eng = await open_engine(prov, **opts)
        engines.append(eng)
        return eng

    try:
        yield make
    finally:
        for eng in reversed(engines):
            await eng.close()


@_async_fixture
async def aiote_engine(aiote_make_engine: Callable[..., Awaitable[Any]]) -> Any:
    """An open TransferEngine in this process."""
    return await aiote_make_engine()


@_async_fixture
async def aiote_engine_pair(aiote_make_engine: Callable[..., Awaitable[Any]]) -> EnginePair:
    """Two open engines in this process: ``a, b = aiote_engine_pair`` (also ``.a``, ``.b``)."""
    return EnginePair(await aiote_make_engine(), await aiote_make_engine())


@_async_fixture
async def aiote_make_peer(aiote_provider: str,
                          aiote_engine_kwargs: dict[str, Any]) -> AsyncIterator[Callable[..., Awaitable[PeerProcess]]]:
    """A factory: ``peer = await aiote_make_peer(**options)`` starts one more PeerProcess; all are
    stopped when the test ends."""
    peers: list[PeerProcess] = []

    async def make(provider: str | None = None, **kwargs: Any) -> PeerProcess:
        p = PeerProcess(provider or aiote_provider, **{**aiote_engine_kwargs, **kwargs})
        peers.append(p)
        return await p.start()

    try:
        yield make
    finally:
        for p in reversed(peers):
            await p.stop()


@_async_fixture
async def aiote_peer(aiote_make_peer: Callable[..., Awaitable[PeerProcess]]) -> PeerProcess:
    """A TransferEngine in another process (a :class:`~aiote.testing.PeerProcess`)."""
    return await aiote_make_peer()


@pytest.fixture
def aiote_faults() -> Any:
    """Fault injection (:class:`~aiote.testing.Faults`): ``kill(peer)``, ``pause(peer)``,
    ``resume(peer)``, ``await fail_nic(engine_or_peer, i)``."""
    f = Faults()
    yield f
    f._cleanup()
