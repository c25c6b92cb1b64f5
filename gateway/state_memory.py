"""MemoryStore: the StateStore of a node with no Redis, and the fallback during an outage.

Theory of operation
-------------------
Everything lives in one ``OrderedDict`` keyed by ``(kind, key)``. The kinds mirror the
Redis layout of :mod:`gateway.state_redis` one for one, so the two stores agree on every
operation (tests/integration/test_state_redis.py runs one behaviour table against both):

========  ==============================  ==========================================
kind      Redis key / type                here
========  ==============================  ==========================================
counter   ``c:{key}`` string (INCRBY)     :class:`_Counter` value, fixed expiry
window    ``w:{key}`` hash (w, b, c, p)   :class:`_Window` bucket index, cur, prev
set       ``s:{key}`` zset (score=expiry) :class:`_Set` member -> expiry
value     ``v:{key}`` string (SET PX)     :class:`_Value`
========  ==============================  ==========================================

So one caller key may hold a counter, a window, a set and a value at once without
clashing, and :meth:`MemoryStore.delete` removes all four (as ``DEL`` does in Redis).

Expiry. Every entry has an absolute expiry on the store's clock (``clock``, seconds,
``time.monotonic`` by default; tests pass a fake one). An entry whose expiry is at or
before now is dead: every read checks this first (lazy expiry). Dead entries nobody reads
again are removed by a sweep: each entry is scheduled once in a min-heap at the expiry it
had when it was created; every operation pops at most :data:`SWEEP_BATCH` due heap items.
A popped entry that was extended meanwhile (a window that saw another hit, a set with a
newer member) is pushed again at its current expiry, one that is gone or replaced is
dropped, and a dead one is deleted. Each operation creates at most one entry and sweeps
up to several due ones, so dead entries cannot pile up; heap items of deleted or evicted
entries are compacted away when the heap grows past twice the number of entries.

Size cap. ``max_keys`` bounds the number of entries: the dict is kept in least-recently-
used order (every read or write moves the entry to the end) and the least recently used
entry is evicted when a new one would exceed the cap (:attr:`MemoryStore.evictions`
counts them). An evicted counter or window restarts from zero, so the cap must be well
above the number of keys live at once; an entry takes about 420-470 bytes with a 20-byte
key (tracemalloc), so the default 1 000 000 entries can take about 450 MB. The
members of one set are capped separately (``max_set_members``); past it the members
closest to expiry are dropped first. Expired members of a set are pruned when the set has
doubled since its last pruning (amortised O(1) per add).

Sliding window. ``hit``/``window_count`` use the two-bucket approximation that the Redis
Lua script uses, in the same integer milliseconds: the window is cut into fixed buckets of
``window`` length, bucket ``n = now_ms // window_ms``; the count is the current bucket plus
the previous bucket weighted by the part of it that still overlaps the window, rounded up
(:func:`weighted_count`). Rounding up errs towards limiting: a burst that crosses a bucket
boundary is counted exactly, and an old bucket fades to nothing only when it is a whole
window old. A window entry expires two windows after its last hit, when neither of its
buckets can matter any more. A key used with a different ``window`` than it was created
with starts afresh (both stores keep the window length with the buckets).

Sets. A member is remembered until ``ttl`` after its last add (re-adding refreshes it,
also to a shorter ttl); the set itself lives as long as its longest-living member.

Counters. ``incr`` creates the counter with an expiry ``ttl`` after its creation; later
increments do not extend it (a fixed window, like ``INCRBY`` + ``PEXPIRE`` when no TTL).

The store is not thread-safe (one event loop); every method completes without awaiting
anything, so each operation is atomic with respect to other tasks. ``degraded`` is always
False: this *is* the node-local state.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal, TypeVar

__all__ = [
    "SWEEP_BATCH",
    "MemoryStore",
    "check_ttl",
    "check_window",
    "to_ms",
    "weighted_count",
]

Clock = Callable[[], float]
Kind = Literal["c", "w", "s", "v"]
_KINDS: Final[tuple[Kind, ...]] = ("c", "w", "s", "v")

#: Heap items examined per operation by the expiry sweep.
SWEEP_BATCH: Final = 16


def check_ttl(ttl: float) -> float:
    """Validate a ttl (seconds): finite and positive; returns it."""
    if not (math.isfinite(ttl) and ttl > 0):
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
    return ttl


def check_window(window: float) -> float:
    """Validate a window length (seconds): finite and at least a millisecond."""
    if not (math.isfinite(window) and window >= 0.001):
        raise ValueError(f"window must be at least 0.001 seconds, not {window!r}")
    return window


def to_ms(seconds: float) -> int:
    """Seconds to whole milliseconds, at least 1 (the resolution of both stores)."""
    return max(1, round(seconds * 1000))


def weighted_count(prev: int, cur: int, elapsed_ms: int, window_ms: int) -> int:
    """Events in a sliding window from two fixed buckets.

    ``cur`` counts the current bucket, ``prev`` the one before, ``elapsed_ms`` is how far
    into the current bucket we are. The previous bucket still overlaps the window by
    ``(window_ms - elapsed_ms) / window_ms``; its share is rounded up. The Lua scripts of
    gateway/state_redis.py compute exactly ``cur + prev - floor(prev * elapsed / window)``.
    """
    return cur + prev - (prev * elapsed_ms) // window_ms


# -- entries --------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Entry:
    expires: float


@dataclass(slots=True, eq=False)
class _Counter(_Entry):
    value: int = 0


@dataclass(slots=True, eq=False)
class _Window(_Entry):
    window_ms: int = 0
    bucket: int = 0
    cur: int = 0
    prev: int = 0


@dataclass(slots=True, eq=False)
class _Set(_Entry):
    members: dict[str, float] = field(default_factory=dict)
    prune_at: int = 16


@dataclass(slots=True, eq=False)
class _Value(_Entry):
    value: str = ""


_E = TypeVar("_E", bound=_Entry)


class MemoryStore:
    """In-process :class:`~filters.state.StateStore` with expiry and a size cap.

    ``clock`` gives seconds (monotonic); ``max_keys`` caps the number of entries (one per
    key and kind), ``max_set_members`` the members of one set.
    """

    def __init__(self, clock: Clock = time.monotonic, max_keys: int = 1_000_000, *,
                 max_set_members: int = 100_000) -> None:
        if max_keys < 1 or max_set_members < 1:
            raise ValueError("max_keys and max_set_members must be at least 1")
        self._clock = clock
        self.max_keys = max_keys
        self.max_set_members = max_set_members
        self._entries: OrderedDict[tuple[Kind, str], _Entry] = OrderedDict()
        self._heap: list[tuple[float, int, tuple[Kind, str], _Entry]] = []
        self._seq = 0
        self.evictions = 0
        """Entries dropped by the size cap (least recently used first) since creation."""
        self.expired = 0
        """Entries removed because they expired (lazily or by the sweep)."""
        self.set_evictions = 0
        """Set members dropped by ``max_set_members`` (closest to expiry first)."""

    # ------------------------------------------------------------------ StateStore

    async def incr(self, key: str, amount: int = 1, *, ttl: float) -> int:
        check_ttl(ttl)
        now = self._tick()
        entry = self._get("c", key, _Counter, now)
        if entry is None:
            entry = self._create("c", key, _Counter(expires=now + ttl))
        entry.value += amount
        return entry.value

    async def get_counter(self, key: str) -> int:
        entry = self._get("c", key, _Counter, self._tick())
        return 0 if entry is None else entry.value

    async def hit(self, key: str, *, window: float, amount: int = 1) -> int:
        window_ms = to_ms(check_window(window))
        now = self._tick()
        now_ms = math.floor(now * 1000)
        bucket, elapsed = divmod(now_ms, window_ms)
        entry = self._get("w", key, _Window, now)
        cur, prev = self._buckets(entry, window_ms, bucket)
        cur += amount
        expires = now + 2 * window_ms / 1000
        if entry is None:
            entry = self._create("w", key, _Window(expires=expires))
        entry.expires = expires
        entry.window_ms, entry.bucket, entry.cur, entry.prev = window_ms, bucket, cur, prev
        return weighted_count(prev, cur, elapsed, window_ms)

    async def window_count(self, key: str, *, window: float) -> int:
        window_ms = to_ms(check_window(window))
        now = self._tick()
        bucket, elapsed = divmod(math.floor(now * 1000), window_ms)
        cur, prev = self._buckets(self._get("w", key, _Window, now), window_ms, bucket)
        return weighted_count(prev, cur, elapsed, window_ms)

    async def set_add(self, key: str, member: str, *, ttl: float) -> None:
        check_ttl(ttl)
        now = self._tick()
        entry = self._get("s", key, _Set, now)
        if entry is None:
            entry = self._create("s", key, _Set(expires=now + ttl,
                                                prune_at=min(16, self.max_set_members + 1)))
        members = entry.members
        members.pop(member, None)  # re-insert: dict order then follows the last add
        members[member] = now + ttl
        entry.expires = max(entry.expires, now + ttl)
        if len(members) >= entry.prune_at:
            for name in [m for m, exp in members.items() if exp <= now]:
                del members[name]
            cap = self.max_set_members
            if len(members) > cap:  # drop those closest to expiry, 10 % below the cap
                drop = heapq.nsmallest(len(members) - (cap - cap // 10), members.items(),
                                       key=lambda item: item[1])
                for name, _ in drop:
                    del members[name]
                self.set_evictions += len(drop)
            entry.prune_at = min(max(16, 2 * len(members)), cap + 1)

    async def set_contains(self, key: str, member: str) -> bool:
        now = self._tick()
        entry = self._get("s", key, _Set, now)
        if entry is None:
            return False
        expires = entry.members.get(member)
        return expires is not None and expires > now

    async def put(self, key: str, value: str, *, ttl: float, only_if_absent: bool = False
                  ) -> bool:
        check_ttl(ttl)
        now = self._tick()
        entry = self._get("v", key, _Value, now)
        if entry is not None and only_if_absent:
            return False
        # A fresh entry either way: SET replaces the value and its expiry.
        self._entries.pop(("v", key), None)
        self._create("v", key, _Value(expires=now + ttl, value=value))
        return True

    async def fetch(self, key: str) -> str | None:
        entry = self._get("v", key, _Value, self._tick())
        return None if entry is None else entry.value

    async def delete(self, key: str) -> None:
        self._tick()
        for kind in _KINDS:
            self._entries.pop((kind, key), None)

    @property
    def degraded(self) -> bool:
        """Always False: this is node-local state, not a substitute for it."""
        return False

    async def aclose(self) -> None:
        self._entries.clear()
        self._heap.clear()

    # ------------------------------------------------------------------ inspection

    def __len__(self) -> int:
        """Entries held, dead ones not yet swept included."""
        return len(self._entries)

    def ttl(self, key: str) -> dict[str, float]:
        """Remaining lifetime (seconds) of each live kind stored under ``key`` (tests)."""
        now = self._clock()
        return {kind: entry.expires - now for kind in _KINDS
                if (entry := self._entries.get((kind, key))) is not None
                and entry.expires > now}

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _buckets(entry: _Window | None, window_ms: int, bucket: int) -> tuple[int, int]:
        """(current, previous) bucket counts for bucket index ``bucket``."""
        if entry is None or entry.window_ms != window_ms:
            return 0, 0
        if entry.bucket == bucket:
            return entry.cur, entry.prev
        if entry.bucket == bucket - 1:
            return 0, entry.cur
        return 0, 0

    def _tick(self) -> float:
        """Now, after sweeping at most SWEEP_BATCH due heap items."""
        now = self._clock()
        heap = self._heap
        entries = self._entries
        for _ in range(SWEEP_BATCH):
            if not heap or heap[0][0] > now:
                break
            _, _, ident, entry = heapq.heappop(heap)
            if entries.get(ident) is not entry:
                continue  # deleted, evicted or replaced since it was scheduled
            if entry.expires > now:
                self._schedule(ident, entry)  # extended meanwhile
            else:
                del entries[ident]
                self.expired += 1
        return now

    def _schedule(self, ident: tuple[Kind, str], entry: _Entry) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (entry.expires, self._seq, ident, entry))

    def _get(self, kind: Kind, key: str, cls: type[_E], now: float) -> _E | None:
        ident = (kind, key)
        entry = self._entries.get(ident)
        if entry is None:
            return None
        if entry.expires <= now:
            del self._entries[ident]
            self.expired += 1
            return None
        self._entries.move_to_end(ident)
        assert isinstance(entry, cls)
        return entry

    def _create(self, kind: Kind, key: str, entry: _E) -> _E:
        ident = (kind, key)
        entries = self._entries
        while len(entries) >= self.max_keys:
            entries.popitem(last=False)
            self.evictions += 1
        entries[ident] = entry
        self._schedule(ident, entry)
        if len(self._heap) > 2 * len(entries) + 64:
            self._heap = [item for item in self._heap if entries.get(item[2]) is item[3]]
            heapq.heapify(self._heap)
        return entry
