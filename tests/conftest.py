"""Shared fixtures: real peers (tests/peers) and a mailedge node on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.peers.fixtures import *  # noqa: F403 - dovecot, dovecot_factory, tmpfs
from tests.peers.fixtures_clamd import *  # noqa: F403 - clamd, clamd_factory
from tests.peers.fixtures_dns import *  # noqa: F403 - dns_server, dns_server_factory, resolver
from tests.peers.fixtures_redis import *  # noqa: F403 - redis_server, redis_server_factory, ...
from tests.support.node import NodeHarness

NodeFactory = Callable[..., Awaitable[NodeHarness]]


@pytest.fixture
async def node_factory(tmp_path: Path) -> AsyncIterator[NodeFactory]:
    """Start nodes with config overrides; every node is stopped at teardown."""
    started: list[NodeHarness] = []

    async def make(name: str = "node", **kwargs: Any) -> NodeHarness:
        harness = NodeHarness(tmp_path / name, **kwargs)
        started.append(harness)
        return await harness.start()

    yield make
    for harness in reversed(started):
        await harness.stop()


@pytest.fixture
async def node(node_factory: NodeFactory) -> NodeHarness:
    """A node with the default test tenants, delivering to its Maildir store."""
    return await node_factory()
