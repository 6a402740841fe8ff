"""Configuration: the environment, read once into a frozen ``Settings``.

Every value is validated at start. A bad value raises ``ConfigError`` whose
message is one line naming the variable and what was expected; the CLI prints
that line and exits non-zero (SPEC §5). ``StartupError`` is its twin for what
only shows at start (a dependency that does not answer, a port in use): the
adapters raise it, the CLI prints it the same way.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
QUEUE_BACKENDS = ("postgres", "sqs")
SIGNING_KEY_CHARS_MIN = 32
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class ConfigError(Exception):
    """A configuration value is missing or malformed. ``str(error)`` is one line."""


class StartupError(Exception):
    """A dependency could not be reached at start, or the port is taken; one line."""


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str | None
    redis_url: str | None
    s3_endpoint_url: str | None
    s3_result_bucket: str
    s3_region: str
    queue_backend: str
    sqs_queue_url: str | None
    sqs_endpoint_url: str | None
    admin_token: str | None
    cors_allowed_origins: tuple[str, ...]
    log_level: str
    json_logs: bool
    port: int
    host: str
    lease_sec: int
    heartbeat_sec: int
    reaper_interval_sec: int
    reconcile_interval_sec: int
    reconcile_threshold_sec: int
    shutdown_grace_sec: int
    max_body_bytes: int
    worker_concurrency: int
    webhook_url: str | None
    presign_expiry_sec: int
    redis_prefix: str
    development: bool
    # `dpp serve --processes N`: N full replicas sharing the port (SO_REUSEPORT).
    processes: int = 1
    # Listen with SO_REUSEPORT so several replicas on one machine share the port;
    # set by `--processes` for its children.
    reuse_port: bool = False
    # SPEC §5: a local results store instead of S3 when set (an absolute path)
    results_dir: str | None = None
    # signs /v1/results/{token} links of a local store; never logged
    result_signing_key: str | None = dataclasses.field(default=None, repr=False)
    # how long an MCP tool call waits for its run to finish before answering (SPEC §7)
    mcp_wait_sec: int = 60

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields replaced (tests and `dpp dev` use it)."""
        return dataclasses.replace(self, **changes)


# More replicas than this on one machine is a typo, not a plan.
MAX_PROCESSES = 256


