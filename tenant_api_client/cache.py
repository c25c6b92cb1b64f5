"""The async cache between the gateway and the tenant API's HTTP client.

Theory of operation
-------------------
One `AsyncCache` per call type (recipient, domain, tenant, dkim, limits, auth), each with
its `CachePolicy`; one `CircuitBreaker` and one `CacheStats` shared by all caches of a
client. The cache does no I/O: `get(key, fetch)` calls the `fetch` coroutine function it is
given (the HTTP request) when it has no fresh answer. All times come from an injectable
clock (`time.monotonic` by default), so tests move time by hand.

Life of an entry (per key)::

    absent
      │ get()
      ▼
    fetching ───── failed, or answered with ttl 0 ─────► absent
      │ answered, ttl > 0
      ▼
    fresh ◄────────────────────────────────┐    served without asking
      │ now >= expires_at                  │ answered, ttl > 0
      ▼                                    │
    expired ─── get() ───► refetching ─────┘
      ▲                        │
      └──────── failed ────────┘    positive: served stale meanwhile, and no refetch
      │                             for retry_interval; negative: never served
      │ now >= expires_at + stale_if_error (negative entries: at expires_at)
      ▼
    gone                            never served; get() refetches (with its ETag)

    invalidate(), clear(), LRU eviction, a refetch answered with ttl 0:  any ──► absent

Details:

* Exactly one fetch per key is in flight (single-flight); every caller that
  wants the key meanwhile awaits the same fetch and gets the same answer or error. The
  fetch runs in its own task, shielded: a caller that is cancelled (its SMTP session
  timed out) stops waiting, the fetch goes on for the others and still fills the cache.
* A successful answer replaces the entry: its TTL is `Fetched.ttl` (Cache-Control
  max-age) capped by `max_ttl`, or `default_ttl` when the answer has none. Negative
  answers ("not found") live `negative_ttl`, or less if the server asks for less. A TTL
  of 0 (no-store) means: return the answer to the callers of this fetch, store nothing,
  and forget the older entry (it is superseded).
* A failed fetch (`Unavailable`, which includes `InvalidResponse`) stores nothing. Its
  callers get the expired positive entry when now < expires_at + stale_if_error (a
  "stale serve"), else `Unavailable`. A negative entry is never served stale: "unknown"
  from an hour ago must not become a 550 today, so an expired negative plus a failing
  source is `Unavailable` (the gateway answers 451 4.4.3). After a failure that served
  stale, the key is not refetched for `retry_interval`: callers get the stale answer
  directly instead of hammering a sick API.
* Any other exception from `fetch` is a bug, not an outage: it reaches the callers of that
  fetch unchanged, is not cached, serves nothing stale and does not count against the
  circuit breaker. The HTTP client maps every "cannot answer now" (timeout, connection
  refused, 5xx, undecodable body) to `Unavailable`; the gateway defers on anything else.

Revalidation (ETag): `fetch` receives the ETag of the key's entry, even an expired one (or
None), to send as If-None-Match. On `304 Not Modified` it returns `NotModified(ttl=...)`
instead of a `Fetched`: the cache keeps the value it has and renews its TTL (and its
negative flag). `NotModified` when the cache sent no ETag is a broken answer and is
treated as `InvalidResponse`.

Circuit breaker (shared by a client's caches): closed → `failure_threshold` consecutive
failed fetches → open: no fetch is attempted; callers get stale answers where allowed,
else `Unavailable` at once → after `reset_timeout`, half-open: one trial fetch (of any
key of any cache); success closes, failure reopens. `state` is for metrics and readiness.

Invalidation: `invalidate(key)` and `clear()` forget entries and detach fetches in flight
(their callers still get the answer; it is not stored, and the next `get` asks anew).

Statistics: `CacheStats` holds `CacheCounters` per cache name, plain ints a metrics
exporter reads. Per `get`: exactly one of hits, negative_hits, misses; a miss ends as an
answer from the source, a stale serve (stale_serves) or `Unavailable` (unavailable). Per
fetch: fetches, and errors when it raised. evictions: LRU evictions.

Logging: failures are logged through `RateLimitedLog`, once per minute per (cache, kind of
error), with the number of lines held back; the breaker logs when it opens and closes.

Credentials: the auth cache (if the gateway keeps one) keys entries by
`credential_key(secret, username, password, ...)`, an HMAC, so no password is kept or
used as a key in clear; the secret is per process (`secrets.token_bytes(32)`). Give auth
a short TTL and `stale_if_error=0`: a changed password or a contained account must take
effect quickly, and an outage must not extend a login's validity. (The tenant API marks
auth answers `no-store`; honouring that, `Fetched(ttl=0)`, caches nothing at all.)

Policies the gateway is expected to use (cached.py owns the numbers)::

    call type   default_ttl  max_ttl  negative_ttl  stale_if_error  max_entries
    recipient       300        3600        60            3600          100_000
    domain          300        3600        60           86400           10_000
    tenant          300        3600        60           86400           10_000
    dkim            300        3600        60           86400           10_000
    limits           60         600        60            3600          100_000
    auth             60          60        30               0           10_000
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

from tenant_api_client.errors import InvalidResponse, Unavailable

log = logging.getLogger(__name__)

Clock = Callable[[], float]
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


# -- policy and answers ---------------------------------------------------------------


@dataclass(frozen=True)
class CachePolicy:
    """How one call type is cached. All durations in seconds."""

    default_ttl: float  # when the answer carries no max-age
    max_ttl: float  # cap on any max-age the server asks for
    negative_ttl: float = 60.0  # cap (and default) for "not found"; never served stale
    stale_if_error: float = 0.0  # how long past expiry a positive entry may stand in
    max_entries: int = 10_000  # LRU cap
    retry_interval: float = 5.0  # while serving stale: at most one refetch per key per this

    def __post_init__(self) -> None:
        for name in ("default_ttl", "max_ttl", "negative_ttl", "stale_if_error",
                     "retry_interval"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"CachePolicy.{name} must be a finite number >= 0: {value!r}")
        if self.default_ttl > self.max_ttl:
            raise ValueError("CachePolicy.default_ttl exceeds max_ttl")
        if self.max_entries < 1:
            raise ValueError("CachePolicy.max_entries must be at least 1")

    def ttl_for(self, ttl: float | None, *, negative: bool) -> float:
        """Seconds to keep an answer whose server asked for `ttl`; 0: do not store it."""
        cap = self.negative_ttl if negative else self.max_ttl
        if ttl is None:
            return self.negative_ttl if negative else self.default_ttl
        if not ttl > 0:  # 0 (no-store), negative, NaN
            return 0.0
        return min(ttl, cap)


@dataclass(frozen=True)
class Fetched(Generic[V]):
    """An answer from the source, as the fetch function returns it."""

    value: V
    ttl: float | None = None  # Cache-Control max-age; None: the policy's default; 0: no-store
    negative: bool = False  # a "not found" answer (value is what callers get, e.g. Unknown)
    etag: str | None = None


@dataclass(frozen=True)
class NotModified:
    """The source confirmed the cached entry (HTTP 304): keep its value, renew its TTL."""

    ttl: float | None = None
    etag: str | None = None  # None: keep the entry's ETag


Fetch = Callable[[str | None], Awaitable[Fetched[V] | NotModified]]


# -- statistics -----------------------------------------------------------------------


@dataclass(slots=True)
class CacheCounters:
    """Counters of one cache name; only ever incremented."""

    hits: int = 0
    negative_hits: int = 0
    misses: int = 0
    stale_serves: int = 0
    unavailable: int = 0
    fetches: int = 0
    errors: int = 0
    evictions: int = 0


class CacheStats:
    """Counters per cache name, for the gateway's metrics to read."""

    def __init__(self) -> None:
        self._by_name: dict[str, CacheCounters] = {}

    def counters(self, name: str) -> CacheCounters:
        """The counters of `name`, created on first use (caches of one name share them)."""
        return self._by_name.setdefault(name, CacheCounters())

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {name: asdict(c) for name, c in self._by_name.items()}


