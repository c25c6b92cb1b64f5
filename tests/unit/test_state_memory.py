"""MemoryStore on a fake clock: expiry, sliding windows, sets, put, the size cap, the sweep."""

from __future__ import annotations

import math

import pytest

from gateway.state import FallbackStore, make_store
from gateway.state_memory import SWEEP_BATCH, MemoryStore, to_ms, weighted_count


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryStore:
    return MemoryStore(clock=clock)


# -- counters -------------------------------------------------------------------------


async def test_counter_counts_and_expires_ttl_after_creation(store: MemoryStore,
                                                              clock: FakeClock) -> None:
    assert await store.get_counter("c") == 0
    assert await store.incr("c", ttl=10) == 1
    clock.advance(6)
    assert await store.incr("c", 4, ttl=10) == 5  # does not extend the expiry
    assert await store.incr("c", -2, ttl=10) == 3
    assert await store.get_counter("c") == 3
    clock.advance(3.999)
    assert await store.get_counter("c") == 3
    clock.advance(0.001)  # 10 s after creation
    assert await store.get_counter("c") == 0
    assert await store.incr("c", ttl=10) == 1  # a new counter with a new expiry
    clock.advance(9.9)
    assert await store.get_counter("c") == 1


# -- sliding windows ------------------------------------------------------------------


def test_weighted_count_rounds_the_previous_bucket_up() -> None:
    assert weighted_count(prev=4, cur=1, elapsed_ms=0, window_ms=10_000) == 5
    assert weighted_count(prev=4, cur=1, elapsed_ms=1, window_ms=10_000) == 5
    assert weighted_count(prev=4, cur=1, elapsed_ms=2_500, window_ms=10_000) == 4
    assert weighted_count(prev=4, cur=1, elapsed_ms=2_501, window_ms=10_000) == 4
    assert weighted_count(prev=4, cur=1, elapsed_ms=5_001, window_ms=10_000) == 3
    assert weighted_count(prev=4, cur=0, elapsed_ms=9_999, window_ms=10_000) == 1
    assert weighted_count(prev=0, cur=7, elapsed_ms=5_000, window_ms=10_000) == 7
    for prev in range(0, 50, 7):  # = prev * (w - e) / w rounded up
        for elapsed in range(0, 10_000, 137):
            assert weighted_count(prev, 0, elapsed, 10_000) == math.ceil(
                prev * (10_000 - elapsed) / 10_000)


async def test_window_two_buckets_weighted(store: MemoryStore, clock: FakeClock) -> None:
    clock.now = 100.0  # bucket 10 of a 10 s window starts here
    assert [await store.hit("w", window=10) for _ in range(3)] == [1, 2, 3]
    assert await store.hit("w", window=10, amount=5) == 8
    assert await store.window_count("w", window=10) == 8
    clock.now = 109.999
    assert await store.window_count("w", window=10) == 8
    clock.now = 112.5  # bucket 11, a quarter in: 8 * 0.75 of the previous bucket
    assert await store.window_count("w", window=10) == 6
    assert await store.hit("w", window=10) == 7
    clock.now = 117.5
    assert await store.window_count("w", window=10) == 1 + 2
    clock.now = 120.0  # bucket 12: bucket 10 is out, bucket 11 had one hit
    assert await store.window_count("w", window=10) == 1
    clock.now = 125.0
    assert await store.window_count("w", window=10) == 1  # 1 * 0.5 rounded up
    clock.now = 130.0
    assert await store.window_count("w", window=10) == 0


async def test_window_skipping_buckets_and_expiry(store: MemoryStore, clock: FakeClock) -> None:
    clock.now = 100.0
    await store.hit("w", window=10, amount=9)
    clock.now = 125.0  # two buckets later: nothing left
    assert await store.window_count("w", window=10) == 0
    assert await store.hit("w", window=10) == 1
    assert store.ttl("w") == {"w": pytest.approx(20.0)}  # two windows after the last hit
    clock.advance(19.999)
    assert len(store) == 1
    clock.advance(0.001)
    assert await store.window_count("w", window=10) == 0
    assert len(store) == 0


