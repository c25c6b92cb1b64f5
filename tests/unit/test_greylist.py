"""Greylisting (filters/greylist.py): the triplet's life, exemptions, trust, fail-open."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filters.base import Action, Outcome, Results, Stage, Verdict
from filters.greylist import GREYLISTED, Greylist, GreylistSettings, triplet_hash
from filters.reputation import MailOutcome, record_outcome
from gateway.pipeline import Pipeline
from tests.unit.test_reputation import (
    FakeClock,
    FakeServices,
    FakeSettings,
    FakeStore,
    FakeTenant,
    make_ctx,
    outcomes,
)

ON = FakeTenant("acme", {"greylisting": True})
OFF = FakeTenant("globex", {"greylisting": False})
DELAY, WINDOW, PASS_TTL = 300.0, 86400.0, 86400.0 * 36


def memory_store(clock: FakeClock) -> Any:
    module = importlib.import_module("gateway.state_memory")
    return module.MemoryStore(clock)


# The triplet logic runs against the exact fake and, when it is there, the node's own
# MemoryStore (same expiry rule: an entry is gone at its expiry).
STORES: dict[str, Callable[[FakeClock], Any]] = {"fake": FakeStore}
if importlib.util.find_spec("gateway.state_memory") is not None:
    STORES["memory"] = memory_store


@dataclass(frozen=True)
class Spf:
    result: str
    domain: str


@dataclass(frozen=True)
class Dnsbl:
    listed: bool = False
    allowlisted: bool = False


class Mta:
    """Delivery attempts from one client through the greylist filter."""

    def __init__(self, store: Any, greylist: GreylistSettings | None = None) -> None:
        self.store = store
        self.services = FakeServices(state=store, settings=FakeSettings(greylist=greylist))

    async def attempt(self, *, ip: str = "192.0.2.10", sender: str = "bob@remote.example",
                      rcpt: str = "alice@example.test", lookup_key: str | None = None,
                      tenant: FakeTenant | None = ON, facts: Mapping[str, Any] | None = None
                      ) -> tuple[Verdict, Results]:
        ctx, results = make_ctx(Stage.RCPT, self.services, ip=ip, sender=sender,
                                recipient=rcpt, lookup_key=lookup_key, tenant=tenant,
                                facts=facts)
        return await Greylist().check(ctx), results


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=list(STORES))
def store(request: pytest.FixtureRequest, clock: FakeClock) -> Any:
    return STORES[request.param](clock)


@pytest.fixture
def mta(store: Any) -> Mta:
    return Mta(store)


def deferred(verdict: Verdict) -> bool:
    return verdict.action is Action.TEMPFAIL and verdict.reply == GREYLISTED


def passed(verdict: Verdict) -> bool:
    return verdict.action is Action.CONTINUE


def test_reply_and_contract() -> None:
    assert str(GREYLISTED) == "451 4.7.1 Greylisted, please try again later"
    assert Greylist.name == "greylist" and Greylist.stages == {Stage.RCPT}
    assert Greylist.on_error is Action.CONTINUE


@pytest.mark.parametrize("kwargs", [
    {"delay": -1}, {"delay": 600, "retry_window": 600}, {"pass_ttl": 0},
])
def test_settings_are_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="greylist"):
        GreylistSettings(**kwargs)


# -- the life of a triplet --------------------------------------------------------------------

# (seconds to wait before the attempt, deferred?) from the first attempt on.
LIVES: dict[str, list[tuple[float, bool]]] = {
    "retry in time passes, and is remembered": [
        (0, True), (DELAY, False), (3600, False), (PASS_TTL - 1, False)],
    "too early, again too early, then in time": [
        (0, True), (60, True), (DELAY - 61, True), (1, False)],
    "too early does not restart the clock": [(0, True), (DELAY - 1, True), (1, False)],
    "retry after the window starts over": [
        (0, True), (WINDOW, True), (DELAY - 1, True), (1, False)],
    "the pass is forgotten after pass_ttl without mail": [
        (0, True), (DELAY, False), (PASS_TTL, True)],
    "each passing message refreshes the pass": [
        (0, True), (DELAY, False), (PASS_TTL - 10, False), (PASS_TTL - 10, False)],
}


@pytest.mark.parametrize("life", list(LIVES))
async def test_triplet_life(mta: Mta, clock: FakeClock, life: str) -> None:
    for step, (wait, expect_deferred) in enumerate(LIVES[life]):
        clock.advance(wait)
        verdict, results = await mta.attempt()
        assert deferred(verdict) is expect_deferred, f"step {step}"
        assert passed(verdict) is not expect_deferred
        assert outcomes(results) == [Outcome.FAIL if expect_deferred else Outcome.PASS]


async def test_settings_change_the_timing(store: Any, clock: FakeClock) -> None:
    mta = Mta(store, GreylistSettings(delay=10, retry_window=60, pass_ttl=120))
    assert deferred((await mta.attempt())[0])
    clock.advance(9)
    assert deferred((await mta.attempt())[0])
    clock.advance(1)
    assert passed((await mta.attempt())[0])
    clock.advance(120)
    assert deferred((await mta.attempt())[0])


async def test_zero_delay_passes_the_first_retry(store: Any) -> None:
    mta = Mta(store, GreylistSettings(delay=0))
    assert deferred((await mta.attempt())[0])
    assert passed((await mta.attempt())[0])


# -- what makes a triplet ----------------------------------------------------------------------


@pytest.mark.parametrize(("retry", "same"), [
    ({}, True),
    ({"sender": "BOB@Remote.Example"}, True),  # the sender is lowercased
    ({"ip": "192.0.2.200"}, True),  # same /24
    ({"ip": "::ffff:192.0.2.99"}, True),
    ({"ip": "192.0.3.10"}, False),
    ({"sender": "eve@remote.example"}, False),
    ({"rcpt": "Alice@example.test", "lookup_key": "alice@example.test"}, True),
    ({"rcpt": "bob@example.test"}, False),
])
async def test_triplet_components(mta: Mta, clock: FakeClock, retry: dict[str, Any],
                                  same: bool) -> None:
    assert deferred((await mta.attempt())[0])
    clock.advance(DELAY)
    assert passed((await mta.attempt(**retry))[0]) is same


async def test_ipv6_triplets_use_the_64(mta: Mta, clock: FakeClock) -> None:
    assert deferred((await mta.attempt(ip="2001:db8:1:2::25"))[0])
    clock.advance(DELAY)
    assert passed((await mta.attempt(ip="2001:db8:1:2::26"))[0])
    assert deferred((await mta.attempt(ip="2001:db8:1:3::25"))[0])


def test_triplet_hash_is_fixed_length_and_separates_fields() -> None:
    assert len(triplet_hash("192.0.2.0/24", "a" * 500 + "@x", "r@y")) == 32
    assert triplet_hash("n", "ab@c", "d") != triplet_hash("n", "a", "b@cd")
    assert triplet_hash("n", "A@B", "R@Y") == triplet_hash("n", "a@b", "r@y")


# -- SPF ---------------------------------------------------------------------------------------

SPF_PASS = {"spf": Spf("pass", "remote.example")}


async def test_spf_pass_makes_the_domain_the_client(mta: Mta, clock: FakeClock) -> None:
    """A big provider retries from another network: the SPF-passing domain still matches."""
    assert deferred((await mta.attempt(ip="192.0.2.10", facts=SPF_PASS))[0])
    clock.advance(DELAY)
    assert passed((await mta.attempt(ip="198.51.100.20", facts=SPF_PASS))[0])


async def test_spf_domain_seen_passing_skips_greylisting(mta: Mta, clock: FakeClock) -> None:
    assert deferred((await mta.attempt(facts=SPF_PASS))[0])
    clock.advance(DELAY)
    assert passed((await mta.attempt(facts=SPF_PASS))[0])
    verdict, results = await mta.attempt(rcpt="dave@example.test", sender="x@remote.example",
                                         ip="203.0.113.5", facts=SPF_PASS)
    assert passed(verdict)
    assert "known domain remote.example" in results.entries[0].detail
    # Without an SPF pass the same domain is greylisted like anyone.
    for spf in (None, Spf("softfail", "remote.example"), Spf("temperror", "remote.example")):
        verdict, _ = await mta.attempt(rcpt="dave@example.test", ip="203.0.113.5",
                                       facts={"spf": spf})
        assert deferred(verdict)
    # Nor does another domain profit from it.
    other = {"spf": Spf("pass", "other.example")}
    assert deferred((await mta.attempt(sender="y@other.example", facts=other))[0])


async def test_spf_domain_memory_expires(mta: Mta, clock: FakeClock) -> None:
    assert deferred((await mta.attempt(facts=SPF_PASS))[0])
    clock.advance(DELAY)
    assert passed((await mta.attempt(facts=SPF_PASS))[0])
    clock.advance(PASS_TTL)
    assert deferred((await mta.attempt(rcpt="dave@example.test", facts=SPF_PASS))[0])


# -- exemptions and trust -----------------------------------------------------------------------


@pytest.mark.parametrize(("attempt", "outcome"), [
    ({"tenant": OFF}, Outcome.SKIP),
    ({"tenant": None}, Outcome.SKIP),
    ({"tenant": FakeTenant("x", {})}, Outcome.SKIP),
    ({"sender": ""}, Outcome.SKIP),
    ({"rcpt": "postmaster@example.test"}, Outcome.SKIP),
    ({"rcpt": "Postmaster", "lookup_key": "postmaster@example.test"}, Outcome.SKIP),
    ({"rcpt": "Abuse@Example.TEST", "lookup_key": "abuse@example.test"}, Outcome.SKIP),
    # postmaster@ as an alias of a mailbox: the given address counts
    ({"rcpt": "postmaster@example.test", "lookup_key": "alice@example.test"}, Outcome.SKIP),
    ({"facts": {"allowlisted": True}}, Outcome.SKIP),
    ({"facts": {"allowlisted": Dnsbl(allowlisted=True)}}, Outcome.SKIP),
    ({"facts": {"dnsbl": Dnsbl(allowlisted=True)}}, Outcome.SKIP),
])
async def test_exempt(mta: Mta, attempt: dict[str, Any], outcome: Outcome) -> None:
    for _ in range(3):
        verdict, results = await mta.attempt(**attempt)
        assert passed(verdict)
        assert outcomes(results) == [outcome]


@pytest.mark.parametrize("facts", [
    {"allowlisted": False}, {"allowlisted": None}, {"allowlisted": "yes"},
    {"dnsbl": Dnsbl(listed=True)}, {"dnsbl": None}, {"dnsbl": object()},
    {"dnsbl": {"allowlisted": True}},  # not the fact's shape: ignored, never an error
])
async def test_not_exempt(mta: Mta, facts: dict[str, Any]) -> None:
    assert deferred((await mta.attempt(facts=facts))[0])


async def test_good_local_reputation_skips(mta: Mta, store: Any) -> None:
    for _ in range(20):
        await record_outcome(store, "192.0.2.10", MailOutcome.ACCEPTED)
    verdict, results = await mta.attempt()
    assert passed(verdict)
    assert [(e.outcome, e.detail) for e in results.entries] == [
        (Outcome.PASS, "good local reputation")]
    for _ in range(20):
        await record_outcome(store, "198.51.100.1", MailOutcome.SPAM)
    assert deferred((await mta.attempt(ip="198.51.100.1"))[0])


# -- fail open ---------------------------------------------------------------------------------


async def test_degraded_store_passes(clock: FakeClock) -> None:
    store = FakeStore(clock)
    store.degraded = True
    verdict, results = await Mta(store).attempt()
    assert passed(verdict) and outcomes(results) == [Outcome.SKIP]
    assert store.values == {}


async def test_no_store_passes() -> None:
    verdict, _ = await Mta(None).attempt()
    assert passed(verdict)


async def test_store_failure_passes_through_the_pipeline(clock: FakeClock) -> None:
    store = FakeStore(clock)
    store.fail = True
    ctx, results = make_ctx(Stage.RCPT, FakeServices(state=store), sender="b@remote.example",
                            recipient="alice@example.test", tenant=ON)
    result = await Pipeline({Stage.RCPT: [Greylist()]}).run(ctx)
    assert result.verdict.action is Action.CONTINUE
    assert outcomes(results) == [Outcome.ERROR]


# -- property: never before the delay ------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(waits=st.lists(st.one_of(st.integers(0, 400), st.integers(0, 2 * 86400)),
                      min_size=1, max_size=12),
       delay=st.integers(0, 600), store_kind=st.sampled_from(list(STORES)))
async def test_never_passes_before_the_delay(waits: list[int], delay: int,
                                             store_kind: str) -> None:
    """Any retry schedule: deferred exactly when a model of greylisting says so, and in
    particular never passed less than `delay` seconds after its triplet's first attempt."""
    clock = FakeClock()
    config = GreylistSettings(delay=delay, retry_window=3600, pass_ttl=86400)
    mta = Mta(STORES[store_kind](clock), config)
    first: float | None = None  # first attempt of the pending triplet
    passed_at: float | None = None  # last passing message
    for wait in waits:
        clock.advance(wait)
        now = clock.now
        verdict, _ = await mta.attempt()
        if passed_at is not None and now - passed_at < config.pass_ttl:
            expect_pass = True
        elif first is None or now - first >= config.retry_window:
            first, expect_pass = now, False
        else:
            expect_pass = now - first >= config.delay
        assert passed(verdict) is expect_pass
        if expect_pass:
            assert passed_at is not None or (first is not None and now - first >= delay)
            passed_at, first = now, None
