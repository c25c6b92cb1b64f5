"""The node's shared-state store: Redis with a node-local fallback, or memory alone.

Theory of operation
-------------------
:func:`make_store` is what the composition root calls: with no ``[state] redis_url`` it
returns a :class:`~gateway.state_memory.MemoryStore` (one node, one worker); with a URL,
a :class:`FallbackStore` over a :class:`~gateway.state_redis.RedisStore` and a
MemoryStore.

:class:`FallbackStore` sends every operation to the primary (Redis), whose own timeout
(0.2 s by default) bounds it. When the primary raises
:class:`~gateway.state_redis.StateUnavailable` (timeout, refused or reset connection,
an error reply such as OOM or READONLY), the same operation is answered by the local
MemoryStore instead and the store becomes *degraded*. While degraded, operations go
straight to the local store without paying the timeout; at most once per
``retry_interval`` seconds one operation (only one, even under concurrency) is tried on
the primary again as a probe. When a probe succeeds the store is no longer degraded,
logs "recovered" and every later operation goes to Redis again. Invalid arguments
(``ValueError``) and cancellation are never mistaken for an outage: they propagate.

Logging is rate-limited: the first failure of an outage logs a warning at once, later
ones at most one line per ``log_period`` seconds, each saying how many failures it
stands for; recovery logs one line with the outage's length and the operations served
locally. Plain ``int`` counters for metrics: :attr:`FallbackStore.errors` (primary
failures, timeouts included), :attr:`FallbackStore.timeouts`,
:attr:`FallbackStore.local_ops` (operations answered locally), :attr:`FallbackStore.outages`
and :attr:`FallbackStore.recoveries`; :meth:`FallbackStore.snapshot` returns them all.

What each feature gets while degraded (the ``Fail safe, not open`` rule of the design):

* Rate limits and connection/auth-failure counters (``incr``, ``hit``, ``window_count``,
  ``get_counter``) become **per node**: each node counts only what it saw itself, so a
  cluster of N nodes lets through up to N times a cluster-wide limit. They restart from
  the local store's values, which are empty at the first outage (or whatever is left of
  an earlier outage, within its expiry); what was counted in Redis before the outage is
  not visible meanwhile, and what is counted locally is not copied to Redis afterwards -
  after recovery Redis's values (still there unless Redis lost its data) apply again.
* Greylisting (``set_add``/``set_contains``, ``put``/``fetch``) should **pass** mail
  while degraded: a triplet first seen on this node during an outage would otherwise
  be deferred again on every other node and again after recovery. The greylist filter
  reads :attr:`FallbackStore.degraded` and skips greylisting (records "skip") while it is
  True; the store itself does not know which keys are greylisting.
* Reputation and autoreply memory answer from the local store: a reputation entry
  written to Redis before the outage is not seen (the sender looks new); an autoreply
  may be sent once more per node and per outage, which RFC 3834's "at most once per
  period" tolerates better than losing mail.
* ``delete`` deletes on the store in use; a key deleted locally during an outage may
  still exist in Redis afterwards.

No operation ever raises because Redis is down, so no mail is refused or lost for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from filters.state import StateStore

from .state_memory import Clock, MemoryStore
from .state_redis import RedisStore, StateUnavailable

__all__ = ["FallbackStore", "make_store"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Op = Callable[[StateStore], Awaitable[T]]


class FallbackStore:
    """A StateStore that uses ``primary`` and falls back to ``local`` while it fails.

    ``retry_interval``: the least time between two attempts to use the primary while
    degraded. ``log_period``: at most one warning per period about primary failures.
    ``primary`` is normally a :class:`~gateway.state_redis.RedisStore`; anything that
    raises :class:`~gateway.state_redis.StateUnavailable` when it fails will do.
    """

    def __init__(self, primary: StateStore, local: MemoryStore, *,
                 retry_interval: float = 5.0, log_period: float = 60.0,
                 clock: Clock = time.monotonic, logger: logging.Logger = log) -> None:
        self.primary = primary
        self.local = local
        self.retry_interval = retry_interval
        self.log_period = log_period
        self._clock = clock
        self._log = logger
        self._degraded = False
        self._degraded_since = 0.0
        self._next_try = 0.0
        self._probing = False
        self._logged_at: float | None = None
        self._suppressed = 0
        self._outage_local_ops = 0
        self.errors = 0
        """Operations the primary failed (timeouts included)."""
        self.timeouts = 0
        """Of those, the ones that timed out."""
        self.local_ops = 0
        """Operations answered by the local store."""
        self.outages = 0
        """Times the store became degraded."""
        self.recoveries = 0
        """Times the primary answered again after an outage."""

    # ------------------------------------------------------------------ StateStore

    async def incr(self, key: str, amount: int = 1, *, ttl: float) -> int:
        return await self._run(lambda s: s.incr(key, amount, ttl=ttl))

    async def get_counter(self, key: str) -> int:
        return await self._run(lambda s: s.get_counter(key))

    async def hit(self, key: str, *, window: float, amount: int = 1) -> int:
        return await self._run(lambda s: s.hit(key, window=window, amount=amount))

    async def window_count(self, key: str, *, window: float) -> int:
        return await self._run(lambda s: s.window_count(key, window=window))

    async def set_add(self, key: str, member: str, *, ttl: float) -> None:
        await self._run(lambda s: s.set_add(key, member, ttl=ttl))

    async def set_contains(self, key: str, member: str) -> bool:
        return await self._run(lambda s: s.set_contains(key, member))

    async def put(self, key: str, value: str, *, ttl: float, only_if_absent: bool = False
                  ) -> bool:
        return await self._run(
            lambda s: s.put(key, value, ttl=ttl, only_if_absent=only_if_absent))

    async def fetch(self, key: str) -> str | None:
        return await self._run(lambda s: s.fetch(key))

    async def delete(self, key: str) -> None:
        await self._run(lambda s: s.delete(key))

    @property
    def degraded(self) -> bool:
        """True while the primary is failing and the local store answers instead."""
        return self._degraded

    async def aclose(self) -> None:
        try:
            await self.primary.aclose()
        finally:
            await self.local.aclose()

    # ------------------------------------------------------------------ metrics

    def snapshot(self) -> dict[str, int]:
        """The counters, plus ``degraded`` as 0/1, for a metrics collector."""
        return {
            "degraded": int(self._degraded),
            "errors": self.errors,
            "timeouts": self.timeouts,
            "local_ops": self.local_ops,
            "outages": self.outages,
            "recoveries": self.recoveries,
        }

    # ------------------------------------------------------------------ internals

    async def _run(self, op: Op[T]) -> T:
        if not self._degraded:
            try:
                return await op(self.primary)
            except StateUnavailable as exc:
                self._failed(exc)
        elif not self._probing and self._clock() >= self._next_try:
            self._probing = True
            try:
                result = await op(self.primary)
            except StateUnavailable as exc:
                self._failed(exc)
            else:
                self._recovered()
                return result
            finally:
                self._probing = False
        self.local_ops += 1
        self._outage_local_ops += 1
        return await op(self.local)

    def _failed(self, exc: StateUnavailable) -> None:
        now = self._clock()
        self.errors += 1
        if exc.timeout:
            self.timeouts += 1
        self._next_try = now + self.retry_interval
        if not self._degraded:
            self._degraded = True
            self._degraded_since = now
            self._outage_local_ops = 0
            self.outages += 1
        if self._logged_at is not None and now - self._logged_at < self.log_period:
            self._suppressed += 1
            return
        if self._suppressed:
            self._log.warning("shared state store still unavailable (%s); node-local state "
                              "in use; %d more failures in the last %.0f s", exc,
                              self._suppressed, now - (self._logged_at or now))
        else:
            self._log.warning("shared state store unavailable (%s); using node-local state "
                              "(limits are per node), retrying every %g s",
                              exc, self.retry_interval)
        self._logged_at = now
        self._suppressed = 0

    def _recovered(self) -> None:
        now = self._clock()
        self._degraded = False
        self.recoveries += 1
        self._log.warning("shared state store recovered after %.1f s; %d operations were "
                          "answered node-locally", now - self._degraded_since,
                          self._outage_local_ops)
        self._logged_at = None
        self._suppressed = 0


def make_store(redis_url: str | None, **redis_options: Any) -> StateStore:
    """The node's StateStore: memory only without a URL, else Redis with local fallback.

    ``redis_options`` go to :class:`~gateway.state_redis.RedisStore` (``namespace``,
    ``timeout``, ``max_connections``...). Nothing is connected until the first operation.
    """
    if not redis_url:
        return MemoryStore()
    return FallbackStore(RedisStore(redis_url, **redis_options), MemoryStore())


if TYPE_CHECKING:  # mypy proves that all three implement the interface
    def _conforms(a: MemoryStore, b: RedisStore, c: FallbackStore) -> list[StateStore]:
        return [a, b, c]
