"""Per-tenant and per-key request rate limits, enforced across replicas in Redis.

One atomic script call (``ratelimit.lua`` beside this module, GCRA) checks a
request against the tenant's plan limit (policy ``"tenant"``) and, when the
key carries its own lower limit, the key's (policy ``"key"``), and records the
request only when both allow it. docs/rate-limits.md says why GCRA and how
the header numbers are derived.

Coalescing: while a script call for a tenant is in flight, that tenant's
further checks queue here; when the call returns, the queue goes to Redis as
ONE call (at most ``BATCH_MAX`` checks; a queue of one makes its own) that
decides them in order, exactly as separate calls in that order would. A
check that finds nothing in flight makes its call itself (no task hop), so a
lone request costs what it did before coalescing; a burst costs one call per
round trip instead of one per request. Only one tenant's checks share a call:
their keys share the ``{tenant_id}`` hash slot, as a Redis Cluster requires of
a script's keys.

Fail closed: when Redis cannot answer, ``check`` raises ``RateLimitUnavailable``
and the caller answers 503 — never an unlimited request.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from dpp.adapters.redis import REDIS_ERRORS, NoScriptError, Redis, tenant_key

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from dpp.tenancy.principal import Principal

WINDOW_S: Final = 60  # every DPP quota is "per minute"
WINDOW_US: Final = WINDOW_S * 1_000_000
REPLY_FIELDS: Final = 6  # integers per check in the script's reply
CHECK_TIMEOUT_S: Final = 2.0  # a request waits no longer than this for a decision
BATCH_MAX: Final = 64  # checks per script call: bounds the call's size and Redis's time in it
POLICY_TENANT: Final = "tenant"
POLICY_KEY: Final = "key"
SCRIPT: Final = Path(__file__).with_name("ratelimit.lua").read_text(encoding="utf-8")
SCRIPT_SHA1: Final = hashlib.sha1(SCRIPT.encode("utf-8")).hexdigest()
# A fixed window counter for attempts (the console's sign-in): count this one,
# start the window on the first, answer the count and the window's time left.
ATTEMPT_SCRIPT: Final = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local left = redis.call('PTTL', KEYS[1])
if left < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]); left = tonumber(ARGV[1]) end
return {count, left}
"""


class RateLimitUnavailable(Exception):
    """Redis did not answer the rate-limit check; the request must be refused (503)."""


@dataclass(frozen=True, slots=True)
class RateLimitDecision:
    """The outcome of one check, named after the tightest policy.

    ``quota`` requests per ``window_s``; ``remaining`` more allowed right now;
    ``reset_s`` until the full quota is available again; ``retry_after_s``
    (whole seconds, at least 1) only when refused.
    """

    allowed: bool
    policy: str
    quota: int
    window_s: int
    remaining: int
    reset_s: int
    retry_after_s: int | None

    def __post_init__(self) -> None:
        assert self.policy in (POLICY_TENANT, POLICY_KEY), self.policy
        assert self.quota >= 1 and self.window_s == WINDOW_S
        assert 0 <= self.remaining < self.quota
        assert self.reset_s >= 0
        if self.allowed:
            assert self.retry_after_s is None
        else:
            assert self.retry_after_s is not None and self.retry_after_s >= 1
            assert self.remaining == 0

    def headers(self) -> list[tuple[str, str]]:
        """The fields of draft-ietf-httpapi-ratelimit-headers-10, plus Retry-After on 429."""
        fields = [
            ("RateLimit-Policy", f'"{self.policy}";q={self.quota};w={self.window_s}'),
            ("RateLimit", f'"{self.policy}";r={self.remaining};t={self.reset_s}'),
        ]
        if self.retry_after_s is not None:
            fields.append(("Retry-After", str(self.retry_after_s)))
        return fields


def _whole_seconds_up(microseconds: int) -> int:
    return math.ceil(microseconds / 1_000_000)


def _unavailable(error: BaseException) -> RateLimitUnavailable:
    unavailable = RateLimitUnavailable(f"rate limiter unavailable ({type(error).__name__})")
    unavailable.__cause__ = error
    return unavailable


@dataclass(frozen=True, slots=True)
class RateLimiterStatistics:
    """``tenants_in_flight``: tenants with a script call under way; ``checks_queued``:
    checks waiting for their tenant's next call."""

    tenants_in_flight: int
    checks_queued: int


@dataclass(slots=True)
class _Check:
    """A check queued behind its tenant's call in flight: its two state keys,
    quotas (``key_quota`` 0 when the key's own limit cannot bind), the loop
    time by which it must be answered, and its answer to be."""

    keys: tuple[str, str]
    tenant_quota: int
    key_quota: int
    deadline: float
    answer: asyncio.Future[RateLimitDecision | None]  # None: "lead your own call"


