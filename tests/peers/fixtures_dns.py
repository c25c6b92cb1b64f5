"""Pytest fixtures for the real authoritative DNS server (NSD) and a resolver pointed at it.

``tests/conftest.py`` star-imports this module:

* ``dns_server`` - a started :class:`~tests.peers.dns.AuthoritativeDNS` (function scope)
  with no zones yet. Fill it and publish::

      dns_server.zone("example.test").add("@", "TXT", "v=spf1 -all").add("mx", "A", "192.0.2.1")
      dns_server.reload()          # returns once NSD answers with the new records

* ``dns_server_factory`` - ``make(**options)`` starts further servers (``ipv6=True``,
  ``ttl=``, ``negative_ttl=``, ...); all are stopped and removed at teardown.
* ``resolver`` - a :class:`filters.dns.AsyncResolver` asking only ``dns_server``, with a
  0.5 s timeout per query and no caching of temporary errors (``error_ttl=0``), so a test
  that stops and restarts the server sees the change at once. Positive and negative
  answers are cached as in production (TTL from the zone; 5 s negative by default).

A missing NSD skips the test on a developer's machine (with the hint to run ``make
peers``) but fails it under CI (``CI`` set), where ``make test`` installs the peers first
and a skip would hide a broken install.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from filters.dns import AsyncResolver
from tests.peers.missing import missing_peer

from .dns import AuthoritativeDNS, DnsServerNotInstalled

__all__ = ["dns_server", "dns_server_factory", "resolver"]

DnsServerFactory = Callable[..., AuthoritativeDNS]

#: Timeout of the ``resolver`` fixture: the most one query takes, attempts included.
RESOLVER_TIMEOUT = 0.5


@pytest.fixture
def dns_server_factory() -> Iterator[DnsServerFactory]:
    """Start private NSD instances on demand; stop and remove them afterwards."""
    instances: list[AuthoritativeDNS] = []

    def make(**options: Any) -> AuthoritativeDNS:
        instance = AuthoritativeDNS(**options)
        instances.append(instance)
        try:
            instance.start()
        except DnsServerNotInstalled as exc:
            missing_peer(exc)
        return instance

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
def dns_server(dns_server_factory: DnsServerFactory) -> AuthoritativeDNS:
    """A running NSD on 127.0.0.1 with no zones; add zones, then call ``.reload()``."""
    return dns_server_factory()


@pytest.fixture
async def resolver(dns_server: AuthoritativeDNS) -> AsyncIterator[AsyncResolver]:
    """An AsyncResolver asking only ``dns_server`` (0.5 s per query, errors not cached)."""
    instance = AsyncResolver(dns_server.nameservers, timeout=RESOLVER_TIMEOUT, error_ttl=0)
    yield instance
    await instance.aclose()
