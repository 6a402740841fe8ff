"""Coalesced rate-limit checks against real Redis: one script call for a tenant's
burst, with the decisions of separate calls in the same order, and failures,
timeouts and cancellations confined to the requests they concern.

The script calls are watched (and, where a test needs a burst to queue, held)
at the adapter: ``ScriptCalls`` wraps the client's EVALSHA and passes each call
on to Redis unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import pytest

from dpp.adapters.redis import Redis, RedisError, create_redis
from dpp.ids import new_id
from dpp.tenancy import ratelimit
from dpp.tenancy.principal import Principal
from dpp.tenancy.ratelimit import (
    BATCH_MAX,
    RateLimitDecision,
    RateLimiter,
    RateLimiterStatistics,
    RateLimitUnavailable,
)
from tests.integration.test_ratelimit import principal
from tests.redis_cluster import single_and_cluster
from tests.tcp_proxy import TcpProxy, proxy_to

if TYPE_CHECKING:
    from tests.services import TestServices

POLL_S = 0.001
IDLE = RateLimiterStatistics(tenants_in_flight=0, checks_queued=0)


class ScriptCalls:
    """The limiter's script calls as its Redis client makes them: ``sizes`` holds
    each call's number of checks, in order; a call whose index is in ``held``
    waits for ``release(index)`` before it goes to Redis."""

    def __init__(self, redis: Redis, monkeypatch: pytest.MonkeyPatch, held: Iterable[int] = ()):
        self.sizes: list[int] = []
        self._gates = {index: asyncio.Event() for index in held}
        evalsha = redis.evalsha

        async def watched(sha: str, numkeys: int, *keys_and_arguments: Any) -> Any:
            index = len(self.sizes)
            self.sizes.append(numkeys // 2)  # two keys per check
            gate = self._gates.get(index)
            if gate is not None:
                await gate.wait()
            return await evalsha(sha, numkeys, *keys_and_arguments)

        monkeypatch.setattr(redis, "evalsha", watched)

    def release(self, index: int) -> None:
        self._gates[index].set()

    async def wait_calls(self, count: int) -> None:
        await until(lambda: len(self.sizes) >= count)


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / POLL_S)):
        if condition():
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"not so within {timeout_s} s")


async def wait_queued(limiter: RateLimiter, count: int) -> None:
    await until(lambda: limiter.statistics().checks_queued == count)


Outcome = RateLimitDecision | BaseException
ANSWER_TIMEOUT_S = 10.0  # a check left unanswered fails its test instead of hanging it


async def answers(*checks: Awaitable[Outcome]) -> list[Outcome]:
    async with asyncio.timeout(ANSWER_TIMEOUT_S):
        return list(await asyncio.gather(*checks))


async def outcome(check: Awaitable[RateLimitDecision]) -> Outcome:
    try:
        return await check
    except RateLimitUnavailable as error:
        return error


def start(limiter: RateLimiter, who: Principal) -> asyncio.Task[Outcome]:
    return asyncio.get_running_loop().create_task(outcome(limiter.check(who)))


async def burst(
    limiter: RateLimiter, calls: ScriptCalls, principals: list[Principal]
) -> list[Outcome]:
    """The first principal's check leads (its call held as call 0); the rest queue
    behind it, in order; then call 0 goes and the queue follows."""
    tasks = [start(limiter, principals[0])]
    await calls.wait_calls(1)
    tasks += [start(limiter, who) for who in principals[1:]]
    await wait_queued(limiter, len(principals) - 1)
    calls.release(0)
    return await answers(*tasks)


def summary(decision: Outcome) -> tuple[object, ...]:
    assert isinstance(decision, RateLimitDecision), decision
    return (decision.allowed, decision.policy, decision.quota, decision.remaining)


@single_and_cluster
async def test_a_burst_is_decided_as_separate_calls_in_that_order_would(
    limiter: RateLimiter, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two keys of one tenant interleaved in one batch: the tenant's 10 a minute
    hold across both, and the limited key's own 3 hold inside the batch."""
    pattern = "LULLUULUUULULLUUUUULLUUUUU"  # L: the key limited to 3/min; U: unlimited

    def requests(tenant_id: str) -> list[Principal]:
        limited = principal(10, 3, tenant_id=tenant_id)
        unlimited = principal(10, None, tenant_id=tenant_id)
        return [limited if letter == "L" else unlimited for letter in pattern]

    sequential = [await limiter.check(who) for who in requests(new_id("ten"))]
    calls = ScriptCalls(redis, monkeypatch, held=[0])
    batched = await burst(limiter, calls, requests(new_id("ten")))

    assert calls.sizes == [1, len(pattern) - 1]  # the leader's call, then one for the rest
    assert [summary(d) for d in batched] == [summary(d) for d in sequential]
    assert batched == sequential  # headers' seconds too: both runs took well under 1 s
    assert sum(d.allowed for d in sequential) == 10
    allowed_limited = [d for d, letter in zip(sequential, pattern, strict=True) if letter == "L"]
    assert sum(d.allowed for d in allowed_limited) == 3
    assert limiter.statistics() == IDLE