def _decision(reply: Sequence[bytes], key_quota: int) -> RateLimitDecision:
    allowed, tightest, quota, remaining, reset_us, retry_after_us = (int(v) for v in reply)
    assert allowed in (0, 1) and tightest in (1, 2), reply
    assert tightest == 1 or key_quota > 0
    return RateLimitDecision(
        allowed=allowed == 1,
        policy=POLICY_TENANT if tightest == 1 else POLICY_KEY,
        quota=quota,
        window_s=WINDOW_S,
        remaining=remaining,
        reset_s=_whole_seconds_up(reset_us),
        retry_after_s=None if allowed else max(1, _whole_seconds_up(retry_after_us)),
    )


class RateLimiter:
    """Checks and records requests against their principals' policies, one script
    call per tenant at a time (see the module's docstring: coalescing)."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        *,
        batch_max: int = BATCH_MAX,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        """``on_batch`` is told the number of checks each script call answers."""
        assert prefix and batch_max >= 1
        self._on_batch = on_batch
        self._redis = redis
        self._prefix = prefix
        self._batch_max = batch_max
        # tenant id -> the checks queued behind its call in flight; a tenant is
        # here exactly while a call for it is under way or about to be (by its
        # leader, a drain, or the lone queued check told to lead)
        self._queues: dict[str, list[_Check]] = {}
        self._drains: set[asyncio.Task[None]] = set()

    def keys(self, principal: Principal) -> tuple[str, str]:
        """The tenant's and the key's state keys; one hash slot ({tenant_id})."""
        tenant = tenant_key(self._prefix, "ratelimit", principal.tenant_id)
        key = tenant_key(self._prefix, "ratelimit", principal.tenant_id, "key", principal.key_id)
        return tenant, key

    def statistics(self) -> RateLimiterStatistics:
        return RateLimiterStatistics(
            tenants_in_flight=len(self._queues),
            checks_queued=sum(len(queue) for queue in self._queues.values()),
        )

    async def check(self, principal: Principal) -> RateLimitDecision:
        """Allow and record the request, or refuse it; raises RateLimitUnavailable
        when Redis gives no answer within CHECK_TIMEOUT_S."""
        tenant_quota = principal.requests_per_minute
        key_quota = principal.key_requests_per_minute
        # a key limit at or above the tenant's can never bind: leave it out
        if key_quota is None or key_quota >= tenant_quota:
            key_quota = 0
        keys = self.keys(principal)
        tenant_id = principal.tenant_id
        loop = asyncio.get_running_loop()
        queue = self._queues.get(tenant_id)
        if queue is None:
            # nothing in flight: this check leads, making its call itself
            self._queues[tenant_id] = queue = []
            deadline = loop.time() + CHECK_TIMEOUT_S
        else:
            # a call for this tenant is under way: join the next one. No timer of
            # its own: whoever makes that call answers it by its deadline.
            answer: asyncio.Future[RateLimitDecision | None] = loop.create_future()
            deadline = loop.time() + CHECK_TIMEOUT_S
            queue.append(_Check(keys, tenant_quota, key_quota, deadline, answer))
            try:
                decision = await answer
            except asyncio.CancelledError:
                if _told_to_lead(answer):
                    # told to lead, but its client went first: the next one leads
                    self._hand_over(tenant_id, queue)
                raise
            if decision is not None:
                return decision
            # None: it was the only check behind the call that just returned, so
            # it leads its own (a batch of one needs no task)
            if loop.time() >= deadline:
                self._hand_over(tenant_id, queue)
                raise RateLimitUnavailable("rate limiter unavailable (queued past its deadline)")
        try:
            # asyncio's own timeout: this adapter is asyncio-only (redis-py), and
            # anyio.fail_after cost ~8 % of a loaded replica's CPU on this path
            self._on_batch(1)
            async with asyncio.timeout_at(deadline):
                reply = await self._call(keys, (WINDOW_US, tenant_quota, key_quota))
        except REDIS_ERRORS as error:
            raise _unavailable(error) from error
        finally:
            # whatever became of the call (answer, failure, the client gone), the
            # checks that queued behind it get theirs
            self._hand_over(tenant_id, queue)
        assert len(reply) == REPLY_FIELDS, reply
        return _decision(reply, key_quota)

    def _hand_over(self, tenant_id: str, queue: list[_Check]) -> None:
        """The tenant's call is over: nothing queued, and the tenant is idle; one
        check, and it leads its own call; more, and a drain sends them."""
        queue[:] = [check for check in queue if not check.answer.done()]  # clients gone
        if not queue:
            assert self._queues.pop(tenant_id) is queue
        elif len(queue) == 1:
            queue.pop().answer.set_result(None)
        else:
            # a context of its own: it serves other requests than the one whose
            # call just returned, so it must not carry that one's (log fields)
            drain = asyncio.get_running_loop().create_task(
                self._drain(tenant_id, queue),
                name=f"ratelimit drain {tenant_id}",
                context=contextvars.Context(),
            )
            self._drains.add(drain)
            drain.add_done_callback(self._drains.discard)

    async def _drain(self, tenant_id: str, queue: list[_Check]) -> None:
        """Send the tenant's queued checks, at most ``batch_max`` per call, while at
        least two are queued; then hand over as a leader's call does."""
        batch: list[_Check] = []
        try:
            while len(queue) >= 2:
                taken = queue[: self._batch_max]
                del queue[: self._batch_max]
                # a check whose client went while queued is dropped: not recorded
                batch = [check for check in taken if not check.answer.done()]
                if batch:
                    await self._answer(batch)
        except BaseException:
            # only when the drain itself is cancelled (the loop closing) are
            # checks left unanswered: none may wait forever
            assert self._queues.pop(tenant_id) is queue
            _fail([*batch, *queue], lambda: RateLimitUnavailable("rate limiter stopped"))
            queue.clear()
            raise
        self._hand_over(tenant_id, queue)

    async def _answer(self, batch: list[_Check]) -> None:
        """One call for ``batch``, under one timeout: the earliest deadline of its
        checks (the first queued), so no check waits past its own."""
        deadline = batch[0].deadline
        keys: list[str] = []
        arguments: list[int] = [WINDOW_US]
        for check in batch:
            keys.extend(check.keys)
            arguments.append(check.tenant_quota)
            arguments.append(check.key_quota)
        self._on_batch(len(batch))
        try:
            if asyncio.get_running_loop().time() >= deadline:
                raise TimeoutError("the checks waited out their deadline in the queue")
            async with asyncio.timeout_at(deadline):
                replies = await self._call(keys, arguments)
            assert len(replies) == REPLY_FIELDS * len(batch), (len(replies), len(batch))
        except REDIS_ERRORS as error:
            _fail(batch, functools.partial(_unavailable, error))
            return
        except Exception as error:
            # a fault here (a malformed reply): each request fails with it, as it
            # would have with a call of its own; the drain goes on
            _fail(batch, functools.partial(_same, error))
            return
        for index, check in enumerate(batch):
            if check.answer.done():
                continue  # its client is gone; the check was recorded all the same
            reply = replies[REPLY_FIELDS * index : REPLY_FIELDS * (index + 1)]
            try:
                check.answer.set_result(_decision(reply, check.key_quota))
            except Exception as error:  # a malformed reply: that request fails, not the rest
                check.answer.set_exception(error)

    async def _call(self, keys: Sequence[str], arguments: Sequence[int]) -> list[bytes]:
        """The script over ``keys`` (two per check, all of one tenant) and
        ``arguments`` (the window, then two per check), cached by its SHA1: its
        integers, six per check, as the digits it sent them in."""
        try:
            replies = await self._redis.evalsha(SCRIPT_SHA1, len(keys), *keys, *arguments)
        except NoScriptError:
            # first call on this server (or after SCRIPT FLUSH): EVAL caches it
            replies = await self._redis.eval(SCRIPT, len(keys), *keys, *arguments)
        assert isinstance(replies, bytes), replies
        return replies.split()

    async def attempt(self, name: str, quota: int, window_s: int) -> int | None:
        """Count one attempt at ``name`` (e.g. a sign-in from one address) in Redis,
        so the limit holds across replicas: None while at most ``quota`` attempts
        fell in the current ``window_s`` window, else the seconds until it ends.
        Raises RateLimitUnavailable (fail closed) when Redis cannot answer."""
        assert quota >= 1 and window_s >= 1 and name
        key = f"{self._prefix}:attempts:{name}"
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                count, left_ms = await self._redis.eval(ATTEMPT_SCRIPT, 1, key, window_s * 1000)
        except REDIS_ERRORS as error:
            raise RateLimitUnavailable(
                f"rate limiter unavailable ({type(error).__name__})"
            ) from error
        if int(count) <= quota:
            return None
        return max(1, math.ceil(int(left_ms) / 1000))


def _fail(checks: Sequence[_Check], error: Callable[[], BaseException]) -> None:
    """Answer each of ``checks`` still waiting with ``error()``."""
    for check in checks:
        if not check.answer.done():
            check.answer.set_exception(error())


def _told_to_lead(answer: asyncio.Future[RateLimitDecision | None]) -> bool:
    return (
        answer.done()
        and not answer.cancelled()
        and answer.exception() is None
        and (answer.result() is None)
    )


def _same(error: BaseException) -> BaseException:
    return error
