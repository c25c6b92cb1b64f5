"""StateStore against a real Redis: MemoryStore and RedisStore agree; FallbackStore in outages.

The same behaviour table runs against a MemoryStore (on the wall clock, so its buckets
line up with Redis's ``TIME``), a RedisStore on a private redis-server, one through a
Sentinel and one on a one-node Redis Cluster (which refuses cross-slot scripts, so the
hash tags are exercised). Outage tests SIGKILL or SIGSTOP the server under a
FallbackStore with a 0.2 s timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from filters.state import StateStore
from gateway.state import FallbackStore, make_store
from gateway.state_memory import MemoryStore, weighted_count
from gateway.state_redis import SCRIPTS, RedisStore, StateUnavailable
from tests.peers.fixtures_redis import (  # noqa: F401 - fixtures (until conftest imports them)
    redis_cluster,
    redis_sentinel_factory,
    redis_server,
    redis_server_factory,
)
from tests.peers.redis import RedisServer

pytestmark = pytest.mark.integration

TIMEOUT = 0.2
BACKENDS = ["memory", "redis", "sentinel", "cluster"]


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    """The same interface four ways; Redis-backed ones start empty."""
    backend: StateStore
    if request.param == "memory":
        backend = MemoryStore(clock=time.time)
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        backend = RedisStore(server.url, timeout=TIMEOUT)
    elif request.param == "sentinel":
        server = request.getfixturevalue("redis_server")
        sentinel = request.getfixturevalue("redis_sentinel_factory")(server)
        backend = RedisStore(sentinel.url(), timeout=TIMEOUT)
    else:
        cluster: RedisServer = request.getfixturevalue("redis_cluster")
        cluster.flushall()
        backend = RedisStore(cluster.cluster_url, timeout=TIMEOUT)
    yield backend
    await backend.aclose()


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:  # noqa: F811
    instance = RedisStore(redis_server.url, timeout=TIMEOUT)
    yield instance
    await instance.aclose()


# -- one behaviour table, every backend -----------------------------------------------

TABLE: list[tuple[str, tuple[Any, ...], dict[str, Any], Any]] = [
    ("incr", ("c",), {"ttl": 60}, 1),
    ("incr", ("c", 4), {"ttl": 60}, 5),
    ("incr", ("c", -2), {"ttl": 60}, 3),
    ("get_counter", ("c",), {}, 3),
    ("get_counter", ("absent",), {}, 0),
    ("hit", ("w",), {"window": 3600}, 1),
    ("hit", ("w",), {"window": 3600, "amount": 4}, 5),
    ("window_count", ("w",), {"window": 3600}, 5),
    ("window_count", ("absent",), {"window": 3600}, 0),
    ("window_count", ("w",), {"window": 1800}, 0),  # another window length: afresh
    ("hit", ("w",), {"window": 3600, "amount": 0}, 5),
    ("set_add", ("s", "a"), {"ttl": 60}, None),
    ("set_add", ("s", "a"), {"ttl": 60}, None),
    ("set_add", ("s", "mémber with spaces"), {"ttl": 60}, None),
    ("set_contains", ("s", "a"), {}, True),
    ("set_contains", ("s", "mémber with spaces"), {}, True),
    ("set_contains", ("s", "b"), {}, False),
    ("set_contains", ("absent", "a"), {}, False),
    ("put", ("v", "one"), {"ttl": 60, "only_if_absent": True}, True),
    ("put", ("v", "two"), {"ttl": 60, "only_if_absent": True}, False),
    ("fetch", ("v",), {}, "one"),
    ("put", ("v", "three"), {"ttl": 60}, True),
    ("fetch", ("v",), {}, "three"),
    ("put", ("empty", ""), {"ttl": 60}, True),
    ("fetch", ("empty",), {}, ""),
    ("fetch", ("absent",), {}, None),
    # one key, four kinds, no clash; delete removes them all
    ("incr", ("k",), {"ttl": 60}, 1),
    ("hit", ("k",), {"window": 3600}, 1),
    ("put", ("k", "x"), {"ttl": 60}, True),
    ("set_add", ("k", "x"), {"ttl": 60}, None),
    ("get_counter", ("k",), {}, 1),
    ("fetch", ("k",), {}, "x"),
    ("delete", ("k",), {}, None),
    ("get_counter", ("k",), {}, 0),
    ("window_count", ("k",), {"window": 3600}, 0),
    ("set_contains", ("k", "x"), {}, False),
    ("fetch", ("k",), {}, None),
    ("delete", ("never",), {}, None),
    # keys the callers really build, and awkward ones
    ("incr", ("rl:ip:2001:db8::1",), {"ttl": 60}, 1),
    ("incr", ("odd{key}with}braces{",), {"ttl": 60}, 1),
    ("incr", ("odd{key}with}braces{",), {"ttl": 60}, 2),
    ("put", ("ключ ü",), {"ttl": 60, "value": "wert ü"}, True),
    ("fetch", ("ключ ü",), {}, "wert ü"),
    ("incr", ("}{",), {"ttl": 60}, 1),
    ("incr", ("",), {"ttl": 60}, 1),
    ("incr", ("",), {"ttl": 60}, 2),
    ("get_counter", ("}{",), {}, 1),
    ("delete", ("}{",), {}, None),
    ("get_counter", ("}{",), {}, 0),
    ("delete", ("odd{key}with}braces{",), {}, None),
    ("get_counter", ("odd{key}with}braces{",), {}, 0),
]


async def test_behaviour_table(store: StateStore) -> None:
    got = []
    for name, args, kwargs, _expected in TABLE:
        got.append(await getattr(store, name)(*args, **kwargs))
    assert got == [row[3] for row in TABLE]
    assert store.degraded is False


async def test_expiry(store: StateStore) -> None:
    await store.incr("c", ttl=0.4)
    await store.put("v", "x", ttl=0.35)
    await store.set_add("s", "short", ttl=0.3)
    await store.set_add("s", "long", ttl=2)
    await store.hit("w", window=0.1)
    await asyncio.sleep(0.2)
    assert await store.incr("c", ttl=0.4) == 2  # the expiry is not extended
    assert not await store.put("v", "y", ttl=0.3, only_if_absent=True)
    await store.set_add("s", "refreshed", ttl=0.6)
    await asyncio.sleep(0.25)  # 0.45 s after the start
    assert await store.get_counter("c") == 0
    assert await store.fetch("v") is None
    assert not await store.set_contains("s", "short")
    assert await store.set_contains("s", "refreshed")
    assert await store.set_contains("s", "long")
    assert await store.window_count("w", window=0.1) == 0  # two windows later
    assert await store.put("v", "z", ttl=0.3, only_if_absent=True)
    assert await store.incr("c", ttl=0.4) == 1


def _ms() -> int:
    return int(time.time() * 1000)


async def test_window_weighting(store: StateStore) -> None:
    """The previous bucket fades as weighted_count says, on the wall clock (Redis TIME)."""
    window_ms = 400
    for attempt in range(3):  # a busy machine may oversleep past the bucket we aim at
        key = f"w{attempt}"
        while not 10 <= _ms() % window_ms < 60:  # early in a bucket: one bucket for all
            await asyncio.sleep(0.005)
        started = _ms()
        assert await store.hit(key, window=window_ms / 1000, amount=10) == 10
        first_bucket = started // window_ms
        await asyncio.sleep(((first_bucket + 1) * window_ms + 150 - _ms()) / 1000)
        before = _ms()
        count = await store.window_count(key, window=window_ms / 1000)
        after = _ms()
        if not before // window_ms == after // window_ms == first_bucket + 1 == \
                _ms() // window_ms or started // window_ms != first_bucket:
            continue
        low = weighted_count(10, 0, after % window_ms, window_ms)
        high = weighted_count(10, 0, before % window_ms, window_ms)
        assert low <= count <= high
        assert 3 <= count <= 7  # 10 * (1 - 150/400) = 6.25, rounded up, give or take
        return
    pytest.fail("could not time three attempts into the right buckets")


# -- Redis specifics ------------------------------------------------------------------


async def test_every_key_is_namespaced_and_expires(redis_server: RedisServer,  # noqa: F811
                                                   redis_store: RedisStore) -> None:
    await redis_store.incr("c", ttl=60)
    await redis_store.incr("c", 5, ttl=30)
    await redis_store.hit("w", window=10)
    await redis_store.hit("w", window=10, amount=0)
    await redis_store.set_add("s", "a", ttl=100)
    await redis_store.set_add("s", "b", ttl=50)
    await redis_store.put("v", "x", ttl=20)
    await redis_store.put("v", "y", ttl=40)
    await redis_store.put("nx", "x", ttl=20, only_if_absent=True)
    await redis_store.put("nx", "y", ttl=40, only_if_absent=True)
    await redis_store.incr("gone", ttl=0.05)
    await asyncio.sleep(0.1)
    ttls = {key: redis_server.command("PTTL", key) for key in redis_server.scan_keys()}
    assert set(ttls) == {"mailedge:c:{c}", "mailedge:w:{w}", "mailedge:s:{s}",
                         "mailedge:v:{v}", "mailedge:v:{nx}"}
    assert all(isinstance(t, int) and t > 0 for t in ttls.values()), ttls
    assert 59_000 < ttls["mailedge:c:{c}"] <= 60_000  # from creation, not the second incr
    assert 19_000 < ttls["mailedge:w:{w}"] <= 20_000  # two windows
    assert 99_000 < ttls["mailedge:s:{s}"] <= 100_000  # the longest-living member
    assert 39_000 < ttls["mailedge:v:{v}"] <= 40_000  # SET replaces value and expiry
    assert 19_000 < ttls["mailedge:v:{nx}"] <= 20_000  # a refused NX put changes nothing
    assert redis_server.command("ZCARD", "mailedge:s:{s}") == 2


async def test_hash_tags_put_all_kinds_of_a_key_in_one_slot(
        redis_cluster: RedisServer) -> None:  # noqa: F811
    store = RedisStore(redis_cluster.cluster_url, timeout=TIMEOUT)
    try:
        for key in ("rl:ip:192.0.2.1", "a", "odd{x}y", "}{", "{}", "ключ", "", "{"):
            slots = {redis_cluster.command("CLUSTER", "KEYSLOT", store.redis_key(kind, key))
                     for kind in "cwsv"}
            assert len(slots) == 1, (key, slots)
        assert store.redis_key("c", "a") == "mailedge:c:{a}"
        assert store.redis_key("c", "}{").endswith("}}{")
        assert len({store.redis_key("c", k) for k in ("", "{", "}", "{}", "}{")}) == 5
    finally:
        await store.aclose()


async def test_two_nodes_share_state(redis_server: RedisServer) -> None:  # noqa: F811
    # A generous timeout: 200 concurrent first calls open 128 connections, which can
    # take longer than 0.2 s on a busy two-core machine (this test is about atomicity).
    node_a = RedisStore(redis_server.url, timeout=5)
    node_b = RedisStore(redis_server.url, timeout=5)
    try:
        assert await node_a.incr("rl:tenant:t1", ttl=60) == 1
        assert await node_b.incr("rl:tenant:t1", ttl=60) == 2
        assert await node_a.get_counter("rl:tenant:t1") == 2
        assert await node_a.hit("rl:sender", window=3600) == 1
        assert await node_b.hit("rl:sender", window=3600, amount=2) == 3
        assert await node_a.window_count("rl:sender", window=3600) == 3
        await node_a.set_add("grey", "192.0.2.1/a@x/b@y", ttl=60)
        assert await node_b.set_contains("grey", "192.0.2.1/a@x/b@y")
        assert await node_a.put("autoreply:x", "1", ttl=60, only_if_absent=True)
        assert not await node_b.put("autoreply:x", "1", ttl=60, only_if_absent=True)
        await node_b.delete("rl:tenant:t1")
        assert await node_a.get_counter("rl:tenant:t1") == 0
        results = await asyncio.gather(*(
            (node_a if i % 2 else node_b).incr("race", ttl=60) for i in range(200)))
        assert sorted(results) == list(range(1, 201))  # atomic: every value exactly once
    finally:
        await node_a.aclose()
        await node_b.aclose()


async def test_namespaces_are_separate(redis_server: RedisServer) -> None:  # noqa: F811
    one = RedisStore(redis_server.url, namespace="one:", timeout=TIMEOUT)
    two = RedisStore(redis_server.url, namespace="two:", timeout=TIMEOUT)
    try:
        await one.incr("c", ttl=60)
        assert await two.get_counter("c") == 0
        assert redis_server.scan_keys() == ["one:c:{c}"]
    finally:
        await one.aclose()
        await two.aclose()
    with pytest.raises(ValueError):
        RedisStore(redis_server.url, namespace="bad{")


async def test_scripts_reload_after_script_flush(redis_server: RedisServer,  # noqa: F811
                                                 redis_store: RedisStore) -> None:
    assert await redis_store.hit("w", window=60) == 1
    loads = redis_store.noscript_loads
    assert await redis_store.hit("w", window=60) == 2
    assert redis_store.noscript_loads == loads  # cached: EVALSHA only
    redis_server.command("SCRIPT", "FLUSH")
    assert await redis_store.hit("w", window=60) == 3
    assert redis_store.noscript_loads == loads + 1
    sha = SCRIPTS["hit"].sha
    assert redis_server.command("SCRIPT", "EXISTS", sha) == [1]


async def test_errors_raise_state_unavailable_within_the_timeout(
        redis_server: RedisServer, redis_store: RedisStore) -> None:  # noqa: F811
    assert await redis_store.ping()
    redis_server.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(StateUnavailable) as info:
            await redis_store.incr("c", ttl=60)
        assert TIMEOUT * 0.9 <= time.monotonic() - started < TIMEOUT + 0.25
        assert isinstance(info.value.__cause__, TimeoutError) and info.value.timeout
    finally:
        redis_server.thaw()
    redis_server.kill()
    started = time.monotonic()
    with pytest.raises(StateUnavailable):
        await redis_store.fetch("v")
    assert time.monotonic() - started < TIMEOUT + 0.05
    with pytest.raises(ValueError):  # argument errors are not outages
        await redis_store.incr("c", ttl=0)


async def test_wrong_scheme_and_password_redaction() -> None:
    with pytest.raises(ValueError, match="scheme"):
        RedisStore("http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="service"):
        RedisStore("redis+sentinel://127.0.0.1:26379")
    store = RedisStore("redis://user:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in store.url and "s3cret" not in repr(store)
    await store.aclose()


# -- FallbackStore against a real outage ----------------------------------------------


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "gateway.state" and r.levelno >= logging.WARNING]


async def test_fallback_through_a_crash_and_back(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.WARNING, logger="gateway.state")
    store = FallbackStore(RedisStore(redis_server.url, timeout=TIMEOUT), MemoryStore(),
                          retry_interval=0.5, log_period=60)
    other_node = RedisStore(redis_server.url, timeout=TIMEOUT)
    try:
        assert await store.incr("c", ttl=60) == 1
        assert await store.incr("c", ttl=60) == 2
        assert await other_node.get_counter("c") == 2
        assert not store.degraded

        redis_server.kill()
        started = time.monotonic()
        assert await store.incr("c", ttl=60) == 1  # the local counter starts afresh
        assert time.monotonic() - started < TIMEOUT
        assert store.degraded
        started = time.monotonic()
        for _ in range(50):  # no timeout is paid while degraded
            await store.incr("c", ttl=60)
            await store.hit("w", window=60)
            await store.set_add("s", "m", ttl=60)
        assert time.monotonic() - started < 0.2
        assert await store.get_counter("c") == 51
        assert await store.set_contains("s", "m")
        assert store.errors == 1 and store.outages == 1
        assert store.local_ops == 1 + 150 + 2
        assert len(_warnings(caplog)) == 1
        assert "unavailable" in _warnings(caplog)[0]

        redis_server.start()  # same port, empty (no persistence)
        assert await store.get_counter("c") == 51  # not retried before retry_interval
        await asyncio.sleep(0.5)
        assert await store.incr("c", ttl=60) == 1  # Redis again (it lost its data)
        assert not store.degraded
        assert store.recoveries == 1
        assert await other_node.get_counter("c") == 1
        assert await store.incr("c", ttl=60) == 2
        assert await other_node.get_counter("c") == 2
        warnings = _warnings(caplog)
        assert len(warnings) == 2 and "recovered" in warnings[1], warnings
        assert store.snapshot() == {"degraded": 0, "errors": 1, "timeouts": 0,
                                    "local_ops": store.local_ops, "outages": 1,
                                    "recoveries": 1}
    finally:
        await other_node.aclose()
        await store.aclose()


async def test_fallback_when_redis_hangs(redis_server: RedisServer,  # noqa: F811
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.state")
    store = FallbackStore(RedisStore(redis_server.url, timeout=TIMEOUT), MemoryStore(),
                          retry_interval=0.4, log_period=60)
    try:
        await store.put("a", "value-a", ttl=60)
        await store.put("b", "value-b", ttl=60)
        redis_server.freeze()
        started = time.monotonic()
        assert await store.incr("c", ttl=60) == 1  # after the timeout, locally
        assert TIMEOUT * 0.9 <= time.monotonic() - started < TIMEOUT + 0.25
        assert store.degraded and store.timeouts == 1

        await asyncio.sleep(0.4)  # a probe is due; 20 callers arrive at once

        async def timed(coro: Coroutine[Any, Any, int]) -> float:
            began = time.monotonic()
            await coro
            return time.monotonic() - began

        latencies = await asyncio.gather(*(timed(store.incr("c", ttl=60)) for _ in range(20)))
        assert sum(1 for t in latencies if t >= TIMEOUT * 0.9) == 1  # one probe paid it
        assert sum(1 for t in latencies if t < 0.05) == 19
        assert store.errors == 2 and store.timeouts == 2
        assert await store.get_counter("c") == 21
        assert len(_warnings(caplog)) == 1

        redis_server.thaw()
        await asyncio.sleep(0.4)
        assert await store.fetch("a") == "value-a"  # no reply mix-up after the timeouts
        assert not store.degraded
        assert await store.fetch("b") == "value-b"
        assert "recovered" in _warnings(caplog)[-1]
    finally:
        redis_server.thaw()
        await store.aclose()


# -- FallbackStore logic, with a scripted primary -------------------------------------


class ScriptedPrimary(MemoryStore):
    """A MemoryStore that raises StateUnavailable while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls = 0

    async def incr(self, key: str, amount: int = 1, *, ttl: float) -> int:
        self.calls += 1
        if self.down:
            try:
                raise ConnectionRefusedError("connection refused")
            except ConnectionRefusedError as exc:
                raise StateUnavailable("redis: refused") from exc
        return await super().incr(key, amount, ttl=ttl)


