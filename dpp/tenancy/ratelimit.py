"""Per-tenant and per-key request rate limits, enforced across replicas in Redis.

One atomic script call per request (``ratelimit.lua`` beside this module, GCRA) checks
the tenant's plan limit (policy ``"tenant"``) and, when the key carries its
own lower limit, the key's (policy ``"key"``), and records the request only
when both allow it. docs/rate-limits.md says why GCRA and how the header
numbers are derived.

Fail closed: when Redis cannot answer, ``check`` raises ``RateLimitUnavailable``
and the caller answers 503 — never an unlimited request.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from dpp.adapters.redis import REDIS_ERRORS, NoScriptError, Redis, tenant_key

if TYPE_CHECKING:
    from dpp.tenancy.principal import Principal

WINDOW_S: Final = 60  # every DPP quota is "per minute"
CHECK_TIMEOUT_S: Final = 2.0  # a request waits no longer than this for a decision
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


class RateLimiter:
    """Checks and records one request against its principal's policies."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        assert prefix
        self._redis = redis
        self._prefix = prefix

    def keys(self, principal: Principal) -> tuple[str, str]:
        """The tenant's and the key's state keys; one hash slot ({tenant_id})."""
        tenant = tenant_key(self._prefix, "ratelimit", principal.tenant_id)
        key = tenant_key(self._prefix, "ratelimit", principal.tenant_id, "key", principal.key_id)
        return tenant, key

    async def check(self, principal: Principal) -> RateLimitDecision:
        """Allow and record the request, or refuse it; raises RateLimitUnavailable."""
        tenant_quota = principal.requests_per_minute
        key_quota = principal.key_requests_per_minute
        # a key limit at or above the tenant's can never bind: leave it out
        if key_quota is None or key_quota >= tenant_quota:
            key_quota = 0
        arguments = (tenant_quota, key_quota, WINDOW_S * 1_000_000)
        keys = self.keys(principal)
        try:
            # asyncio's own timeout: this adapter is asyncio-only (redis-py), and
            # anyio.fail_after cost ~8 % of a loaded replica's CPU on this path
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                try:
                    reply = await self._redis.evalsha(SCRIPT_SHA1, 2, *keys, *arguments)
                except NoScriptError:
                    # first call on this server (or after SCRIPT FLUSH): EVAL caches it
                    reply = await self._redis.eval(SCRIPT, 2, *keys, *arguments)
        except REDIS_ERRORS as error:
            raise RateLimitUnavailable(
                f"rate limiter unavailable ({type(error).__name__})"
            ) from error
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