# -- rate-limited logging -------------------------------------------------------------


@dataclass(slots=True)
class _LogSlot:
    logged_at: float
    suppressed: int = 0


class RateLimitedLog:
    """Log a line at most once per `period` per key; count the lines held back.

    For outages: one line per minute per (cache, kind of error), not one per message.
    The next line logged for a key says how many were suppressed since the last one.
    Keys should come from a small set (names, exception classes), never from input.
    """

    def __init__(self, period: float = 60.0, *, logger: logging.Logger = log,
                 clock: Clock = time.monotonic) -> None:
        self.period = period
        self._logger = logger
        self._clock = clock
        self._slots: dict[Hashable, _LogSlot] = {}

    def log(self, key: Hashable, level: int, msg: str, *args: object) -> bool:
        """Log `msg % args` unless `key` was logged less than `period` ago; True if logged."""
        now = self._clock()
        slot = self._slots.get(key)
        if slot is not None and now - slot.logged_at < self.period:
            slot.suppressed += 1
            return False
        if slot is not None and slot.suppressed:
            msg += " (%d more like this in the last %.0f s)"
            args = (*args, slot.suppressed, now - slot.logged_at)
        self._slots[key] = _LogSlot(logged_at=now)
        self._logger.log(level, msg, *args)
        return True


