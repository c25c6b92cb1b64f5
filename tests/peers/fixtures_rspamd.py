"""Pytest fixtures for a real Rspamd (tests/peers/rspamd.py) and a client for it.

``tests/conftest.py`` star-imports this module:

* ``rspamd_server`` - one started :class:`~tests.peers.rspamd.Rspamd` for the whole test
  session (start-up costs 0.3-0.8 s with a warm Hyperscan cache in ``var/``, ~7 s cold),
  DNS answered NXDOMAIN at once by its own responder, no Redis.
* ``rspamd`` - the same instance for one test, made healthy first (thawed, restarted if a
  test stopped it). Tests may :meth:`~tests.peers.rspamd.Rspamd.freeze` it; tests that
  need other options use ``rspamd_factory``.
* ``rspamd_factory`` - ``make(**options)`` starts private instances (``local=``,
  ``override=``, ``nameservers=``, ...); all are stopped and removed at teardown.
* ``rspamd_client`` - a :class:`filters.rspamd.RspamdClient` for ``rspamd`` (10 s timeout,
  10 MiB max size), closed at teardown.

A missing Rspamd skips the test on a developer's machine (with the hint to run ``make
peers``) but fails it under CI (``CI`` set), where ``make test`` installs the peers first
and a skip would hide a broken install.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from filters.rspamd import RspamdClient
from tests.peers.missing import missing_peer

from .rspamd import Rspamd, RspamdNotInstalled

__all__ = ["rspamd", "rspamd_client", "rspamd_factory", "rspamd_server"]

RspamdFactory = Callable[..., Rspamd]

#: Timeout and size limit of the ``rspamd_client`` fixture.
CLIENT_TIMEOUT = 10.0
CLIENT_MAX_SIZE = 10 * 1024 * 1024


def _start(instance: Rspamd) -> Rspamd:
    try:
        instance.start()
    except RspamdNotInstalled as exc:
        instance.close()
        missing_peer(exc)
    return instance


@pytest.fixture(scope="session")
def rspamd_server() -> Iterator[Rspamd]:
    """One Rspamd for the session; use ``rspamd`` in tests (it checks its health)."""
    instance = Rspamd(unix_socket=True)
    _start(instance)
    try:
        yield instance
    finally:
        instance.close()


@pytest.fixture
def rspamd(rspamd_server: Rspamd) -> Rspamd:
    """The session's Rspamd, running and not frozen."""
    rspamd_server.thaw()
    if not rspamd_server.running:
        rspamd_server.start()
    return rspamd_server


@pytest.fixture
def rspamd_factory() -> Iterator[RspamdFactory]:
    """Start private Rspamd instances on demand; stop and remove them afterwards."""
    instances: list[Rspamd] = []

    def make(**options: Any) -> Rspamd:
        instance = Rspamd(**options)
        instances.append(instance)
        return _start(instance)

    try:
        yield make
    finally:
        errors: list[Exception] = []
        for instance in reversed(instances):
            try:
                instance.close()
            except Exception as exc:  # stop the others all the same
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
async def rspamd_client(rspamd: Rspamd) -> AsyncIterator[RspamdClient]:
    """A client for ``rspamd`` (closed at teardown)."""
    client = RspamdClient(rspamd.url, timeout=CLIENT_TIMEOUT, max_size=CLIENT_MAX_SIZE)
    yield client
    await client.aclose()
