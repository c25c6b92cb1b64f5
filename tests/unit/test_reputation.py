"""Local IP reputation (filters/reputation.py): units, scores, bands, trust, the window.

This module also holds the fakes the limits and greylist tests share: a fake clock, an
exact in-memory `StateStore` on that clock, and a `FilterContext` builder.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from filters.base import Action, Outcome, Results, Stage
from filters.reputation import (
    REPUTATION_FACT,
    TARPIT_FACT,
    MailOutcome,
    ReputationCheck,
    ReputationSettings,
    Tally,
    aggregate,
    host_unit,
    is_trusted,
    lookup,
    network_unit,
    record_outcome,
    score,
)
from filters.state import StateStore
from gateway.pipeline import FilterContext, Pipeline

# -- shared fakes -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class StoreDown(Exception):
    """What a store raises in the tests when it is told to fail."""


class FakeStore:
    """An exact StateStore on a fake clock: windows keep every event (no approximation).

    An entry whose expiry is at or before now is gone (as in MemoryStore). `fail = True`
    makes every operation raise; `degraded` is settable.
    """

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.degraded = False
        self.fail = False
        self.counters: dict[str, tuple[int, float]] = {}
        self.events: dict[str, list[tuple[float, int]]] = {}
        self.sets: dict[str, dict[str, float]] = {}
        self.values: dict[str, tuple[str, float]] = {}

    def _now(self) -> float:
        if self.fail:
            raise StoreDown("store unreachable")
        return self.clock()

    async def incr(self, key: str, amount: int = 1, *, ttl: float) -> int:
        now = self._now()
        value, expires = self.counters.get(key, (0, now + ttl))
        if expires <= now:
            value, expires = 0, now + ttl
        self.counters[key] = (value + amount, expires)
        return value + amount

    async def get_counter(self, key: str) -> int:
        now = self._now()
        value, expires = self.counters.get(key, (0, now))
        return value if expires > now else 0

    async def hit(self, key: str, *, window: float, amount: int = 1) -> int:
        self.events.setdefault(key, []).append((self._now(), amount))
        return await self.window_count(key, window=window)

    async def window_count(self, key: str, *, window: float) -> int:
        now = self._now()
        return sum(n for t, n in self.events.get(key, ()) if t > now - window)

    async def set_add(self, key: str, member: str, *, ttl: float) -> None:
        self.sets.setdefault(key, {})[member] = self._now() + ttl

    async def set_contains(self, key: str, member: str) -> bool:
        return self.sets.get(key, {}).get(member, 0.0) > self._now()

    async def put(self, key: str, value: str, *, ttl: float, only_if_absent: bool = False
                  ) -> bool:
        now = self._now()
        if only_if_absent and await self.fetch(key) is not None:
            return False
        self.values[key] = (value, now + ttl)
        return True

    async def fetch(self, key: str) -> str | None:
        now = self._now()
        value, expires = self.values.get(key, ("", now))
        return value if expires > now else None

    async def delete(self, key: str) -> None:
        self._now()
        self.counters.pop(key, None)
        self.events.pop(key, None)
        self.sets.pop(key, None)
        self.values.pop(key, None)

    async def aclose(self) -> None:
        pass


def _typed(store: FakeStore) -> StateStore:
    return store  # mypy checks FakeStore against the Protocol here


@dataclass(frozen=True)
class FakeSession:
    client_ip: str = "192.0.2.10"
    session_id: str = "S1"
    client_port: int = 40000
    helo: str | None = "client.example.org"
    tls: bool = False


@dataclass(frozen=True)
class FakeRecipient:
    address: str
    lookup_key: str
    tenant: str = "acme"


@dataclass(frozen=True)
class FakeEnvelope:
    sender: str = ""
    recipients: Sequence[FakeRecipient] = ()
    current_recipient: FakeRecipient | None = None
    size: int = 0


@dataclass(frozen=True)
class FakeTenant:
    id: str = "acme"
    policy: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class FakeSettings:
    limits: Any = None
    reputation: Any = None
    greylist: Any = None


@dataclass
class FakeServices:
    state: Any = None
    settings: FakeSettings = field(default_factory=FakeSettings)


def done(value: Any) -> asyncio.Future[Any]:
    """A finished fact, as FilterContext keeps them."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def make_ctx(stage: Stage, services: Any, *, ip: str = "192.0.2.10", session_id: str = "S1",
             sender: str = "", recipient: str | None = None, lookup_key: str | None = None,
             tenant: FakeTenant | None = None, facts: Mapping[str, Any] | None = None,
             results: Results | None = None) -> tuple[FilterContext, Results]:
    results = results if results is not None else Results()
    for key, value in (facts or {}).items():
        results.facts[key] = done(value)
    current = None
    if recipient is not None:
        current = FakeRecipient(recipient, lookup_key or recipient.lower())
    envelope = FakeEnvelope(sender=sender, current_recipient=current,
                            recipients=() if current is None else (current,))
    ctx = FilterContext(stage, FakeSession(client_ip=ip, session_id=session_id), envelope,
                        tenant, None, services, results)
    return ctx, results


