"""Per-client limits (filters/limits.py): concurrency, connection rate, messages, recipients."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from filters.base import Action, Outcome, Stage, Verdict
from filters.limits import (
    CONNECTION_RATE,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_MESSAGES,
    TOO_MANY_RECIPIENTS,
    ConnectionLimits,
    ConnectionTable,
    LimitSettings,
    client_unit,
)
from gateway.pipeline import Pipeline
from tests.unit.test_reputation import (
    FakeClock,
    FakeServices,
    FakeSession,
    FakeSettings,
    FakeStore,
    make_ctx,
    outcomes,
)

OFF = {"max_connections_per_ip": 0, "connection_rate_per_minute": 0,
       "messages_per_ip_per_hour": 0, "recipients_per_ip_per_hour": 0}


def limits(**kwargs: Any) -> LimitSettings:
    return LimitSettings(**{**OFF, **kwargs})


class Node:
    """One node's limits filter on a shared store, with a fake clock."""

    def __init__(self, store: FakeStore, settings: LimitSettings) -> None:
        self.filter = ConnectionLimits(clock=store.clock)
        self.services = FakeServices(state=store, settings=FakeSettings(limits=settings))
        self.sessions = 0

    async def connect(self, ip: str = "192.0.2.10", session_id: str | None = None
                      ) -> tuple[Verdict, str]:
        self.sessions += 1
        session_id = session_id or f"S{self.sessions}"
        ctx, _ = make_ctx(Stage.CONNECT, self.services, ip=ip, session_id=session_id)
        return await self.filter.check(ctx), session_id

    async def close(self, session_id: str) -> None:
        await self.filter.session_closed(FakeSession(session_id=session_id))

    async def stage(self, stage: Stage, ip: str = "192.0.2.10", session_id: str = "S1"
                    ) -> Verdict:
        ctx, _ = make_ctx(stage, self.services, ip=ip, session_id=session_id,
                          sender="s@remote.example", recipient="alice@example.test")
        return await self.filter.check(ctx)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> FakeStore:
    return FakeStore(clock)


# -- units and settings -----------------------------------------------------------------------


@pytest.mark.parametrize(("ip", "unit"), [
    ("192.0.2.10", "192.0.2.10"),
    ("::ffff:192.0.2.10", "192.0.2.10"),
    ("2001:db8:1:2::10", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::10", "2001:db8:1:3::/64"),
    ("unknown", "unknown"),
])
def test_client_unit(ip: str, unit: str) -> None:
    assert client_unit(ip) == unit


@pytest.mark.parametrize("kwargs", [
    {"max_connections_per_ip": -1}, {"connection_rate_per_minute": 1.5},
    {"messages_per_ip_per_hour": True}, {"recipients_per_ip_per_hour": -5},
    {"connection_lease": 0}, {"exempt": ("not-a-network",)},
])
def test_settings_are_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="limits"):
        LimitSettings(**kwargs)


def test_defaults_are_on_and_generous() -> None:
    s = LimitSettings()
    assert s.max_connections_per_ip >= 10 and s.connection_rate_per_minute >= 60
    assert s.messages_per_ip_per_hour > 0 and s.recipients_per_ip_per_hour > 0


def test_replies() -> None:
    assert (TOO_MANY_CONNECTIONS.code, TOO_MANY_CONNECTIONS.status) == (421, "4.7.0")
    assert (CONNECTION_RATE.code, CONNECTION_RATE.status) == (421, "4.7.0")
    assert (TOO_MANY_MESSAGES.code, TOO_MANY_MESSAGES.status) == (451, "4.7.1")
    assert (TOO_MANY_RECIPIENTS.code, TOO_MANY_RECIPIENTS.status) == (451, "4.7.1")
    assert "Too many connections from your host" in TOO_MANY_CONNECTIONS.text
    assert TOO_MANY_MESSAGES.text == "Too many messages from your host, slow down"
    assert TOO_MANY_RECIPIENTS.text == "Too many recipients from your host, slow down"


def test_filter_contract() -> None:
    assert ConnectionLimits.name == "limits"
    assert ConnectionLimits.stages == {Stage.CONNECT, Stage.MAIL, Stage.RCPT}
    assert ConnectionLimits.on_error is Action.CONTINUE
    Pipeline.from_names({"connect": ["limits"], "mail": ["limits"], "rcpt": ["limits"]},
                        {"limits": ConnectionLimits})


# -- concurrent connections (node-local) -------------------------------------------------------


async def test_concurrency_limit_and_release(store: FakeStore) -> None:
    node = Node(store, limits(max_connections_per_ip=2))
    (v1, s1), (v2, _) = await node.connect(), await node.connect()
    assert v1.action is v2.action is Action.CONTINUE
    refused, s3 = await node.connect()
    assert (refused.action, refused.reply) == (Action.TEMPFAIL, TOO_MANY_CONNECTIONS)
    await node.close(s3)  # a refused session's disconnect changes nothing
    assert (await node.connect())[0].reply == TOO_MANY_CONNECTIONS
    await node.close(s1)
    await node.close(s1)  # idempotent
    assert (await node.connect())[0].action is Action.CONTINUE
    assert (await node.connect())[0].reply == TOO_MANY_CONNECTIONS