async def test_window_count_records_nothing(store: MemoryStore) -> None:
    assert await store.window_count("w", window=60) == 0
    assert len(store) == 0
    await store.hit("w", window=60)
    assert await store.window_count("w", window=60) == 1
    assert await store.window_count("w", window=60) == 1


async def test_window_length_change_starts_afresh(store: MemoryStore) -> None:
    await store.hit("w", window=60, amount=5)
    assert await store.window_count("w", window=30) == 0
    assert await store.hit("w", window=30) == 1
    assert await store.window_count("w", window=60) == 0


async def test_windows_in_whole_milliseconds(store: MemoryStore, clock: FakeClock) -> None:
    assert to_ms(0.0004) == 1 and to_ms(1.2345) == 1234 and to_ms(0.2) == 200
    clock.now = 1.0
    assert await store.hit("w", window=0.25) == 1  # bucket 4 of 250 ms
    clock.now = 1.125
    assert await store.window_count("w", window=0.25) == 1
    clock.now = 1.25
    assert await store.window_count("w", window=0.25) == 1
    clock.now = 1.375
    assert await store.window_count("w", window=0.25) == 1  # 1 * 0.5 rounded up
    clock.now = 1.5
    assert await store.window_count("w", window=0.25) == 0


# -- sets -----------------------------------------------------------------------------


async def test_set_members_expire_one_by_one(store: MemoryStore, clock: FakeClock) -> None:
    assert not await store.set_contains("s", "a")
    await store.set_add("s", "a", ttl=10)
    clock.advance(5)
    await store.set_add("s", "b", ttl=10)
    assert await store.set_contains("s", "a") and await store.set_contains("s", "b")
    assert not await store.set_contains("s", "c")
    clock.advance(5)  # a is 10 s old
    assert not await store.set_contains("s", "a")
    assert await store.set_contains("s", "b")
    assert store.ttl("s") == {"s": pytest.approx(5.0)}  # lives as long as its last member
    clock.advance(5)
    assert not await store.set_contains("s", "b")
    assert len(store) == 0 or store.ttl("s") == {}


async def test_set_readd_refreshes(store: MemoryStore, clock: FakeClock) -> None:
    await store.set_add("s", "a", ttl=10)
    clock.advance(8)
    await store.set_add("s", "a", ttl=10)
    clock.advance(8)
    assert await store.set_contains("s", "a")
    await store.set_add("s", "a", ttl=1)  # refreshed to the shorter ttl too
    clock.advance(1)
    assert not await store.set_contains("s", "a")


async def test_set_member_cap_drops_those_closest_to_expiry(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock, max_set_members=20)
    for i in range(40):
        await store.set_add("s", f"m{i}", ttl=100 + i)  # later members live longer
    present = [i for i in range(40) if await store.set_contains("s", f"m{i}")]
    assert 18 <= len(present) <= 21
    assert present == list(range(40 - len(present), 40))
    assert store.set_evictions == 40 - len(present)


async def test_set_prunes_expired_members(store: MemoryStore, clock: FakeClock) -> None:
    for i in range(1000):
        await store.set_add("s", f"m{i}", ttl=1)
        clock.advance(0.01)
    entry = store._entries[("s", "s")]
    assert len(entry.members) < 300  # type: ignore[attr-defined]


# -- values ---------------------------------------------------------------------------


async def test_put_only_if_absent(store: MemoryStore, clock: FakeClock) -> None:
    assert await store.fetch("v") is None
    assert await store.put("v", "one", ttl=10, only_if_absent=True)
    assert not await store.put("v", "two", ttl=100, only_if_absent=True)
    assert await store.fetch("v") == "one"
    assert store.ttl("v") == {"v": pytest.approx(10.0)}  # the failed put changed nothing
    clock.advance(10)
    assert await store.fetch("v") is None
    assert await store.put("v", "three", ttl=10, only_if_absent=True)
    assert await store.put("v", "four", ttl=20)  # overwrites value and expiry
    clock.advance(15)
    assert await store.fetch("v") == "four"