# -- circuit breaker ------------------------------------------------------------------


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Attempt:
    """Permission for one fetch, from `CircuitBreaker.acquire`; report its end once."""

    __slots__ = ("_breaker", "_done", "trial")

    def __init__(self, breaker: CircuitBreaker | None, *, trial: bool) -> None:
        self._breaker = breaker
        self.trial = trial  # the one fetch allowed while half-open
        self._done = False

    def _finish(self) -> CircuitBreaker | None:
        if self._done:
            return None
        self._done = True
        return self._breaker

    def succeeded(self) -> None:
        if (breaker := self._finish()) is not None:
            breaker._succeeded(self)

    def failed(self) -> None:
        if (breaker := self._finish()) is not None:
            breaker._failed(self)

    def abandoned(self) -> None:
        """Ended with no verdict on the source (cancelled, or a bug in the caller)."""
        if (breaker := self._finish()) is not None:
            breaker._abandoned(self)


class CircuitBreaker:
    """Stops asking a failing source; shared by all caches of one client.

    closed: every fetch allowed; `failure_threshold` consecutive failures open it.
    open: no fetch allowed until `reset_timeout` has passed, then half-open.
    half-open: one trial fetch; its success closes the breaker, its failure reopens it.
    Any success closes it. A failure of a fetch that began before the breaker opened
    does not count again once it is open.
    """

    def __init__(self, failure_threshold: int = 5, reset_timeout: float = 10.0, *,
                 clock: Clock = time.monotonic, name: str = "tenant API") -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.name = name
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    @property
    def state(self) -> BreakerState:
        if (self._state is BreakerState.OPEN
                and self._clock() - self._opened_at >= self.reset_timeout):
            self._state = BreakerState.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def acquire(self) -> Attempt | None:
        """An `Attempt` when a fetch may go out now, else None (fail fast)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return Attempt(self, trial=False)
        if state is BreakerState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return Attempt(self, trial=True)
        return None

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()

    def _succeeded(self, attempt: Attempt) -> None:
        if attempt.trial:
            self._trial_in_flight = False
        if self._state is not BreakerState.CLOSED:
            log.info("%s circuit breaker closed: the source answers again", self.name)
        self._state = BreakerState.CLOSED
        self._failures = 0

    def _failed(self, attempt: Attempt) -> None:
        if attempt.trial:
            self._trial_in_flight = False
        state = self.state
        if state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open()
                log.warning("%s circuit breaker open after %d consecutive failures; "
                            "no requests for %.0f s", self.name, self._failures,
                            self.reset_timeout)
        elif attempt.trial:
            self._failures += 1
            self._open()
            log.debug("%s circuit breaker: trial request failed, open again", self.name)

    def _abandoned(self, attempt: Attempt) -> None:
        if attempt.trial:
            self._trial_in_flight = False


# -- the cache ------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    negative: bool
    etag: str | None
    expires_at: float
    retry_at: float = -math.inf  # no refetch before this (set after a failure served stale)


@dataclass(slots=True, frozen=True)
class _Outcome(Generic[V]):
    value: V
    stale: bool


def _consume(task: asyncio.Task[Any]) -> None:
    # A fetch whose callers were all cancelled may fail with nobody awaiting it.
    if not task.cancelled():
        task.exception()


class AsyncCache(Generic[K, V]):
    """TTL + LRU cache with single-flight, negative entries and stale-if-error."""

    def __init__(self, name: str, policy: CachePolicy, *, clock: Clock = time.monotonic,
                 breaker: CircuitBreaker | None = None,
                 stats: CacheStats | None = None) -> None:
        self.name = name
        self.policy = policy
        self.breaker = breaker
        self.stats = stats if stats is not None else CacheStats()
        self.counters = self.stats.counters(name)
        self._clock = clock
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._inflight: dict[K, asyncio.Task[_Outcome[V]]] = {}
        self._tasks: set[asyncio.Task[_Outcome[V]]] = set()  # includes detached fetches
        self._log = RateLimitedLog(60.0, clock=clock)
        self._failing = False

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: K, fetch: Fetch[V]) -> V:
        """The value for `key`, from the cache or from `fetch(etag)`.

        Raises `Unavailable` when the source cannot answer and no usable entry exists.
        Callers joining a fetch in flight share it; their own `fetch` is not called.
        """
        now = self._clock()
        entry = self._entries.get(key)
        c = self.counters
        if entry is not None and now < entry.expires_at:
            self._entries.move_to_end(key)
            if entry.negative:
                c.negative_hits += 1
            else:
                c.hits += 1
            return entry.value
        c.misses += 1
        flight = self._inflight.get(key)
        if flight is None:
            if entry is not None and now < entry.retry_at and self._stale_ok(entry, now):
                self._entries.move_to_end(key)
                c.stale_serves += 1
                return entry.value
            flight = asyncio.create_task(self._refresh(key, fetch),
                                         name=f"cache-{self.name}-fetch")
            self._inflight[key] = flight
            self._tasks.add(flight)
            flight.add_done_callback(self._tasks.discard)
            flight.add_done_callback(_consume)
        try:
            outcome = await asyncio.shield(flight)
        except Unavailable:
            c.unavailable += 1
            raise
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if flight.cancelled() and me is not None and not me.cancelling():
                # The fetch was cancelled (aclose), not this caller.
                c.unavailable += 1
                raise Unavailable(f"{self.name} cache closed") from None
            raise
        if outcome.stale:
            c.stale_serves += 1
        return outcome.value

    def invalidate(self, key: K) -> None:
        """Forget `key`; a fetch in flight for it still answers its callers, unstored."""
        self._entries.pop(key, None)
        self._inflight.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
        self._inflight.clear()

    async def aclose(self) -> None:
        """Cancel fetches in flight (their callers get `Unavailable`) and forget all."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.clear()

    # -- internals --

    def _stale_ok(self, entry: _Entry[V], now: float) -> bool:
        return not entry.negative and now < entry.expires_at + self.policy.stale_if_error

    def _attached(self, key: K) -> bool:
        return self._inflight.get(key) is asyncio.current_task()

    async def _refresh(self, key: K, fetch: Fetch[V]) -> _Outcome[V]:
        try:
            return await self._fetch_once(key, fetch)
        finally:
            if self._attached(key):
                del self._inflight[key]

    async def _fetch_once(self, key: K, fetch: Fetch[V]) -> _Outcome[V]:
        prior = self._entries.get(key)
        breaker = self.breaker
        attempt = breaker.acquire() if breaker is not None else Attempt(None, trial=False)
        if attempt is None:
            return self._fall_back(key, None)
        c = self.counters
        c.fetches += 1
        try:
            answer = await fetch(prior.etag if prior is not None else None)
            if isinstance(answer, NotModified) and prior is None:
                raise InvalidResponse("304 Not Modified to a request without an ETag")
        except Unavailable as exc:
            attempt.failed()
            c.errors += 1
            return self._fall_back(key, exc)
        except asyncio.CancelledError:
            attempt.abandoned()
            raise
        except Exception:
            attempt.abandoned()
            c.errors += 1
            raise
        attempt.succeeded()
        if self._failing:
            self._failing = False
            self._log.log((self.name, "recovered"), logging.INFO,
                          "tenant API answers %s lookups again", self.name)
        if isinstance(answer, NotModified):
            assert prior is not None
            value, negative = prior.value, prior.negative
            etag = answer.etag if answer.etag is not None else prior.etag
        else:
            value, negative, etag = answer.value, answer.negative, answer.etag
        ttl = self.policy.ttl_for(answer.ttl, negative=negative)
        if self._attached(key):
            if ttl > 0:
                self._store(key, _Entry(value, negative, etag, self._clock() + ttl))
            else:
                self._entries.pop(key, None)
        return _Outcome(value, stale=False)

    def _store(self, key: K, entry: _Entry[V]) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.policy.max_entries:
            self._entries.popitem(last=False)
            self.counters.evictions += 1

    def _fall_back(self, key: K, exc: Unavailable | None) -> _Outcome[V]:
        """The answer when the source did not answer: stale if allowed, else Unavailable.

        `exc` is None when the circuit breaker refused the fetch.
        """
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None and now < entry.expires_at:  # stored by a newer fetch
            return _Outcome(entry.value, stale=False)
        stale = entry is not None and self._stale_ok(entry, now)
        self._failing = True
        kind = type(exc).__name__ if exc is not None else "circuit open"
        self._log.log((self.name, kind), logging.WARNING,
                      "tenant API unavailable for %s lookups: %s; %s", self.name,
                      exc if exc is not None else "circuit breaker open",
                      "serving stale entries" if stale else "lookups fail temporarily")
        if entry is not None and stale:
            if exc is not None:
                entry.retry_at = now + self.policy.retry_interval
            self._entries.move_to_end(key)
            return _Outcome(entry.value, stale=True)
        raise Unavailable(f"tenant API unavailable for {self.name} lookups") from exc


# -- credentials ----------------------------------------------------------------------


def credential_key(secret: bytes, *parts: str) -> str:
    """HMAC-SHA256 (hex) of `parts`, to key an auth cache without keeping passwords.

    Pass everything the answer depends on (username, password, mechanism, client IP).
    Parts are length-prefixed, so ("ab", "c") and ("a", "bc") give different keys.
    `secret` is per process, at least 16 bytes (use `secrets.token_bytes(32)`).
    """
    if len(secret) < 16:
        raise ValueError("credential_key needs a secret of at least 16 bytes")
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        mac.update(len(data).to_bytes(8, "big"))
        mac.update(data)
    return mac.hexdigest()