@pytest.mark.parametrize(("first", "second", "shared"), [
    ("192.0.2.10", "192.0.2.10", True),
    ("192.0.2.10", "192.0.2.11", False),
    ("2001:db8:1:2::1", "2001:db8:1:2::2", True),  # one /64 is one client
    ("2001:db8:1:2::1", "2001:db8:1:3::1", False),
    ("192.0.2.10", "::ffff:192.0.2.10", True),
])
async def test_concurrency_is_per_client_unit(store: FakeStore, first: str, second: str,
                                              shared: bool) -> None:
    node = Node(store, limits(max_connections_per_ip=1))
    assert (await node.connect(first))[0].action is Action.CONTINUE
    verdict, _ = await node.connect(second)
    assert verdict.action is (Action.TEMPFAIL if shared else Action.CONTINUE)


async def test_concurrency_is_per_node(store: FakeStore) -> None:
    a, b = Node(store, limits(max_connections_per_ip=1)), Node(store, limits(
        max_connections_per_ip=1))
    assert (await a.connect())[0].action is Action.CONTINUE
    assert (await b.connect())[0].action is Action.CONTINUE
    assert (await a.connect())[0].action is Action.TEMPFAIL


async def test_missed_disconnect_expires_and_activity_renews(store: FakeStore,
                                                             clock: FakeClock) -> None:
    node = Node(store, limits(max_connections_per_ip=2, connection_lease=600))
    _, busy = await node.connect()
    _, lost = await node.connect()
    clock.advance(500)
    assert (await node.stage(Stage.MAIL, session_id=busy)).action is Action.CONTINUE
    clock.advance(200)  # `lost` was last seen 700 s ago, `busy` 200 s ago
    assert node.filter.connections.count("192.0.2.10") == 1
    assert (await node.connect())[0].action is Action.CONTINUE
    assert (await node.connect())[0].action is Action.TEMPFAIL
    assert lost not in node.filter.connections._unit_of


def test_table_forgets_units_without_sessions(clock: FakeClock) -> None:
    table = ConnectionTable(clock)
    table.acquire("u", "S1", 10)
    table.acquire("u", "S1", 10)  # re-acquiring the same session counts once
    assert (table.count("u"), len(table)) == (1, 1)
    table.release("S1")
    assert table._by_unit == {} and len(table) == 0
    table.acquire("u", "S2", 10)
    clock.advance(10)
    assert table.count("u") == 0 and table._by_unit == {}


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 7)), max_size=60),
       st.integers(1, 4))
async def test_concurrency_matches_a_model(ops: list[tuple[bool, int]], limit: int) -> None:
    """Connect/close in any order: refused exactly when `limit` sessions are open."""
    node = Node(FakeStore(FakeClock()), limits(max_connections_per_ip=limit))
    open_sessions: set[str] = set()
    for is_connect, n in ops:
        session_id = f"S{n}"
        if is_connect and session_id not in open_sessions:
            verdict, _ = await node.connect(session_id=session_id)
            if len(open_sessions) >= limit:
                assert verdict.reply == TOO_MANY_CONNECTIONS
            else:
                assert verdict.action is Action.CONTINUE
                open_sessions.add(session_id)
        elif not is_connect:
            await node.close(session_id)
            open_sessions.discard(session_id)
        assert len(node.filter.connections) == len(open_sessions) <= limit


# -- connection rate (cluster-wide) ------------------------------------------------------------


async def test_connection_rate_is_cluster_wide_and_slides(store: FakeStore,
                                                          clock: FakeClock) -> None:
    settings = limits(connection_rate_per_minute=3, max_connections_per_ip=10)
    a, b = Node(store, settings), Node(store, settings)
    for node in (a, b, a):
        assert (await node.connect())[0].action is Action.CONTINUE
        clock.advance(10)
    refused, _ = await b.connect()
    assert (refused.action, refused.reply) == (Action.TEMPFAIL, CONNECTION_RATE)
    assert len(b.filter.connections) == 1  # a refused connection takes no lease
    clock.advance(31)  # t=61: the first connection (at t=0) has left the minute
    assert (await a.connect())[0].action is Action.CONTINUE  # refused ones never counted
    assert (await a.connect())[0].action is Action.TEMPFAIL


async def test_connection_rate_aggregates_ipv6(store: FakeStore) -> None:
    node = Node(store, limits(connection_rate_per_minute=1))
    assert (await node.connect("2001:db8::1"))[0].action is Action.CONTINUE
    assert (await node.connect("2001:db8::2"))[0].reply == CONNECTION_RATE
    assert (await node.connect("2001:db8:0:1::2"))[0].action is Action.CONTINUE


