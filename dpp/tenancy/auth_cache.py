"""The per-replica cache of authentication answers, kept honest by Redis pub/sub.

``authenticate`` runs on every ``/v1`` request, so each replica remembers
recent answers — positive (the ``Principal``) and negative (None) — keyed by
the key's SHA-256, never by the key. What makes that safe:

* Revocations (and plan changes) are published on ``<prefix>:auth:revoked``;
  ``run_listener`` evicts on receipt, so a revoked key is refused at once on
  every replica (within pub/sub delivery: milliseconds).
* Pub/sub is fire-and-forget: what is sent while a subscriber is away is
  lost. So the cache answers only while the subscription is confirmed alive
  (the listener pings every second when idle; silence beyond
  ``SILENCE_MAX_S`` turns the cache off), and it is emptied whenever the
  subscription is (re)established or lost. Nothing depends on the listener
  running: without it the cache is off and every lookup reads Postgres.
* ``epoch`` moves on every eviction; a lookup that straddles one does not
  fill the cache, so an answer read just before a revoke cannot be cached
  just after it.
* Entries expire after ``ttl_s`` (30 s) as a backstop for anything else.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import anyio
from anyio.abc import TaskStatus

from dpp.adapters.redis import REDIS_ERRORS, Redis, RedisError

if TYPE_CHECKING:
    from dpp.tenancy.principal import Principal

log = logging.getLogger("dpp.tenancy.auth_cache")

TTL_S: Final = 30.0
ENTRIES_MAX: Final = 10_000
# Negative answers live apart, so a flood of well-formed random keys cannot
# push the real tenants' entries out.
NEGATIVE_ENTRIES_MAX: Final = 4_096
PING_INTERVAL_S: Final = 1.0
SILENCE_MAX_S: Final = 3.0
BACKOFF_FIRST_S: Final = 0.1
BACKOFF_MAX_S: Final = 5.0
CLOSE_TIMEOUT_S: Final = 2.0
PUBLISH_TIMEOUT_S: Final = 5.0
FLUSH_ALL: Final = b"*"
MISS: Final = object()  # what ``get`` answers when the cache cannot


@dataclass(slots=True)
class _Entry:
    principal: Principal | None
    expires_at: float


@dataclass(frozen=True, slots=True)
class AuthCacheStatistics:
    listening: bool
    subscriptions: int  # how many times the channel was (re)subscribed
    entries: int
    negative_entries: int
    hits: int


class AuthCache:
    """Bounded LRU of ``sha256 -> Principal | None``, usable only while subscribed."""

    def __init__(
        self,
        redis: Redis,
        channel: str,
        *,
        ttl_s: float = TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert ttl_s > 0 and channel
        self.channel = channel
        self._redis = redis
        self._ttl_s = ttl_s
        self._clock = clock
        self._positive: collections.OrderedDict[bytes, _Entry] = collections.OrderedDict()
        self._negative: collections.OrderedDict[bytes, _Entry] = collections.OrderedDict()
        self.epoch = 0
        self._listening = False
        self._listening_event = anyio.Event()
        self._heard_at = float("-inf")
        self._subscriptions = 0
        self._hits = 0

    # --- reads and writes (the request path) ---------------------------------------------

    def usable(self) -> bool:
        """Whether the invalidation subscription is confirmed alive right now."""
        return self._listening and self._clock() - self._heard_at <= SILENCE_MAX_S

    def get(self, digest: bytes) -> object:
        """The cached ``Principal | None``, or ``MISS``."""
        if not self.usable():
            return MISS
        now = self._clock()
        for entries in (self._positive, self._negative):
            entry = entries.get(digest)
            if entry is None:
                continue
            if entry.expires_at <= now:
                del entries[digest]
                return MISS
            entries.move_to_end(digest)
            self._hits += 1
            return entry.principal
        return MISS

    def put(self, digest: bytes, principal: Principal | None, epoch: int) -> None:
        """Remember an answer read at ``epoch``, unless an eviction came since."""
        if epoch != self.epoch or not self.usable():
            return
        entries, other, limit = (
            (self._positive, self._negative, ENTRIES_MAX)
            if principal is not None
            else (self._negative, self._positive, NEGATIVE_ENTRIES_MAX)
        )
        other.pop(digest, None)
        entries[digest] = _Entry(principal, self._clock() + self._ttl_s)
        entries.move_to_end(digest)
        while len(entries) > limit:
            entries.popitem(last=False)
        assert len(self._positive) <= ENTRIES_MAX
        assert len(self._negative) <= NEGATIVE_ENTRIES_MAX

    def evict(self, digest: bytes) -> None:
        self.epoch += 1
        self._positive.pop(digest, None)
        self._negative.pop(digest, None)

    def clear(self) -> None:
        self.epoch += 1
        self._positive.clear()
        self._negative.clear()

    def statistics(self) -> AuthCacheStatistics:
        return AuthCacheStatistics(
            listening=self._listening,
            subscriptions=self._subscriptions,
            entries=len(self._positive),
            negative_entries=len(self._negative),
            hits=self._hits,
        )

    # --- telling every replica ----------------------------------------------------------

    async def publish_eviction(self, digest: bytes) -> None:
        """Evict here, then on every replica; raises RedisError or OSError."""
        assert len(digest) == 32
        self.evict(digest)
        await self._publish(digest.hex().encode("ascii"))

    async def publish_flush(self) -> None:
        """Empty every replica's cache (after a plan change); raises like above."""
        self.clear()
        await self._publish(FLUSH_ALL)

    async def _publish(self, payload: bytes) -> None:
        with anyio.fail_after(PUBLISH_TIMEOUT_S):
            await self._redis.publish(self.channel, payload)

    # --- the listener --------------------------------------------------------------------

    async def wait_listening(self) -> None:
        """Return once the channel is subscribed (the cache is on)."""
        while not self._listening:
            await self._listening_event.wait()

    async def run_listener(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Evict as messages arrive; runs until cancelled, never returns.

        Reports started at once: until the subscription is up the cache is
        simply off. Reconnects with bounded exponential backoff.
        """
        task_status.started()
        backoff_s = BACKOFF_FIRST_S
        while True:
            subscriptions_before = self._subscriptions
            try:
                await self._listen()
            except REDIS_ERRORS as error:
                log.warning(
                    "auth invalidation channel lost; key cache off until it is back",
                    extra={"error": type(error).__name__, "retry_in_s": backoff_s},
                )
            if self._subscriptions != subscriptions_before:
                backoff_s = BACKOFF_FIRST_S
            await anyio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)

    async def _listen(self) -> None:
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            ping_sent_at: float | None = None
            while True:
                message = await pubsub.get_message(timeout=PING_INTERVAL_S)
                now = self._clock()
                if message is None:
                    if ping_sent_at is None:
                        await pubsub.ping()
                        ping_sent_at = now
                    elif now - ping_sent_at > SILENCE_MAX_S:
                        raise TimeoutError("no answer to ping on the invalidation channel")
                    continue
                kind = message["type"]
                kind = kind.decode() if isinstance(kind, bytes) else kind
                if kind == "pong":
                    # everything published before the ping has been delivered
                    self._heard_at = ping_sent_at if ping_sent_at is not None else now
                    ping_sent_at = None
                elif kind == "subscribe":
                    self._on_subscribed(now)
                elif kind == "message":
                    self._heard_at = now
                    self._on_message(message["data"])
                elif kind == "unsubscribe":
                    raise RedisError("unsubscribed from the invalidation channel")
        finally:
            self._on_unsubscribed()
            with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # untyped before redis-py 8.2

    def _on_subscribed(self, now: float) -> None:
        # Anything may have been published while we were not subscribed
        # (redis-py also resubscribes by itself after a reconnect): start empty.
        self.clear()
        self._subscriptions += 1
        self._heard_at = now
        self._listening = True
        self._listening_event.set()
        log.info("auth invalidation channel subscribed", extra={"channel": self.channel})

    def _on_unsubscribed(self) -> None:
        self._listening = False
        self._heard_at = float("-inf")
        self.clear()
        if self._listening_event.is_set():
            self._listening_event = anyio.Event()

    def _on_message(self, data: object) -> None:
        if not isinstance(data, bytes):
            data = str(data).encode()
        if data == FLUSH_ALL:
            self.clear()
            return
        try:
            digest = bytes.fromhex(data.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            digest = b""
        if len(digest) != 32:
            log.warning("unrecognised auth invalidation message; cache cleared to be safe")
            self.clear()
            return
        self.evict(digest)