def outcomes(results: Results) -> list[Outcome]:
    return [e.outcome for e in results.entries]


# -- units ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ip", "v4", "v6", "expected"), [
    ("192.0.2.77", 32, 128, "192.0.2.77"),
    ("192.0.2.77", 24, 64, "192.0.2.0/24"),
    ("::ffff:192.0.2.77", 24, 64, "192.0.2.0/24"),  # IPv4-mapped counts as IPv4
    ("::ffff:192.0.2.77", 32, 128, "192.0.2.77"),
    ("2001:DB8:1:2:aaaa::1", 32, 128, "2001:db8:1:2:aaaa::1"),
    ("2001:db8:1:2:aaaa::1", 24, 64, "2001:db8:1:2::/64"),
    ("[2001:db8::1]", 24, 64, "2001:db8::/64"),
    ("unknown", 24, 64, "unknown"),
    ("", 24, 64, ""),
])
def test_aggregate(ip: str, v4: int, v6: int, expected: str) -> None:
    assert aggregate(ip, v4, v6) == expected


def test_host_and_network_units() -> None:
    assert host_unit("203.0.113.9") == "203.0.113.9"
    assert network_unit("203.0.113.9") == "203.0.113.0/24"
    assert host_unit("2001:db8::9") == "2001:db8::9"
    assert network_unit("2001:db8::9") == "2001:db8::/64"


# -- scores -----------------------------------------------------------------------------------

S = ReputationSettings()


@pytest.mark.parametrize(("tally", "expected"), [
    (Tally(), None),
    (Tally(accepted=9), None),  # below min_samples: unknown
    (Tally(accepted=10), 1.0),
    (Tally(accepted=5, rejected=5), 0.0),
    (Tally(rejected=10), -1.0),
    (Tally(accepted=10, spam=5), 1 - 2 * 10 / 20),  # a spam weighs two
    (Tally(accepted=10, virus=2), 0.0),  # a virus weighs five
    (Tally(accepted=1, spam=19), 1 - 2 * 38 / 39),
])
def test_score(tally: Tally, expected: float | None) -> None:
    result = score(tally, S)
    assert result == pytest.approx(expected) if expected is not None else result is None


def test_score_with_zero_weights_is_good() -> None:
    settings = ReputationSettings(rejected_weight=0)
    assert score(Tally(rejected=20), settings) == 1.0


tallies = st.builds(Tally, accepted=st.integers(0, 500), rejected=st.integers(0, 500),
                    spam=st.integers(0, 500), virus=st.integers(0, 500))


@given(tallies, st.sampled_from(["accepted", "rejected", "spam", "virus"]))
def test_score_is_bounded_and_monotonic(tally: Tally, more: str) -> None:
    """In [-1, 1]; one more accepted never lowers the score, one more bad never raises it."""
    before = score(tally, S)
    after = score(dataclasses.replace(tally, **{more: getattr(tally, more) + 1}), S)
    if before is None:
        return
    assert after is not None and -1.0 <= before <= 1.0 and -1.0 <= after <= 1.0
    if more == "accepted":
        assert after >= before - 1e-12
    else:
        assert after <= before + 1e-12