def _text(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _integer(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = _text(env, name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]+", raw):
        raise ConfigError(f"{name}={raw!r}: expected a whole number from {low} to {high}")
    value = int(raw)
    if not low <= value <= high:
        raise ConfigError(f"{name}={value}: expected a whole number from {low} to {high}")
    return value


def _boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _text(env, name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r}: expected true or false")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = _text(env, name)
    if raw is None:
        return default
    if raw.lower() not in [c.lower() for c in choices]:
        raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(choices)}")
    return next(c for c in choices if c.lower() == raw.lower())


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    raw = _text(env, name)
    if raw is None:
        return None
    try:
        parts = urlsplit(raw)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in schemes or not (parts.netloc or parts.path):
        raise ConfigError(f"{name}: expected a URL starting with {' or '.join(schemes)}://")
    return raw


def _origins(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = _text(env, name)
    if raw is None:
        return ()
    origins = []
    for item in raw.split(","):
        origin = item.strip().rstrip("/")
        if not origin:
            continue
        if origin == "*":
            raise ConfigError(f"{name}: '*' is not allowed (credentials are sent); list origins")
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            raise ConfigError(f"{name}: {origin!r} is not an origin like https://app.example.com")
        origins.append(origin)
    return tuple(origins)


def load_settings(env: Mapping[str, str]) -> Settings:
    """Read and validate every setting; raise ConfigError naming the first bad one."""
    queue_backend = _choice(env, "DPP_QUEUE", "postgres", QUEUE_BACKENDS)
    sqs_queue_url = _url(env, "SQS_QUEUE_URL", ("http", "https"))
    if queue_backend == "sqs" and sqs_queue_url is None:
        raise ConfigError("SQS_QUEUE_URL: required when DPP_QUEUE=sqs")
    bucket = _text(env, "S3_RESULT_BUCKET") or "dpp-results"
    if not BUCKET_PATTERN.fullmatch(bucket):
        raise ConfigError(f"S3_RESULT_BUCKET={bucket!r}: expected an S3 bucket name")
    lease_sec = _integer(env, "DPP_LEASE_SEC", 120, 2, 86_400)
    heartbeat_sec = _integer(env, "DPP_HEARTBEAT_SEC", 30, 1, 86_400)
    if heartbeat_sec >= lease_sec:
        raise ConfigError(
            f"DPP_HEARTBEAT_SEC={heartbeat_sec}: must be shorter than DPP_LEASE_SEC={lease_sec}"
        )
    log_level = _choice(env, "LOG_LEVEL", "INFO", LOG_LEVELS)
    prefix = _text(env, "DPP_REDIS_PREFIX") or "dpp"
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", prefix):
        raise ConfigError(f"DPP_REDIS_PREFIX={prefix!r}: expected 1-64 of [A-Za-z0-9_.:-]")
    admin_token = _text(env, "DPP_ADMIN_TOKEN")
    development = _boolean(env, "DPP_DEVELOPMENT", False)
    results_dir = _text(env, "DPP_RESULTS_DIR")
    if results_dir is not None and not results_dir.startswith("/"):
        raise ConfigError(f"DPP_RESULTS_DIR={results_dir!r}: expected an absolute path")
    signing_key = _text(env, "DPP_RESULT_SIGNING_KEY")
    if signing_key is not None and len(signing_key.encode("utf-8")) < SIGNING_KEY_CHARS_MIN:
        # the value itself is a secret: never echoed
        raise ConfigError(
            f"DPP_RESULT_SIGNING_KEY: expected at least {SIGNING_KEY_CHARS_MIN} characters"
        )
    if results_dir is not None and signing_key is None and not development:
        raise ConfigError(
            "DPP_RESULT_SIGNING_KEY: required with DPP_RESULTS_DIR (it signs result "
            "download links; e.g. `openssl rand -hex 32`)"
        )
    return Settings(
        database_url=_url(env, "DATABASE_URL", ("postgres", "postgresql")),
        redis_url=_url(env, "REDIS_URL", ("redis", "rediss", "unix")),
        s3_endpoint_url=_url(env, "S3_ENDPOINT_URL", ("http", "https")),
        s3_result_bucket=bucket,
        s3_region=_text(env, "AWS_DEFAULT_REGION") or "us-east-1",
        queue_backend=queue_backend,
        sqs_queue_url=sqs_queue_url,
        sqs_endpoint_url=_url(env, "SQS_ENDPOINT_URL", ("http", "https")),
        admin_token=admin_token,
        cors_allowed_origins=_origins(env, "DPP_CORS_ALLOWED_ORIGINS"),
        log_level=log_level,
        json_logs=_boolean(env, "DPP_JSON_LOGS", True),
        port=_integer(env, "PORT", 8000, 0, 65_535),
        host=_text(env, "DPP_HOST") or "0.0.0.0",
        lease_sec=lease_sec,
        heartbeat_sec=heartbeat_sec,
        reaper_interval_sec=_integer(env, "DPP_REAPER_INTERVAL_SEC", 30, 1, 86_400),
        reconcile_interval_sec=_integer(env, "DPP_RECONCILE_INTERVAL_SEC", 60, 1, 86_400),
        reconcile_threshold_sec=_integer(env, "DPP_RECONCILE_THRESHOLD_SEC", 300, 1, 604_800),
        shutdown_grace_sec=_integer(env, "DPP_SHUTDOWN_GRACE_SEC", 30, 0, 3_600),
        max_body_bytes=_integer(env, "DPP_MAX_BODY_BYTES", 262_144, 1_024, 67_108_864),
        worker_concurrency=_integer(env, "DPP_WORKER_CONCURRENCY", 16, 1, 1_024),
        webhook_url=_url(env, "DPP_WEBHOOK_URL", ("http", "https")),
        presign_expiry_sec=_integer(env, "DPP_PRESIGN_EXPIRY_SEC", 3_600, 60, 604_800),
        redis_prefix=prefix,
        development=development,
        results_dir=results_dir,
        result_signing_key=signing_key,
        processes=_integer(env, "DPP_PROCESSES", 1, 1, MAX_PROCESSES),
        reuse_port=_boolean(env, "DPP_REUSE_PORT", False),
        mcp_wait_sec=_integer(env, "DPP_MCP_WAIT_SEC", 60, 0, 3_600),
    )


def require(value: T | None, name: str) -> T:
    """The value of a setting that `serve` cannot run without."""
    if value is None:
        raise ConfigError(f"{name}: required (or use `dpp dev` for the embedded default)")
    return value
