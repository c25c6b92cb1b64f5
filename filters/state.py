"""The shared-state interface: counters, sliding windows and expiring sets.

Rate limits, reputation, greylisting, auth-failure counters and autoreply memory all
go through one `StateStore`, so several workers and several nodes act as one cluster:
`RedisStore` (gateway/state_redis.py, `[state] redis_url`) in production, `MemoryStore`
(gateway/state_memory.py) for a single node with no Redis. A store that loses Redis
falls back to node-local state and says so (`degraded`); no mail is ever refused or
lost because of it.

Keys are short strings the callers build ("rl:ip:192.0.2.1"); the store namespaces
them. Every operation is atomic on its own. Times are seconds.
"""

from __future__ import annotations

from typing import Protocol


class StateStore(Protocol):
    async def incr(self, key: str, amount: int = 1, *, ttl: float) -> int:
        """Add `amount` to a counter that expires `ttl` seconds after it was created;
        return the new value."""
        ...

    async def get_counter(self, key: str) -> int:
        """The counter's value, 0 when absent or expired."""
        ...

    async def hit(self, key: str, *, window: float, amount: int = 1) -> int:
        """Record `amount` events now in a sliding window of `window` seconds; return the
        number of events in the window including these (approximate sliding window:
        weighted previous + current fixed buckets)."""
        ...

    async def window_count(self, key: str, *, window: float) -> int:
        """Events in the sliding window now, without recording one."""
        ...

    async def set_add(self, key: str, member: str, *, ttl: float) -> None:
        """Remember `member` in the set `key` for `ttl` seconds (refreshed on re-add)."""
        ...

    async def set_contains(self, key: str, member: str) -> bool:
        ...

    async def put(self, key: str, value: str, *, ttl: float, only_if_absent: bool = False
                  ) -> bool:
        """Store a value with an expiry; with only_if_absent, False if one was there."""
        ...

    async def fetch(self, key: str) -> str | None:
        ...

    async def delete(self, key: str) -> None:
        ...

    @property
    def degraded(self) -> bool:
        """True while a shared store is unreachable and node-local state is used."""
        ...

    async def aclose(self) -> None: ...