@pytest.mark.parametrize("kwargs", [
    {"window": 0}, {"min_samples": 0}, {"spam_weight": -1}, {"tarpit_seconds": -1},
    {"reject_below": -1.5}, {"trusted_above": 1.1},
])
def test_settings_are_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="reputation"):
        ReputationSettings(**kwargs)


# -- recording and looking up -----------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> FakeStore:
    return FakeStore(clock)


async def seed(store: FakeStore, ip: str, **counts: int) -> None:
    for outcome, n in counts.items():
        for _ in range(n):
            await record_outcome(_typed(store), ip, MailOutcome(outcome))


async def test_record_counts_host_and_network(store: FakeStore) -> None:
    await record_outcome(store, "192.0.2.10", MailOutcome.SPAM)
    await record_outcome(store, "192.0.2.11", "accepted")  # plain strings work too
    found = await lookup(store, "192.0.2.10")
    assert found.host == Tally(spam=1)
    assert found.network == Tally(accepted=1, spam=1)


async def test_record_ignores_non_ip_clients_and_refuses_unknown_outcomes(
        store: FakeStore) -> None:
    await record_outcome(store, "unknown", MailOutcome.SPAM)
    assert store.events == {}
    with pytest.raises(ValueError):
        await record_outcome(store, "192.0.2.1", "tempfailed")


async def test_host_tally_decides_when_big_enough(store: FakeStore) -> None:
    await seed(store, "192.0.2.10", accepted=10)
    await seed(store, "192.0.2.20", spam=40)
    found = await lookup(store, "192.0.2.10")
    assert (found.basis, found.score) == ("host", 1.0)


async def test_network_tally_decides_for_a_new_address(store: FakeStore) -> None:
    await seed(store, "192.0.2.20", spam=40)
    found = await lookup(store, "192.0.2.30")
    assert found.basis == "network" and found.score == -1.0
    elsewhere = await lookup(store, "192.0.3.30")
    assert (elsewhere.basis, elsewhere.score) == ("none", None)


async def test_ipv6_network_is_the_64(store: FakeStore) -> None:
    await seed(store, "2001:db8:1:2::1", spam=10)
    assert (await lookup(store, "2001:db8:1:2::ffff")).basis == "network"
    assert (await lookup(store, "2001:db8:1:3::1")).basis == "none"


async def test_history_slides_out_of_the_window(store: FakeStore, clock: FakeClock) -> None:
    await seed(store, "192.0.2.10", spam=20)
    clock.advance(S.window - 1)
    assert (await lookup(store, "192.0.2.10")).score == -1.0
    clock.advance(2)
    assert (await lookup(store, "192.0.2.10")).score is None


@pytest.mark.parametrize(("counts", "trusted"), [
    ({}, False),
    ({"accepted": 9}, False),  # too few samples
    ({"accepted": 10}, True),
    ({"accepted": 38, "rejected": 1}, True),  # 1 - 2/39 = 0.95
    ({"accepted": 18, "rejected": 1}, False),  # 1 - 2/19 = 0.89
    ({"accepted": 100, "virus": 3}, False),
])
async def test_is_trusted(store: FakeStore, counts: dict[str, int], trusted: bool) -> None:
    await seed(store, "198.51.100.7", **counts)
    assert await is_trusted(store, "198.51.100.7") is trusted


async def test_is_trusted_by_network_and_never_for_non_ip(store: FakeStore) -> None:
    await seed(store, "198.51.100.7", accepted=30)
    assert await is_trusted(store, "198.51.100.8")
    assert not await is_trusted(store, "unknown")


# -- the filter -------------------------------------------------------------------------------


