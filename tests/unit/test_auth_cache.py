"""AuthCache logic on a fake clock: when it answers, expiry, bounds, the epoch
guard and invalidation messages. (The listener against real Redis is in
tests/integration/test_tenancy.py.)"""

from __future__ import annotations

from typing import Any, cast

from dpp.ids import new_id
from dpp.tenancy import auth_cache
from dpp.tenancy.auth_cache import MISS, AuthCache
from dpp.tenancy.principal import Principal


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1_000.0

    def __call__(self) -> float:
        return self.now_s


def principal() -> Principal:
    return Principal(
        tenant_id=new_id("ten"),
        key_id=new_id("key"),
        plan_id="default",
        requests_per_minute=600,
        max_concurrent_runs=10,
        retention_days=30,
        key_requests_per_minute=None,
    )


def subscribed_cache(clock: FakeClock, ttl_s: float = 30.0) -> AuthCache:
    cache = AuthCache(cast(Any, None), "test:auth:revoked", ttl_s=ttl_s, clock=clock)
    cache._on_subscribed(clock())  # what the listener does on the confirmation
    return cache


def digest(index: int) -> bytes:
    return index.to_bytes(32, "big")


def test_off_until_subscribed() -> None:
    clock = FakeClock()
    cache = AuthCache(cast(Any, None), "test:auth:revoked", clock=clock)
    assert not cache.usable()
    cache.put(digest(1), principal(), cache.epoch)
    assert cache.get(digest(1)) is MISS
    assert cache.statistics().entries == 0


def test_positive_and_negative_answers_until_the_ttl() -> None:
    clock = FakeClock()
    cache = subscribed_cache(clock, ttl_s=30.0)
    who = principal()
    cache.put(digest(1), who, cache.epoch)
    cache.put(digest(2), None, cache.epoch)
    assert cache.get(digest(1)) == who
    assert cache.get(digest(2)) is None
    assert cache.get(digest(3)) is MISS
    clock.now_s += 2.0
    cache._heard_at = clock.now_s  # a pong arrived
    clock.now_s += 28.5
    cache._heard_at = clock.now_s
    assert cache.get(digest(1)) is MISS and cache.get(digest(2)) is MISS
    assert cache.statistics().hits == 2


def test_silence_turns_the_cache_off() -> None:
    clock = FakeClock()
    cache = subscribed_cache(clock)
    cache.put(digest(1), principal(), cache.epoch)
    clock.now_s += auth_cache.SILENCE_MAX_S + 0.1
    assert not cache.usable()
    assert cache.get(digest(1)) is MISS


def test_an_answer_read_across_an_eviction_is_not_cached() -> None:
    clock = FakeClock()
    cache = subscribed_cache(clock)
    epoch = cache.epoch
    cache.evict(digest(9))  # any eviction while the lookup was in flight
    cache.put(digest(1), principal(), epoch)
    assert cache.get(digest(1)) is MISS


def test_bounded_lru() -> None:
    clock = FakeClock()
    cache = subscribed_cache(clock)
    for index in range(auth_cache.ENTRIES_MAX + 5):
        cache.put(digest(index), principal(), cache.epoch)
    for index in range(auth_cache.NEGATIVE_ENTRIES_MAX + 5):
        cache.put(digest(10**6 + index), None, cache.epoch)
    statistics = cache.statistics()
    assert statistics.entries == auth_cache.ENTRIES_MAX
    assert statistics.negative_entries == auth_cache.NEGATIVE_ENTRIES_MAX
    assert cache.get(digest(0)) is MISS  # the oldest went first
    assert cache.get(digest(auth_cache.ENTRIES_MAX + 4)) is not MISS


def test_invalidation_messages() -> None:
    clock = FakeClock()
    cache = subscribed_cache(clock)
    for index in range(3):
        cache.put(digest(index), principal(), cache.epoch)
    cache._on_message(digest(1).hex().encode())
    assert cache.get(digest(1)) is MISS and cache.get(digest(0)) is not MISS
    cache._on_message(b"*")
    assert cache.statistics().entries == 0
    cache.put(digest(0), principal(), cache.epoch)
    cache._on_message(b"garbage")  # not understood: forget everything, to be safe
    assert cache.get(digest(0)) is MISS


def test_losing_the_subscription_empties_the_cache() -> None:
    clock = FakeClock()
    cache = subscribed_cache(clock)
    cache.put(digest(1), principal(), cache.epoch)
    cache._on_unsubscribed()
    assert not cache.usable() and cache.statistics().entries == 0
    cache._on_subscribed(clock())
    assert cache.get(digest(1)) is MISS
    assert cache.statistics().subscriptions == 2
