"""tenant_api_client.cache: TTL, single-flight, negative entries, stale-if-error, ETag
revalidation, circuit breaker, LRU, counters, rate-limited logs and credential keys.

Time is a fake clock moved by hand; fetches are scripted (`Scripted` answers at once,
`Source` waits until the test answers each call). No real sleeps.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from tenant_api_client.cache import (
    AsyncCache,
    BreakerState,
    CachePolicy,
    CacheStats,
    CircuitBreaker,
    Fetched,
    NotModified,
    RateLimitedLog,
    credential_key,
)
from tenant_api_client.errors import InvalidResponse, Unavailable

Answer = Fetched[str] | NotModified
T0 = 1000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Scripted:
    """A fetch function answering from a script at once; the last answer repeats."""

    def __init__(self, *results: Answer | Exception) -> None:
        self.results = list(results)
        self.etags: list[str | None] = []

    async def __call__(self, etag: str | None) -> Answer:
        self.etags.append(etag)
        result = self.results.pop(0) if len(self.results) > 1 else self.results[0]
        if isinstance(result, Exception):
            raise result
        return result

    @property
    def count(self) -> int:
        return len(self.etags)


@dataclass
class Call:
    etag: str | None
    answer: asyncio.Future[Answer]

    def reply(self, result: Answer) -> None:
        self.answer.set_result(result)

    def fail(self, exc: Exception | None = None) -> None:
        self.answer.set_exception(exc if exc is not None else Unavailable("connection refused"))


class Source:
    """A fetch function whose calls wait until the test answers them."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    async def __call__(self, etag: str | None) -> Answer:
        call = Call(etag, asyncio.get_running_loop().create_future())
        self.calls.append(call)
        return await call.answer