@pytest.mark.parametrize(("counts", "action", "code", "tarpit", "outcome"), [
    ({}, Action.CONTINUE, None, None, Outcome.SKIP),
    ({"accepted": 10}, Action.CONTINUE, None, None, Outcome.PASS),
    ({"accepted": 10, "spam": 5}, Action.CONTINUE, None, None, Outcome.PASS),  # 0.0
    ({"accepted": 10, "spam": 6}, Action.CONTINUE, None, 10.0, Outcome.FAIL),  # -0.09
    ({"accepted": 10, "spam": 10}, Action.CONTINUE, None, 10.0, Outcome.FAIL),  # -0.33
    ({"accepted": 2, "spam": 10}, Action.TEMPFAIL, 451, None, Outcome.FAIL),  # -0.82
    ({"accepted": 3, "spam": 20}, Action.TEMPFAIL, 451, None, Outcome.FAIL),  # -0.86
    ({"accepted": 2, "spam": 20}, Action.REJECT, 554, None, Outcome.FAIL),  # -0.905
    ({"virus": 10}, Action.REJECT, 554, None, Outcome.FAIL),
])
async def test_bands(store: FakeStore, counts: dict[str, int], action: Action,
                     code: int | None, tarpit: float | None, outcome: Outcome) -> None:
    await seed(store, "192.0.2.10", **counts)
    ctx, results = make_ctx(Stage.CONNECT, FakeServices(state=store))
    verdict = await ReputationCheck().check(ctx)
    assert verdict.action is action
    assert (verdict.reply.code if verdict.reply else None) == code
    if verdict.reply is not None:
        assert verdict.reply.status in ("4.7.1", "5.7.1")
        assert "postmaster" in verdict.reply.text or code == 451
    assert ctx.fact(TARPIT_FACT) == tarpit
    assert ctx.fact(REPUTATION_FACT) is not None
    assert outcomes(results) == [outcome]


async def test_bands_follow_settings(store: FakeStore) -> None:
    await seed(store, "192.0.2.10", accepted=4, spam=3)  # 1 - 2*6/10 = -0.2
    settings = ReputationSettings(min_samples=5, tarpit_below=-1, tempfail_below=-0.1,
                                  reject_below=-1)
    ctx, _ = make_ctx(Stage.CONNECT,
                      FakeServices(state=store, settings=FakeSettings(reputation=settings)))
    assert (await ReputationCheck().check(ctx)).action is Action.TEMPFAIL


async def test_no_tarpit_when_its_delay_is_zero(store: FakeStore) -> None:
    await seed(store, "192.0.2.10", accepted=10, spam=10)  # -0.33: the tarpit band
    settings = ReputationSettings(tarpit_seconds=0)
    ctx, results = make_ctx(Stage.CONNECT,
                            FakeServices(state=store, settings=FakeSettings(reputation=settings)))
    assert (await ReputationCheck().check(ctx)).action is Action.CONTINUE
    assert ctx.fact(TARPIT_FACT) is None
    assert outcomes(results) == [Outcome.PASS]


@pytest.mark.parametrize(("services", "ip", "detail"), [
    (FakeServices(state=None), "192.0.2.10", "no state store"),
    (object(), "192.0.2.10", "no state store"),  # a node without state wired at all
    (None, "unknown", "not an IP client"),
])
async def test_skips_without_store_or_address(store: FakeStore, services: Any, ip: str,
                                              detail: str) -> None:
    ctx, results = make_ctx(Stage.CONNECT, services or FakeServices(state=store), ip=ip)
    assert (await ReputationCheck().check(ctx)).action is Action.CONTINUE
    assert [(e.outcome, e.detail) for e in results.entries] == [(Outcome.SKIP, detail)]


async def test_store_failure_continues_through_the_pipeline(store: FakeStore) -> None:
    store.fail = True
    ctx, results = make_ctx(Stage.CONNECT, FakeServices(state=store))
    result = await Pipeline({Stage.CONNECT: [ReputationCheck()]}).run(ctx)
    assert result.verdict.action is Action.CONTINUE
    assert outcomes(results) == [Outcome.ERROR]