async def test_fallback_logs_once_per_period_with_a_count(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.state")
    now = [0.0]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    primary = ScriptedPrimary()
    store = FallbackStore(primary, MemoryStore(clock=clock), retry_interval=1.0,
                          log_period=10.0, clock=clock)
    primary.down = True
    for _ in range(25):  # 25 s of outage, one call every 0.25 s
        for _ in range(4):
            await store.incr("c", ttl=60)
            now[0] += 0.25
    assert primary.calls == 25  # at most one try per retry_interval
    assert store.errors == 25
    warnings = _warnings(caplog)
    assert len(warnings) == 3  # at 0 s, 10 s and 20 s
    assert "9 more failures" in warnings[1] and "9 more failures" in warnings[2]
    primary.down = False
    now[0] += 1
    assert await store.incr("c", ttl=60) == 1
    assert not store.degraded
    assert "recovered after 26" in _warnings(caplog)[-1]
    primary.down = True  # a new outage is reported at once
    await store.incr("c", ttl=60)
    assert len(_warnings(caplog)) == 5
    with pytest.raises(ValueError):  # never mistaken for an outage
        await store.hit("c", window=0)
    await store.aclose()


async def test_make_store_with_redis(redis_server: RedisServer) -> None:  # noqa: F811
    store = make_store(redis_server.url, timeout=TIMEOUT, namespace="node:")
    assert isinstance(store, FallbackStore)
    assert await store.incr("c", ttl=60) == 1
    assert redis_server.scan_keys() == ["node:c:{c}"]
    await store.aclose()


async def test_client_cpu_per_operation(redis_store: RedisStore) -> None:
    """One hit (EVALSHA) costs well under a millisecond of client CPU (~70 µs here)."""
    for _ in range(50):
        await redis_store.hit("warm", window=60)
    count = 1000
    cpu = time.process_time()
    for i in range(count):
        await redis_store.hit(f"rl:{i % 100}", window=60)
    per_op = (time.process_time() - cpu) / count
    print(f"client CPU per hit: {per_op * 1e6:.0f} µs")
    assert per_op < 0.001


def test_url_host_lists() -> None:
    from gateway.state_redis import _hosts

    assert _hosts("u:p%40ss@h1:1,[::1]:2,h3", 26379) == ("u", "p@ss", [
        ("h1", 1), ("::1", 2), ("h3", 26379)])
    assert _hosts(":pw@h", 6379) == (None, "pw", [("h", 6379)])
    with pytest.raises(ValueError):
        _hosts("u@", 6379)