async def test_delete_removes_every_kind(store: MemoryStore) -> None:
    await store.incr("k", ttl=10)
    await store.hit("k", window=10)
    await store.set_add("k", "m", ttl=10)
    await store.put("k", "v", ttl=10)
    await store.put("other", "v", ttl=10)
    assert len(store) == 5
    await store.delete("k")
    await store.delete("never-existed")
    assert await store.get_counter("k") == 0
    assert await store.window_count("k", window=10) == 0
    assert not await store.set_contains("k", "m")
    assert await store.fetch("k") is None
    assert await store.fetch("other") == "v"


async def test_kinds_do_not_clash(store: MemoryStore) -> None:
    assert await store.incr("k", ttl=10) == 1
    assert await store.hit("k", window=10) == 1
    assert await store.put("k", "x", ttl=10)
    await store.set_add("k", "x", ttl=10)
    assert await store.get_counter("k") == 1
    assert await store.fetch("k") == "x"


# -- bounds ---------------------------------------------------------------------------


async def test_size_cap_evicts_least_recently_used(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock, max_keys=3)
    await store.incr("a", ttl=100)
    await store.incr("b", ttl=100)
    await store.incr("c", ttl=100)
    assert await store.get_counter("a") == 1  # a is now the most recently used
    await store.incr("d", ttl=100)  # evicts b
    assert len(store) == 3
    assert store.evictions == 1
    assert await store.get_counter("b") == 0
    assert [await store.get_counter(k) for k in "acd"] == [1, 1, 1]
    for i in range(100):
        await store.put(f"v{i}", "x", ttl=100)
    assert len(store) == 3
    assert store.evictions == 101


async def test_sweep_removes_dead_entries_bounded_per_call(store: MemoryStore,
                                                           clock: FakeClock) -> None:
    for i in range(100):
        await store.incr(f"short{i}", ttl=1)
    await store.hit("long", window=100)
    await store.set_add("extended", "m", ttl=1)
    clock.advance(0.5)
    await store.set_add("extended", "m", ttl=100)  # extended: the sweep must keep it
    clock.advance(1)
    assert len(store) == 102
    await store.get_counter("unrelated")
    assert len(store) == 102 - SWEEP_BATCH  # at most SWEEP_BATCH per operation
    for _ in range(10):
        await store.get_counter("unrelated")
    assert len(store) == 2
    assert store.expired == 100
    assert await store.set_contains("extended", "m")
    assert await store.window_count("long", window=100) == 1
    assert len(store._heap) <= 2 * len(store) + 64


async def test_heap_stays_bounded_under_churn(store: MemoryStore) -> None:
    for i in range(5000):
        await store.put(f"k{i % 10}", "x", ttl=1000)  # replaces: old heap items go stale
        await store.delete(f"k{(i + 5) % 10}")
    assert len(store) <= 10
    assert len(store._heap) <= 2 * len(store) + 65


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf])
async def test_invalid_ttl_and_window(store: MemoryStore, bad: float) -> None:
    with pytest.raises(ValueError):
        await store.incr("k", ttl=bad)
    with pytest.raises(ValueError):
        await store.set_add("k", "m", ttl=bad)
    with pytest.raises(ValueError):
        await store.put("k", "v", ttl=bad)
    with pytest.raises(ValueError):
        await store.hit("k", window=bad)
    with pytest.raises(ValueError):
        await store.window_count("k", window=bad)
    assert len(store) == 0


async def test_never_degraded_and_aclose(store: MemoryStore) -> None:
    await store.incr("k", ttl=10)
    assert store.degraded is False
    await store.aclose()
    assert len(store) == 0


async def test_make_store_without_redis_is_memory() -> None:
    store = make_store(None)
    assert isinstance(store, MemoryStore)
    store2 = make_store("redis://127.0.0.1:1/0")
    assert isinstance(store2, FallbackStore)
    await store2.aclose()