# -- messages and recipients -------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "setting", "reply"), [
    (Stage.MAIL, "messages_per_ip_per_hour", TOO_MANY_MESSAGES),
    (Stage.RCPT, "recipients_per_ip_per_hour", TOO_MANY_RECIPIENTS),
])
async def test_hourly_rates(store: FakeStore, clock: FakeClock, stage: Stage, setting: str,
                            reply: Any) -> None:
    node = Node(store, limits(**{setting: 3}))
    for _ in range(3):
        assert (await node.stage(stage)).action is Action.CONTINUE
        clock.advance(60)
    refused = await node.stage(stage)
    assert (refused.action, refused.reply) == (Action.TEMPFAIL, reply)
    assert (await node.stage(stage, ip="192.0.2.11")).action is Action.CONTINUE
    clock.advance(3600 - 180 - 1)  # the first event is one second short of an hour old
    assert (await node.stage(stage)).action is Action.TEMPFAIL
    clock.advance(1)  # it leaves the hour; the refused attempts were never counted
    assert (await node.stage(stage)).action is Action.CONTINUE
    assert (await node.stage(stage)).action is Action.TEMPFAIL


async def test_a_fast_client_still_gets_its_limit_through(store: FakeStore,
                                                          clock: FakeClock) -> None:
    """Twice as many attempts as allowed, for hours: half get through, every hour."""
    node = Node(store, limits(messages_per_ip_per_hour=60))
    admitted = 0
    for _ in range(6 * 120):  # six hours, one attempt every 30 s
        admitted += (await node.stage(Stage.MAIL)).action is Action.CONTINUE
        clock.advance(30)
    assert admitted == 6 * 60


async def test_messages_and_recipients_count_separately(store: FakeStore) -> None:
    node = Node(store, limits(messages_per_ip_per_hour=1, recipients_per_ip_per_hour=2))
    assert (await node.stage(Stage.MAIL)).action is Action.CONTINUE
    assert (await node.stage(Stage.RCPT)).action is Action.CONTINUE
    assert (await node.stage(Stage.RCPT)).action is Action.CONTINUE
    assert (await node.stage(Stage.RCPT)).reply == TOO_MANY_RECIPIENTS
    assert (await node.stage(Stage.MAIL)).reply == TOO_MANY_MESSAGES


# -- off, exempt, no store, errors -------------------------------------------------------------


@pytest.mark.parametrize("stage", [Stage.CONNECT, Stage.MAIL, Stage.RCPT])
async def test_zero_switches_limits_off(store: FakeStore, stage: Stage) -> None:
    node = Node(store, limits())
    for _ in range(50):
        assert (await node.stage(stage, session_id="S1")).action is Action.CONTINUE
    assert store.events == {}


@pytest.mark.parametrize("stage", [Stage.CONNECT, Stage.MAIL, Stage.RCPT])
async def test_exempt_networks(store: FakeStore, stage: Stage) -> None:
    settings = LimitSettings(max_connections_per_ip=1, connection_rate_per_minute=1,
                             messages_per_ip_per_hour=1, recipients_per_ip_per_hour=1,
                             exempt=("192.0.2.0/28", "2001:db8::/32"))
    node = Node(store, settings)
    for ip in ("192.0.2.1", "192.0.2.1", "2001:db8::1", "::ffff:192.0.2.2"):
        ctx, results = make_ctx(stage, node.services, ip=ip)
        assert (await node.filter.check(ctx)).action is Action.CONTINUE
        assert outcomes(results) == [Outcome.SKIP]
    assert (await node.stage(stage, ip="192.0.2.100")).action is Action.CONTINUE
    assert (await node.stage(stage, ip="192.0.2.100", session_id="S2")).action is \
        Action.TEMPFAIL


async def test_defaults_apply_when_no_settings_are_wired(store: FakeStore) -> None:
    ctx, results = make_ctx(Stage.CONNECT, FakeServices(state=store))
    assert (await ConnectionLimits().check(ctx)).action is Action.CONTINUE
    assert outcomes(results) == [Outcome.PASS]
    assert list(store.events) == ["lim:conn:192.0.2.10"]
    assert len(store.events["lim:conn:192.0.2.10"]) == 1


async def test_without_a_store_only_node_local_limits_apply() -> None:
    services = FakeServices(state=None, settings=FakeSettings(limits=limits(
        max_connections_per_ip=1, connection_rate_per_minute=1, messages_per_ip_per_hour=1)))
    filt = ConnectionLimits()
    ctx, _ = make_ctx(Stage.CONNECT, services, session_id="S1")
    assert (await filt.check(ctx)).action is Action.CONTINUE
    ctx, _ = make_ctx(Stage.CONNECT, services, session_id="S2")
    assert (await filt.check(ctx)).reply == TOO_MANY_CONNECTIONS
    ctx, results = make_ctx(Stage.MAIL, services)
    assert (await filt.check(ctx)).action is Action.CONTINUE
    assert outcomes(results) == [Outcome.SKIP]


@pytest.mark.parametrize("stage", [Stage.CONNECT, Stage.MAIL, Stage.RCPT])
async def test_store_failure_fails_open_through_the_pipeline(store: FakeStore,
                                                             stage: Stage) -> None:
    store.fail = True
    node = Node(store, LimitSettings())
    ctx, results = make_ctx(stage, node.services)
    result = await Pipeline({stage: [node.filter]}).run(ctx)
    assert result.verdict.action is Action.CONTINUE
    assert outcomes(results) == [Outcome.ERROR]