async def pump(rounds: int = 10) -> None:
    """Let ready tasks run (no time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


POLICY = CachePolicy(default_ttl=30, max_ttl=300, negative_ttl=60, stale_if_error=3600,
                     max_entries=100, retry_interval=5)


def make(policy: CachePolicy = POLICY, *, breaker: CircuitBreaker | None = None,
         clock: FakeClock | None = None,
         name: str = "recipient") -> tuple[AsyncCache[str, str], FakeClock]:
    clock = clock if clock is not None else FakeClock()
    return AsyncCache(name, policy, clock=clock, breaker=breaker), clock


# -- hits, TTL --------------------------------------------------------------------------


async def test_fresh_hit_does_not_fetch() -> None:
    cache, clock = make()
    src = Scripted(Fetched("v1"))
    assert await cache.get("k", src) == "v1"
    clock.advance(29.5)
    assert await cache.get("k", src) == "v1"
    assert src.count == 1
    c = cache.counters
    assert (c.misses, c.hits, c.fetches) == (1, 1, 1)


@pytest.mark.parametrize(
    ("ttl", "negative", "lifetime"),
    [
        (None, False, 30),  # no max-age: default_ttl
        (10, False, 10),
        (300, False, 300),
        (10_000, False, 300),  # capped by max_ttl
        (math.inf, False, 300),
        (0, False, 0),  # no-store
        (-1, False, 0),
        (math.nan, False, 0),
        (None, True, 60),  # negative: negative_ttl
        (5, True, 5),  # ... or less when the server asks for less
        (3600, True, 60),  # ... never more
        (0, True, 0),
    ],
)
async def test_lifetime_of_an_answer(ttl: float | None, negative: bool, lifetime: float) -> None:
    cache, clock = make()
    src = Scripted(Fetched("v", ttl=ttl, negative=negative))
    assert await cache.get("k", src) == "v"
    assert len(cache) == (1 if lifetime else 0)
    if lifetime:
        clock.now = T0 + lifetime - 0.001
        assert await cache.get("k", src) == "v"
        assert src.count == 1
    clock.now = T0 + lifetime
    await cache.get("k", src)
    assert src.count == 2


async def test_no_store_replaces_an_older_entry() -> None:
    cache, clock = make()
    src = Scripted(Fetched("v1"), Fetched("v2", ttl=0), Unavailable("down"))
    await cache.get("k", src)
    clock.advance(30)
    assert await cache.get("k", src) == "v2"
    assert len(cache) == 0
    with pytest.raises(Unavailable):  # v1 is superseded: not served stale
        await cache.get("k", src)


# -- single-flight and cancellation -----------------------------------------------------


@pytest.mark.parametrize("outcome", ["value", "no-store", "unavailable", "bug"])
async def test_concurrent_callers_share_one_fetch(outcome: str) -> None:
    cache, _ = make()
    src = Source()
    callers = [asyncio.create_task(cache.get("k", src)) for _ in range(10)]
    await pump()
    assert len(src.calls) == 1
    call = src.calls[0]
    if outcome == "value":
        call.reply(Fetched("v"))
    elif outcome == "no-store":
        call.reply(Fetched("v", ttl=0))
    elif outcome == "unavailable":
        call.fail()
    else:
        call.fail(RuntimeError("bug in the client"))
    results = await asyncio.gather(*callers, return_exceptions=True)
    expected: type[BaseException] | str = {
        "unavailable": Unavailable, "bug": RuntimeError}.get(outcome, "v")
    for result in results:
        if isinstance(expected, str):
            assert result == expected
        else:
            assert isinstance(result, expected)
    # Only a stored value saves the next fetch.
    after = asyncio.create_task(cache.get("k", src))
    await pump()
    assert len(src.calls) == (1 if outcome == "value" else 2)
    if not after.done():
        src.calls[-1].reply(Fetched("v"))
    assert await after == "v"


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch() -> None:
    cache, _ = make()
    src = Source()
    first = asyncio.create_task(cache.get("k", src))
    second = asyncio.create_task(cache.get("k", src))
    await pump()
    first.cancel()
    await pump()
    assert first.cancelled()
    assert not src.calls[0].answer.cancelled()
    src.calls[0].reply(Fetched("v"))
    assert await second == "v"
    assert len(src.calls) == 1


@pytest.mark.parametrize("fails", [False, True])
async def test_a_fetch_whose_callers_all_left_still_completes(
        fails: bool, caplog: pytest.LogCaptureFixture) -> None:
    cache, _ = make()
    src = Source()
    caller = asyncio.create_task(cache.get("k", src))
    await pump()
    caller.cancel()
    await pump()
    if fails:
        src.calls[0].fail()
    else:
        src.calls[0].reply(Fetched("v"))
    await pump()
    gc.collect()
    assert "never retrieved" not in caplog.text
    assert len(cache) == (0 if fails else 1)
    if not fails:
        assert await cache.get("k", src) == "v"  # warm: no new fetch
        assert len(src.calls) == 1


async def test_aclose_cancels_fetches_and_callers_get_unavailable() -> None:
    cache, _ = make()
    src = Source()
    caller = asyncio.create_task(cache.get("k", src))
    await pump()
    await cache.aclose()
    with pytest.raises(Unavailable):
        await caller
    assert src.calls[0].answer.cancelled()


# -- negative entries -------------------------------------------------------------------


async def test_negative_entry_is_served_fresh_and_never_stale() -> None:
    cache, clock = make()  # stale_if_error is an hour: it must not apply
    src = Scripted(Fetched("unknown", negative=True), Unavailable("down"))
    assert await cache.get("nobody", src) == "unknown"
    clock.now = T0 + 59.9
    assert await cache.get("nobody", src) == "unknown"
    assert cache.counters.negative_hits == 1
    clock.now = T0 + 60
    with pytest.raises(Unavailable):
        await cache.get("nobody", src)
    assert cache.counters.stale_serves == 0
    assert cache.counters.unavailable == 1


async def test_negative_answer_replaces_a_positive_one() -> None:
    cache, clock = make()
    src = Scripted(Fetched("alice"), Fetched("unknown", negative=True), Unavailable("down"))
    await cache.get("k", src)
    clock.advance(30)
    assert await cache.get("k", src) == "unknown"
    clock.advance(60)
    with pytest.raises(Unavailable):  # the older positive answer is gone, not stale
        await cache.get("k", src)


# -- stale-if-error ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stale_if_error", "past_expiry", "served"),
    [
        (3600, 0, True),
        (3600, 1, True),
        (3600, 3599.5, True),
        (3600, 3600, False),  # the window is [expiry, expiry + stale_if_error)
        (3600, 86400, False),
        (0, 0, False),  # 0: never stale
        (0, 10, False),
    ],
)
async def test_stale_if_error_window(stale_if_error: float, past_expiry: float,
                                     served: bool) -> None:
    policy = CachePolicy(default_ttl=30, max_ttl=300, stale_if_error=stale_if_error)
    cache, clock = make(policy)
    src = Scripted(Fetched("v1"), Unavailable("down"))
    await cache.get("k", src)
    clock.now = T0 + 30 + past_expiry
    if served:
        assert await cache.get("k", src) == "v1"
        assert cache.counters.stale_serves == 1
    else:
        with pytest.raises(Unavailable) as info:
            await cache.get("k", src)
        assert isinstance(info.value.__cause__, Unavailable)
        assert cache.counters.stale_serves == 0
    assert src.count == 2


async def test_while_serving_stale_a_key_is_refetched_once_per_retry_interval() -> None:
    cache, clock = make()
    down = Unavailable("down")
    src = Scripted(Fetched("v1"), down, down, Fetched("v2"))
    await cache.get("k", src)
    clock.now = T0 + 30
    steps = [  # (seconds after expiry, expected value, fetches so far)
        (0, "v1", 2),  # refetch fails: stale
        (1, "v1", 2),  # within retry_interval: stale without asking
        (4.9, "v1", 2),
        (5, "v1", 3),  # one more attempt, fails again
        (9.9, "v1", 3),
        (10, "v2", 4),  # the source is back
        (20, "v2", 4),  # fresh again
    ]
    for after, value, fetches in steps:
        clock.now = T0 + 30 + after
        assert await cache.get("k", src) == value, after
        assert src.count == fetches, after
    assert cache.counters.stale_serves == 5


async def test_a_bug_in_fetch_is_not_an_outage() -> None:
    breaker = CircuitBreaker(failure_threshold=1, clock=FakeClock())
    cache, clock = make(breaker=breaker)
    src = Scripted(Fetched("v1"), KeyError("bug"))
    await cache.get("k", src)
    clock.advance(30)
    with pytest.raises(KeyError):  # not masked by a stale answer
        await cache.get("k", src)
    assert breaker.state is BreakerState.CLOSED
    assert cache.counters.errors == 1


# -- ETag revalidation ------------------------------------------------------------------


async def test_not_modified_renews_the_entry() -> None:
    cache, clock = make()
    src = Scripted(Fetched("v1", etag='"1"'), NotModified(ttl=100), NotModified(etag='"2"'),
                   NotModified())
    assert await cache.get("k", src) == "v1"
    clock.now = T0 + 30
    assert await cache.get("k", src) == "v1"  # revalidated, now fresh for 100 s
    clock.now = T0 + 129.9
    assert await cache.get("k", src) == "v1"
    clock.now = T0 + 130
    assert await cache.get("k", src) == "v1"  # default TTL, new ETag
    clock.now = T0 + 160
    assert await cache.get("k", src) == "v1"
    assert src.etags == [None, '"1"', '"1"', '"2"']


async def test_not_modified_keeps_a_negative_entry_negative() -> None:
    cache, clock = make()
    src = Scripted(Fetched("unknown", negative=True, etag="n"), NotModified(ttl=1000),
                   Unavailable("down"))
    await cache.get("k", src)
    clock.now = T0 + 60
    assert await cache.get("k", src) == "unknown"
    clock.now = T0 + 119.9
    assert await cache.get("k", src) == "unknown"
    assert cache.counters.negative_hits == 1
    clock.now = T0 + 120  # negative_ttl caps the renewal too, and it is never stale
    with pytest.raises(Unavailable):
        await cache.get("k", src)


async def test_not_modified_without_an_entry_is_a_broken_answer() -> None:
    breaker = CircuitBreaker(failure_threshold=1, clock=FakeClock())
    cache, _ = make(breaker=breaker)
    with pytest.raises(Unavailable) as info:
        await cache.get("k", Scripted(NotModified()))
    assert isinstance(info.value.__cause__, InvalidResponse)
    assert breaker.state is BreakerState.OPEN


# -- invalidation -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["invalidate", "clear"])
async def test_invalidation_forgets_entries_and_detaches_fetches(how: str) -> None:
    cache, _ = make()
    await cache.get("other", Scripted(Fetched("o")))
    src = Source()
    early = asyncio.create_task(cache.get("k", src))
    await pump()
    if how == "invalidate":
        cache.invalidate("k")
    else:
        cache.clear()
    late = asyncio.create_task(cache.get("k", src))
    await pump()
    assert len(src.calls) == 2  # the late caller does not join the detached fetch
    src.calls[0].reply(Fetched("old"))
    assert await early == "old"  # its callers get its answer ...
    assert len(cache) == (1 if how == "invalidate" else 0)  # ... but it is not stored
    src.calls[1].reply(Fetched("new"))
    assert await late == "new"
    assert await cache.get("k", src) == "new"
    assert len(src.calls) == 2


# -- circuit breaker --------------------------------------------------------------------


def test_circuit_breaker_transitions() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=10, clock=clock)

    def fail(times: int) -> None:
        for _ in range(times):
            attempt = breaker.acquire()
            assert attempt is not None
            attempt.failed()
            attempt.failed()  # a second report of the same attempt counts for nothing

    fail(2)
    ok = breaker.acquire()
    assert ok is not None
    ok.succeeded()  # failures must be consecutive
    assert breaker.consecutive_failures == 0
    straggler = breaker.acquire()  # a fetch that began while closed
    assert straggler is not None
    fail(3)
    assert breaker.state is BreakerState.OPEN
    assert breaker.acquire() is None
    clock.advance(5)
    straggler.failed()  # ends while open: neither counted nor extending the open time
    clock.advance(4.9)
    assert breaker.acquire() is None
    clock.advance(0.1)
    assert breaker.state is BreakerState.HALF_OPEN
    trial = breaker.acquire()
    assert trial is not None and trial.trial
    assert breaker.acquire() is None  # one trial at a time
    trial.abandoned()  # cancelled: no verdict, the next caller may try
    trial = breaker.acquire()
    assert trial is not None
    trial.failed()
    assert breaker.state is BreakerState.OPEN
    clock.advance(10)
    trial = breaker.acquire()
    assert trial is not None
    trial.succeeded()
    assert breaker.state is BreakerState.CLOSED


async def test_open_circuit_fails_fast_serves_stale_and_recovers_with_one_trial() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=10, clock=clock)
    stats = CacheStats()
    recipients: AsyncCache[str, str] = AsyncCache("recipient", POLICY, clock=clock,
                                                  breaker=breaker, stats=stats)
    domains: AsyncCache[str, str] = AsyncCache("domain", POLICY, clock=clock,
                                               breaker=breaker, stats=stats)
    await recipients.get("alice", Scripted(Fetched("mailbox")))
    clock.advance(30)
    down = Scripted(Unavailable("down"))
    for domain in ("a.example", "b.example"):
        with pytest.raises(Unavailable):
            await domains.get(domain, down)
    assert breaker.state is BreakerState.OPEN
    assert down.count == 2
    with pytest.raises(Unavailable):  # at once, without asking
        await domains.get("c.example", down)
    assert await recipients.get("alice", down) == "mailbox"  # stale, without asking
    assert down.count == 2

    clock.advance(10)
    src = Source()
    trial = asyncio.create_task(domains.get("d.example", src))
    await pump()
    assert breaker.state is BreakerState.HALF_OPEN and len(src.calls) == 1
    with pytest.raises(Unavailable):  # the trial is out; everything else fails fast
        await domains.get("e.example", down)
    assert await recipients.get("alice", down) == "mailbox"
    src.calls[0].fail()
    with pytest.raises(Unavailable):
        await trial
    assert breaker.state is BreakerState.OPEN

    clock.advance(10)
    assert await domains.get("d.example", Scripted(Fetched("tenant-d"))) == "tenant-d"
    assert breaker.state is BreakerState.CLOSED
    assert await recipients.get("alice", Scripted(Fetched("mailbox2"))) == "mailbox2"
    assert down.count == 2
    assert stats.snapshot()["domain"]["unavailable"] == 5


# -- LRU --------------------------------------------------------------------------------


async def test_lru_evicts_the_least_recently_used() -> None:
    cache, _ = make(CachePolicy(default_ttl=30, max_ttl=30, max_entries=2))
    src = Scripted(Fetched("v"))
    for key, fetches in [("a", 1), ("b", 2), ("a", 2), ("c", 3), ("a", 3), ("b", 4)]:
        await cache.get(key, src)
        assert src.count == fetches, key
    assert len(cache) == 2
    assert cache.counters.evictions == 2


# -- counters ---------------------------------------------------------------------------


async def test_counters_per_cache_name() -> None:
    clock = FakeClock()
    stats = CacheStats()
    recipients: AsyncCache[str, str] = AsyncCache("recipient", POLICY, clock=clock,
                                                  stats=stats)
    domains: AsyncCache[str, str] = AsyncCache("domain", POLICY, clock=clock, stats=stats)
    await recipients.get("a", Scripted(Fetched("v")))
    await recipients.get("a", Scripted(Fetched("v")))
    await recipients.get("x", Scripted(Fetched("unknown", negative=True)))
    await recipients.get("x", Scripted(Fetched("unknown", negative=True)))
    clock.advance(30)
    await recipients.get("a", Scripted(Unavailable("down")))
    with pytest.raises(Unavailable):
        await domains.get("d", Scripted(Unavailable("down")))
    zero = dict.fromkeys(("hits", "negative_hits", "misses", "stale_serves", "unavailable",
                          "fetches", "errors", "evictions"), 0)
    assert stats.snapshot() == {
        "recipient": zero | {"hits": 1, "negative_hits": 1, "misses": 3, "stale_serves": 1,
                             "fetches": 3, "errors": 1},
        "domain": zero | {"misses": 1, "unavailable": 1, "fetches": 1, "errors": 1},
    }


# -- logging ----------------------------------------------------------------------------


def test_rate_limited_log(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limited = RateLimitedLog(60, logger=logging.getLogger("test.limited"), clock=clock)
    caplog.set_level(logging.INFO, logger="test.limited")
    assert limited.log("k", logging.WARNING, "down: %s", "refused")
    for _ in range(5):
        clock.advance(10)
        assert not limited.log("k", logging.WARNING, "down: %s", "refused")
    assert limited.log("other", logging.WARNING, "other")  # keys are independent
    clock.advance(10)
    assert limited.log("k", logging.WARNING, "down: %s", "timeout")
    assert limited.log("quiet", logging.INFO, "x")
    assert [r.getMessage() for r in caplog.records] == [
        "down: refused",
        "other",
        "down: timeout (5 more like this in the last 60 s)",
        "x",
    ]


async def test_an_outage_is_logged_once_per_minute(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tenant_api_client.cache")
    cache, clock = make()
    down = Scripted(Unavailable("connect timeout"))
    for i in range(100):
        with pytest.raises(Unavailable):
            await cache.get(f"user{i}", down)
        clock.advance(0.5)
    clock.now = T0 + 60
    with pytest.raises(Unavailable):
        await cache.get("late", down)
    await cache.get("back", Scripted(Fetched("v")))
    assert [r.getMessage() for r in caplog.records] == [
        "tenant API unavailable for recipient lookups: connect timeout; "
        "lookups fail temporarily",
        "tenant API unavailable for recipient lookups: connect timeout; "
        "lookups fail temporarily (99 more like this in the last 60 s)",
        "tenant API answers recipient lookups again",
    ]


# -- credentials and policy -------------------------------------------------------------

SECRET = b"s" * 32


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ((SECRET, "alice", "pw"), (SECRET, "alice", "pw"), True),
        ((SECRET, "alice", "pw"), (SECRET, "alice", "pw2"), False),
        ((SECRET, "alice", "pw"), (b"t" * 32, "alice", "pw"), False),
        ((SECRET, "ab", "c"), (SECRET, "a", "bc"), False),  # unambiguous
        ((SECRET, "a", ""), (SECRET, "a"), False),
        ((SECRET, "\udcff"), (SECRET, "\udcfe"), False),  # undecodable input still keys
    ],
)
def test_credential_key(a: tuple[bytes, *tuple[str, ...]], b: tuple[bytes, *tuple[str, ...]],
                        same: bool) -> None:
    key_a, key_b = credential_key(*a), credential_key(*b)
    assert (key_a == key_b) is same
    assert len(key_a) == 64 and int(key_a, 16) >= 0
    assert "alice" not in key_a and "pw" not in key_a


def test_credential_key_needs_a_real_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        credential_key(b"short", "alice", "pw")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"default_ttl": -1, "max_ttl": 10},
        {"default_ttl": 20, "max_ttl": 10},
        {"default_ttl": 10, "max_ttl": math.inf},
        {"default_ttl": 10, "max_ttl": 10, "negative_ttl": math.nan},
        {"default_ttl": 10, "max_ttl": 10, "stale_if_error": -5},
        {"default_ttl": 10, "max_ttl": 10, "max_entries": 0},
        {"default_ttl": 10, "max_ttl": 10, "retry_interval": -1},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CachePolicy(**kwargs)  # type: ignore[arg-type]


# -- properties -------------------------------------------------------------------------

KEYS = ("a", "b")
OUTCOMES = st.sampled_from(["fail", "ok", "ok"])  # "ok" on an unchanged value: 304 if asked
TTLS = st.sampled_from([None, 0, 5, 20, 45, 1000])
PROP = CachePolicy(default_ttl=30, max_ttl=100, negative_ttl=20, stale_if_error=50,
                   max_entries=100, retry_interval=5)


def model_lifetime(ttl: float | None, negative: bool) -> float:
    """How long an answer is kept, written out independently of CachePolicy.ttl_for."""
    if ttl is None:
        return 20 if negative else 30
    if ttl <= 0:
        return 0
    return min(ttl, 20 if negative else 100)


@dataclass
class ModelEntry:
    value: str
    negative: bool
    expires_at: float
    retry_at: float = -math.inf


@dataclass
class PendingFetch:
    key: str
    generation: int
    etag: str | None
    trial: bool
    answer: asyncio.Future[Answer]


class CacheMachine(RuleBasedStateMachine):
    """Any interleaving of gets, answers, failures, server changes, invalidations and
    clock moves against a model of what the cache holds.

    Checked: (a) a negative answer is never returned after its TTL; (b) a positive one
    never later than stale_if_error after its expiry; (c) a fresh entry is always served
    without a fetch, at most one fetch per key is in flight, no key is refetched while
    fresh nor within retry_interval of a failure that served it stale, and no fetch
    starts while the breaker is open or besides the one half-open trial; (d) fail safe
    but not fail-happy: `Unavailable` only when no entry could be served.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.breaker = CircuitBreaker(failure_threshold=4, reset_timeout=10, clock=self.clock)
        self.cache: AsyncCache[str, str] = AsyncCache("recipient", PROP, clock=self.clock,
                                                      breaker=self.breaker)
        self.server = {k: (0, False) for k in KEYS}  # key -> (version, negative)
        self.generation = dict.fromkeys(KEYS, 0)  # bumped by invalidate/clear
        self.model: dict[str, ModelEntry | None] = dict.fromkeys(KEYS)
        self.confirmed: dict[str, tuple[float, float]] = {}  # value -> (last at, expiry)
        self.pending: list[PendingFetch] = []
        self.gets: list[asyncio.Task[str | None]] = []

    # -- plumbing --

    def pump(self) -> None:
        self.loop.run_until_complete(pump())
        for task in [t for t in self.gets if t.done()]:
            self.gets.remove(task)
            task.result()  # re-raises an assertion made inside the get

    def current(self, key: str) -> str:
        version, negative = self.server[key]
        return f"{key}:{version}:{'neg' if negative else 'pos'}"

    def stale_ok(self, m: ModelEntry, now: float) -> bool:
        return not m.negative and now < m.expires_at + PROP.stale_if_error

    def fetcher(self, key: str) -> Callable[[str | None], Awaitable[Answer]]:
        async def fetch(etag: str | None) -> Answer:
            now = self.clock()
            generation = self.generation[key]
            assert not any(p.key == key and p.generation == generation
                           for p in self.pending), "two fetches in flight for one key"
            state = self.breaker.state
            assert state is not BreakerState.OPEN, "fetch while the breaker is open"
            trial = state is BreakerState.HALF_OPEN
            assert not (trial and any(p.trial for p in self.pending)), "two trials"
            m = self.model[key]
            if m is not None:
                assert now >= m.expires_at, "fetch while fresh"
                assert now >= m.retry_at or not self.stale_ok(m, now), "refetch too soon"
            answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
            self.pending.append(PendingFetch(key, generation, etag, trial, answer))
            return await answer

        return fetch

    async def one_get(self, key: str) -> str | None:
        try:
            value = await self.cache.get(key, self.fetcher(key))
        except Unavailable:
            now = self.clock()
            m = self.model[key]
            assert m is None or now >= m.expires_at, "Unavailable with a fresh entry"
            assert m is None or not self.stale_ok(m, now), "Unavailable with a stale entry"
            return None
        now = self.clock()
        confirmed_at, expiry = self.confirmed[value]
        if value.endswith(":neg"):
            assert now == confirmed_at or now < expiry, "negative served after its TTL"
        else:
            assert now == confirmed_at or now < expiry + PROP.stale_if_error, "too stale"
        return value

    # -- rules --

    @rule(key=st.sampled_from(KEYS))
    def get(self, key: str) -> None:
        self.start_get(key)

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), outcome=OUTCOMES, negative=st.booleans(), ttl=TTLS)
    def answer(self, data: st.DataObject, outcome: str, negative: bool,
               ttl: float | None) -> None:
        index = data.draw(st.integers(0, len(self.pending) - 1))
        self.resolve(self.pending.pop(index), outcome, negative, ttl)

    @rule(key=st.sampled_from(KEYS), outcome=OUTCOMES, negative=st.booleans(), ttl=TTLS)
    def get_and_answer(self, key: str, outcome: str, negative: bool,
                       ttl: float | None) -> None:
        """The common case: a get whose fetch (if any) is answered before anything else."""
        before = len(self.pending)
        self.start_get(key)
        if len(self.pending) > before:
            self.resolve(self.pending.pop(), outcome, negative, ttl)

    def start_get(self, key: str) -> None:
        now = self.clock()
        m = self.model[key]
        fresh = m is not None and now < m.expires_at
        c = self.cache.counters
        hits = c.hits + c.negative_hits
        task = self.loop.create_task(self.one_get(key))
        self.gets.append(task)
        self.pump()
        if fresh:
            assert m is not None
            assert task.done() and task.result() == m.value, "fresh entry not served"
        assert c.hits + c.negative_hits == hits + fresh, "hit without a fresh entry"

    def resolve(self, p: PendingFetch, outcome: str, negative: bool,
                ttl: float | None) -> None:
        now = self.clock()
        m = self.model[p.key]
        if outcome == "fail":
            if m is not None and now >= m.expires_at and self.stale_ok(m, now):
                m.retry_at = now + PROP.retry_interval
            p.answer.set_exception(Unavailable("down"))
        else:
            version, was_negative = self.server[p.key]
            if outcome == "ok" and negative != was_negative:  # the answer changed
                self.server[p.key] = (version + 1, negative)
            value = self.current(p.key)
            negative = value.endswith(":neg")
            if p.etag == value:  # unchanged and we asked with its ETag: 304
                p.answer.set_result(NotModified(ttl=ttl))
            else:
                p.answer.set_result(Fetched(value, ttl=ttl, negative=negative, etag=value))
            life = model_lifetime(ttl, negative)
            _, expiry = self.confirmed.get(value, (now, now))
            self.confirmed[value] = (now, max(expiry, now + life))
            if p.generation == self.generation[p.key]:
                self.model[p.key] = ModelEntry(value, negative, now + life) if life else None
        self.pump()

    @rule(seconds=st.sampled_from([1.0, 4.9, 5.0, 10.0, 20.0, 30.0, 50.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(key=st.sampled_from(KEYS))
    def invalidate(self, key: str) -> None:
        self.cache.invalidate(key)
        self.generation[key] += 1
        self.model[key] = None

    @rule()
    def clear(self) -> None:
        self.cache.clear()
        for key in KEYS:
            self.generation[key] += 1
            self.model[key] = None

    def teardown(self) -> None:
        try:
            while self.pending:
                self.pending.pop().answer.set_exception(Unavailable("teardown"))
                self.pump()
            assert not self.gets, "a get never finished"
        finally:
            self.loop.run_until_complete(self.shut_down())
            self.loop.close()

    async def shut_down(self) -> None:
        for task in self.gets:
            task.cancel()
        await asyncio.gather(*self.gets, return_exceptions=True)
        await self.cache.aclose()


CacheMachine.TestCase.settings = settings(max_examples=500, stateful_step_count=50,
                                          deadline=None)
TestCacheProperties = CacheMachine.TestCase
