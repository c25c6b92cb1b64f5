"""Pytest fixtures for a private Redis; ``tests/conftest.py`` star-imports this module.

* ``redis_server`` - a started :class:`~tests.peers.redis.RedisServer` (function scope,
  empty, no persistence) on 127.0.0.1; ``redis_server.url`` is its ``redis://`` URL.
  Outage tests call ``.kill()`` (SIGKILL) and ``.start()`` (same port, empty again), or
  ``.freeze()``/``.thaw()`` for a server that hangs.
* ``redis_server_factory`` - ``make(**options)`` starts further servers
  (``cluster=True`` for a one-node Redis Cluster, ``extra_args=[...]``); all are stopped
  and removed at teardown.
* ``redis_cluster`` - one one-node Redis Cluster owning every slot, started once per test
  session (cluster mode makes a node wait about 2 s before it serves): call
  ``redis_cluster.flushall()`` first; ``redis_cluster.cluster_url`` is its
  ``redis+cluster://`` URL.
* ``redis_sentinel_factory`` - ``make(master, service="mymaster")`` starts a Sentinel
  monitoring a server; ``.url()`` is its ``redis+sentinel://`` URL.

A missing redis-server skips the test on a developer's machine (with the hint to run
``make peers``) but fails it under CI (``CI`` set), where ``make test`` installs the peers
first and a skip would hide a broken install. Starting a server takes about 10 ms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.peers.missing import missing_peer

from .redis import RedisNotInstalled, RedisSentinel, RedisServer

__all__ = ["redis_cluster", "redis_sentinel_factory", "redis_server", "redis_server_factory"]

RedisServerFactory = Callable[..., RedisServer]
RedisSentinelFactory = Callable[..., RedisSentinel]


def _close_all(instances: list[Any]) -> None:
    errors: list[Exception] = []
    for instance in reversed(instances):
        try:
            instance.close()
        except Exception as exc:  # stop the others all the same
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def redis_server_factory() -> Iterator[RedisServerFactory]:
    """Start private redis-servers on demand; stop and remove them afterwards."""
    instances: list[RedisServer] = []

    def make(**options: Any) -> RedisServer:
        instance = RedisServer(**options)
        instances.append(instance)
        try:
            instance.start()
        except RedisNotInstalled as exc:
            missing_peer(exc)
        return instance

    try:
        yield make
    finally:
        _close_all(instances)


@pytest.fixture
def redis_server(redis_server_factory: RedisServerFactory) -> RedisServer:
    """A running, empty redis-server on 127.0.0.1 (``.url``, ``.kill()``, ``.start()``)."""
    return redis_server_factory()


@pytest.fixture
def redis_sentinel_factory() -> Iterator[RedisSentinelFactory]:
    """Start private Sentinels monitoring given servers; stop and remove them afterwards."""
    instances: list[RedisSentinel] = []

    def make(master: RedisServer, **options: Any) -> RedisSentinel:
        instance = RedisSentinel(master, **options)
        instances.append(instance)
        try:
            instance.start()
        except RedisNotInstalled as exc:
            missing_peer(exc)
        return instance

    try:
        yield make
    finally:
        _close_all(instances)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisServer]:
    """A one-node Redis Cluster for the whole session; flush it before use."""
    instance = RedisServer(cluster=True)
    try:
        instance.start()
    except RedisNotInstalled as exc:
        instance.close()
        missing_peer(exc)
    try:
        yield instance
    finally:
        instance.close()