@single_and_cluster
async def test_concurrent_checks_share_calls_and_admit_exactly_the_burst(
    limiter: RateLimiter, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = ScriptCalls(redis, monkeypatch)
    who = principal(100)
    decisions = await answers(*(limiter.check(who) for _ in range(300)))
    assert sum(d.allowed for d in decisions) == 100
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(100))
    assert len(calls.sizes) < 300 and sum(calls.sizes) == 300
    assert max(calls.sizes) <= BATCH_MAX
    assert limiter.statistics() == IDLE


async def test_a_queue_longer_than_the_cap_goes_in_several_calls(
    limiter: RateLimiter, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = ScriptCalls(redis, monkeypatch, held=[0])
    decisions = await burst(limiter, calls, [principal(1000)] * 151)
    assert calls.sizes == [1, BATCH_MAX, BATCH_MAX, 150 - 2 * BATCH_MAX]
    assert [summary(d)[3] for d in decisions] == list(range(999, 999 - 151, -1))


@single_and_cluster
async def test_tenants_are_never_mixed_in_one_call(
    limiter: RateLimiter, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = ScriptCalls(redis, monkeypatch, held=[0, 1])
    one, two = principal(50), principal(50)
    first = [start(limiter, one), start(limiter, two)]
    await calls.wait_calls(2)  # each tenant leads its own call
    rest = [start(limiter, who) for who in [one, two] * 5]
    await wait_queued(limiter, 10)
    calls.release(0)
    calls.release(1)
    decisions = await answers(*first, *rest)
    assert sorted(calls.sizes) == [1, 1, 5, 5]
    assert all(isinstance(d, RateLimitDecision) and d.allowed for d in decisions)


@single_and_cluster
async def test_a_missing_script_falls_back_to_eval_for_a_batch(
    limiter: RateLimiter, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ratelimit, "SCRIPT_SHA1", "0" * 40)
    calls = ScriptCalls(redis, monkeypatch, held=[0])
    decisions = await burst(limiter, calls, [principal(10)] * 5)
    assert [summary(d)[3] for d in decisions] == [9, 8, 7, 6, 5]
    assert calls.sizes == [1, 4]


@pytest.fixture
async def proxied(services: TestServices, redis_prefix: str) -> AsyncIterator[TcpProxy]:
    async with proxy_to(services.redis_url) as proxy:
        yield proxy


async def test_redis_down_fails_every_check_of_the_batch_then_the_next_works(
    proxied: TcpProxy, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ratelimit, "CHECK_TIMEOUT_S", 1.0)  # redis-py retries with backoff
    client = create_redis(f"redis://{proxied.address}/0")
    try:
        limiter = RateLimiter(client, redis_prefix)
        who = principal(20)
        calls = ScriptCalls(client, monkeypatch, held=[0, 1])
        leader = start(limiter, who)
        await calls.wait_calls(1)
        queued = [start(limiter, who) for _ in range(8)]
        await wait_queued(limiter, 8)
        calls.release(0)
        assert summary(await leader) == (True, "tenant", 20, 19)
        await calls.wait_calls(2)  # the queued eight, in one call, held
        await proxied.cut()
        started = time.monotonic()
        calls.release(1)
        failed = await answers(*queued)
        assert time.monotonic() - started < 2.0
        assert all(isinstance(f, RateLimitUnavailable) for f in failed), failed
        assert limiter.statistics() == IDLE

        await proxied.restore()
        decisions = await burst(limiter, ScriptCalls(client, monkeypatch, held=[0]), [who] * 6)
        # the failed batch recorded nothing: the leader's 19 left, then these
        assert [summary(d)[3] for d in decisions] == [18, 17, 16, 15, 14, 13]
    finally:
        await client.aclose()


async def test_a_batch_past_its_deadline_fails_all_of_it_and_no_later(
    limiter: RateLimiter, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One timeout for the batch, at its first check's deadline (queued time
    included): a Redis that does not answer costs each request at most
    CHECK_TIMEOUT_S, however long it queued behind the call before."""
    monkeypatch.setattr(ratelimit, "CHECK_TIMEOUT_S", 0.6)
    calls = ScriptCalls(redis, monkeypatch, held=[0, 1])  # call 1 is never released
    who = principal(20)
    leader = start(limiter, who)
    await calls.wait_calls(1)
    started = time.monotonic()
    queued = [start(limiter, who) for _ in range(5)]
    await wait_queued(limiter, 5)
    await asyncio.sleep(0.35)  # a slow leader's call: the queue waits behind it
    calls.release(0)
    assert summary(await leader)[0] is True
    failed = await answers(*queued)
    waited_s = time.monotonic() - started
    assert all(isinstance(f, RateLimitUnavailable) for f in failed), failed
    assert 0.55 <= waited_s < 0.85, waited_s  # not 0.35 + a whole timeout
    assert limiter.statistics() == IDLE
    assert summary(await limiter.check(who))[3] == 18  # call 2: not held, and it works


@pytest.mark.parametrize("gone", ["while the call is out", "as the drain starts"])
async def test_a_client_gone_from_the_queue_is_neither_sent_nor_recorded(
    limiter: RateLimiter, redis: Redis, monkeypatch: pytest.MonkeyPatch, gone: str
) -> None:
    calls = ScriptCalls(redis, monkeypatch, held=[0])
    who = principal(3)
    queued: list[asyncio.Task[Outcome]] = []

    def cancel_two() -> None:
        queued[0].cancel()
        queued[1].cancel()

    async def leader_then() -> Outcome:
        decision = await limiter.check(who)  # its hand-over just started the drain
        if gone == "as the drain starts":
            cancel_two()
        return decision

    leader = asyncio.get_running_loop().create_task(leader_then())
    await calls.wait_calls(1)
    queued += [start(limiter, who) for _ in range(5)]
    await wait_queued(limiter, 5)
    if gone == "while the call is out":
        cancel_two()
        await asyncio.sleep(0)
    calls.release(0)
    assert summary((await answers(leader))[0]) == (True, "tenant", 3, 2)
    decisions = await answers(*queued[2:])
    assert calls.sizes == [1, 3]  # the two gone were not sent
    assert [d.allowed for d in decisions] == [True, True, False]  # nor recorded
    assert queued[0].cancelled() and queued[1].cancelled()
    assert limiter.statistics() == IDLE


async def test_a_client_gone_during_its_batch_leaves_the_others_their_answers(
    limiter: RateLimiter, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = ScriptCalls(redis, monkeypatch, held=[0, 1])
    who = principal(10)
    leader = start(limiter, who)
    await calls.wait_calls(1)
    queued = [start(limiter, who) for _ in range(4)]
    await wait_queued(limiter, 4)
    calls.release(0)
    await calls.wait_calls(2)
    queued[1].cancel()  # its check is in the call already
    await asyncio.sleep(0)
    calls.release(1)
    await leader
    kept = await answers(queued[0], *queued[2:])
    assert [summary(d)[3] for d in kept] == [8, 6, 5]  # the one gone was recorded (7)
    assert queued[1].cancelled()
    assert limiter.statistics() == IDLE
    assert summary(await limiter.check(who))[3] == 4


async def test_a_leader_gone_still_hands_its_queue_a_call(
    limiter: RateLimiter, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = ScriptCalls(redis, monkeypatch, held=[0])
    who = principal(10)
    leader = start(limiter, who)
    await calls.wait_calls(1)
    queued = [start(limiter, who) for _ in range(3)]
    await wait_queued(limiter, 3)
    leader.cancel()  # the leader's client is gone while its own call is held
    decisions = await answers(*queued)
    assert leader.cancelled()
    assert [summary(d)[3] for d in decisions] == [9, 8, 7]  # the leader's call never ran
    assert calls.sizes == [1, 3]
    assert limiter.statistics() == IDLE


async def test_a_lone_check_behind_a_call_makes_its_own(
    limiter: RateLimiter, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = ScriptCalls(redis, monkeypatch, held=[0])
    decisions = await burst(limiter, calls, [principal(10)] * 2)
    assert calls.sizes == [1, 1]
    assert [summary(d)[3] for d in decisions] == [9, 8]
    assert limiter.statistics() == IDLE


async def test_a_check_told_to_lead_whose_client_is_gone_frees_the_tenant(
    limiter: RateLimiter, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one check behind the leader's call is told to make its own; its client
    goes in that instant (before it runs): the tenant must not stay "in flight",
    or every later check of the tenant would queue behind a call never made."""
    calls = ScriptCalls(redis, monkeypatch, held=[0])
    who = principal(10)
    follower: list[asyncio.Task[Outcome]] = []

    async def leader_then_cancel() -> Outcome:
        decision = await limiter.check(who)  # its hand-over just told the follower to lead
        follower[0].cancel()
        return decision

    leader = asyncio.get_running_loop().create_task(leader_then_cancel())
    await calls.wait_calls(1)
    follower.append(start(limiter, who))
    await wait_queued(limiter, 1)
    calls.release(0)
    assert summary((await answers(leader))[0])[3] == 9
    with pytest.raises(asyncio.CancelledError):
        await follower[0]
    assert limiter.statistics() == IDLE
    assert summary((await answers(limiter.check(who)))[0])[3] == 8  # the one gone: not sent


async def test_the_only_check_queued_gone_leaves_the_leader_its_answer(
    limiter: RateLimiter, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = ScriptCalls(redis, monkeypatch, held=[0])
    who = principal(10)
    leader = start(limiter, who)
    await calls.wait_calls(1)
    queued = start(limiter, who)
    await wait_queued(limiter, 1)
    queued.cancel()
    await asyncio.sleep(0)
    calls.release(0)
    assert summary((await answers(leader))[0])[3] == 9
    assert queued.cancelled() and calls.sizes == [1]  # nothing left to send
    assert limiter.statistics() == IDLE


@pytest.mark.parametrize(
    ("keys", "arguments"),
    [
        (3, [ratelimit.WINDOW_US, 10, 0, 10]),  # a check with one key
        (2, [ratelimit.WINDOW_US, 10]),  # a check without its key quota
        (0, [ratelimit.WINDOW_US]),  # no check at all
    ],
)
async def test_the_script_refuses_a_batch_of_the_wrong_shape(
    redis: Redis, redis_prefix: str, keys: int, arguments: list[int]
) -> None:
    names = [f"{redis_prefix}:ratelimit:{{ten_shape}}:{index}" for index in range(keys)]
    with pytest.raises(RedisError, match="bad batch shape"):
        await redis.eval(ratelimit.SCRIPT, keys, *names, *arguments)
