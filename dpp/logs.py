"""Logging: one JSON object per line, context bound per request, secrets scrubbed.

``configure_logging(settings)`` installs a single root handler. Every record
passes ``RedactingFilter`` (on the handler, so records from every logger are
covered) and the formatter scrubs the finished line once more: an API key,
a ``Bearer`` credential, a registered secret (the admin token) or a URL
password never reaches the output, whatever a caller put in a message, an
``extra`` field or an exception.

Context (``request_id``, ``trace_id``, ``tenant_id``, ``run_id``) lives in a
``ContextVar``; ``with bind(run_id=...)`` adds fields for the code inside it.
Both asyncio and trio copy the context into new tasks, so a task spawned
inside a request logs with that request's fields.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import functools
import logging
import re
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from types import MappingProxyType
from typing import Any, TextIO

import orjson

from dpp.config import Settings

__all__ = [
    "CONTEXT_FIELDS",
    "REDACTED",
    "JsonFormatter",
    "RedactingFilter",
    "TextFormatter",
    "bind",
    "bound_fields",
    "configure_logging",
    "redact",
    "redact_text",
    "register_secret",
]

REDACTED = "[REDACTED]"
CONTEXT_FIELDS = ("request_id", "trace_id", "tenant_id", "run_id")

# The key shape is `dpp_live_<32 base62>_<8 hex>`; anything that starts like a key is
# scrubbed whole, so a truncated or mistyped key leaks no prefix either.
API_KEY_PATTERN = re.compile(r"dpp_live_[0-9A-Za-z]+(?:_[0-9A-Za-z]*)?")
# The credential after "Bearer". In a finished JSON line quotes and backslashes end
# it, so the last pass never eats the closing quote of a string.
BEARER_PATTERN = re.compile(r"(?i)\b(bearer)(\s+)\S+")
BEARER_IN_JSON_PATTERN = re.compile(r"(?i)\b(bearer)(\s+)[^\s\"\\]+")
# scheme://user:password@host -> scheme://user:[REDACTED]@host
URL_PASSWORD_PATTERN = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@\"\\]*):[^\s@/\"\\]+@")
# ?access_token=... / &api_key=... in a URL someone logged (an HTTP client's own log)
QUERY_SECRET_PATTERN = re.compile(
    r"(?i)([?&;][^=&\s\"\\#]*(?:authorization|token|api_key|apikey|api-key|secret|password)"
    r"[^=&\s\"\\#]*=)[^&\s\"\\#]+"
)
# an `extra` field whose name contains one of these is never printed
# Field names whose verdict is kept (log lines reuse a few dozen names).
SENSITIVE_NAMES_CACHED = 1_024
SENSITIVE_NAME_PARTS = (
    "authorization",
    "token",
    "api_key",
    "apikey",
    "secret",
    "password",
    "cookie",
)

SECRET_LENGTH_MIN = 8  # shorter literals would scrub ordinary words
SECRETS_MAX = 64
REDACT_DEPTH_MAX = 8
TEXT_CHARS_MAX = 16_384  # one message or field; a log line is not a data dump

_secrets: tuple[str, ...] = ()
_secrets_lock = threading.Lock()

_fields: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "dpp_log_fields", default=MappingProxyType({})
)

# Attributes every LogRecord has; anything else on a record came from `extra`.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "dpp_fields",
    "dpp_extras",
    "dpp_redacted",
}


# --- context binding -------------------------------------------------------------------


class _Bound:
    """``bind``'s context manager: a plain class, since every request enters two
    (its ids, then its tenant) and a generator-based one costs ~3x as much."""

    __slots__ = ("fields", "token")

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.token: contextvars.Token[Mapping[str, Any]] | None = None

    def __enter__(self) -> Mapping[str, Any]:
        assert self.token is None, "a bind() block is entered once"
        merged = MappingProxyType({**_fields.get(), **self.fields})
        self.token = _fields.set(merged)
        return merged

    def __exit__(self, *exc_info: object) -> None:
        assert self.token is not None
        _fields.reset(self.token)


def bind(**fields: Any) -> AbstractContextManager[Mapping[str, Any]]:
    """Add fields to every log line emitted inside the block (and tasks it spawns)."""
    return _Bound(fields)


@contextlib.contextmanager
def bind_only(**fields: Any) -> Iterator[Mapping[str, Any]]:
    """Like ``bind``, but forget what the caller had bound: for a long-lived task
    spawned from a request (a keyed actor), which must not carry that request's
    ids in every later line."""
    only = MappingProxyType(dict(fields))
    token = _fields.set(only)
    try:
        yield only
    finally:
        _fields.reset(token)


def bound_fields() -> Mapping[str, Any]:
    """The fields bound in the current context (read-only)."""
    return _fields.get()


# --- redaction -------------------------------------------------------------------------


def register_secret(value: str | None) -> None:
    """Scrub this literal from every log line from now on (e.g. the admin token)."""
    global _secrets
    if not value or len(value) < SECRET_LENGTH_MIN:
        return
    with _secrets_lock:
        if value in _secrets:
            return
        # longest first so that a secret containing another is scrubbed whole
        _secrets = tuple(sorted((*_secrets, value), key=len, reverse=True)[:SECRETS_MAX])


def redact_text(text: str, *, json_encoded: bool = False) -> str:
    """``text`` with every secret-shaped substring replaced by ``[REDACTED]``.

    ``json_encoded``: ``text`` is a serialized JSON document; keep it valid.
    """
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "dpp_live_" in text:
        text = API_KEY_PATTERN.sub(REDACTED, text)
    if "bearer" in text.lower():  # the pattern's only way in; a regex pass costs more
        bearer = BEARER_IN_JSON_PATTERN if json_encoded else BEARER_PATTERN
        text = bearer.sub(rf"\1\2{REDACTED}", text)
    if "://" in text:
        text = URL_PASSWORD_PATTERN.sub(rf"\1:{REDACTED}@", text)
    if "=" in text:
        text = QUERY_SECRET_PATTERN.sub(rf"\1{REDACTED}", text)
    return text


@functools.lru_cache(maxsize=SENSITIVE_NAMES_CACHED)
def is_sensitive_name(name: str) -> bool:
    """Whether a field called ``name`` holds a secret (cached: the same few field
    names come back on every log line)."""
    lowered = name.lower().replace("-", "_")
    return any(part in lowered for part in SENSITIVE_NAME_PARTS)


# Type tuples, not ``bool | int | float``: a union is built anew at each call
# (it made ``redact(200)`` cost as much as scrubbing a string).
_SCALAR_TYPES = (bool, int, float)
_SEQUENCE_TYPES = (list, tuple, set, frozenset)
_BYTES_TYPES = (bytes, bytearray)
# Exactly these types have nothing to scrub, and every line carries a few
# (status, sizes, amounts): one set lookup answers them before any isinstance.
_PLAIN_TYPES = frozenset({int, float, bool, type(None)})


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` safe to log: sensitive keys and secret-shaped text scrubbed."""
    if type(value) in _PLAIN_TYPES:
        return value
    if isinstance(value, str):
        return redact_text(value)[:TEXT_CHARS_MAX]
    if value is None or isinstance(value, _SCALAR_TYPES):
        return value
    if depth >= REDACT_DEPTH_MAX:
        return "[TRUNCATED]"
    if isinstance(value, dict):  # what log fields are; Mapping's ABC check costs more
        return _redact_mapping(value, depth)
    if isinstance(value, Mapping):
        return _redact_mapping(value, depth)
    if isinstance(value, _SEQUENCE_TYPES):
        return [redact(item, depth + 1) for item in value]
    if isinstance(value, _BYTES_TYPES):
        return redact_text(bytes(value).decode("utf-8", "replace"))[:TEXT_CHARS_MAX]
    return redact_text(str(value))[:TEXT_CHARS_MAX]


def _redact_mapping(value: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    return {
        str(key): REDACTED if is_sensitive_name(str(key)) else redact(item, depth + 1)
        for key, item in value.items()
    }


class RedactingFilter(logging.Filter):
    """Scrubs a record in place before any formatter sees it; never drops a record.

    Captures the bound context fields too, at emit time in the caller's context.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        attributes = record.__dict__
        if attributes.get("dpp_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception as error:  # a bad %-format must not lose the line
            message = f"{record.msg!r} (unformattable: {type(error).__name__})"
        record.msg = redact_text(message)[:TEXT_CHARS_MAX]
        record.args = None
        extras = _extra_names(record)
        for name in extras:
            value = attributes[name]
            attributes[name] = REDACTED if is_sensitive_name(name) else redact(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        attributes["dpp_fields"] = _redact_mapping(bound_fields(), 0)
        attributes["dpp_extras"] = extras  # the formatter's, without a second walk
        attributes["dpp_redacted"] = True
        return True


_redactor = RedactingFilter()


def _extra_names(record: logging.LogRecord) -> list[str]:
    extras: list[str] | None = record.__dict__.get("dpp_extras")
    if extras is not None:
        return extras
    return [name for name in record.__dict__ if name not in _RECORD_ATTRIBUTES]


# --- formatting ------------------------------------------------------------------------


# (second, its ISO 8601 text): lines of one second share the formatting (one
# tuple, swapped whole, so a line logged from another thread reads a pair)
_second_text: tuple[int, str] = (-1, "")


def _timestamp(record: logging.LogRecord) -> str:
    """``2026-12-03T17:25:57.556Z``: UTC, milliseconds."""
    global _second_text
    second = int(record.created)
    # whole microseconds first, rounded as datetime.fromtimestamp rounds them
    micros = round((record.created - second) * 1_000_000)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    cached_second, text = _second_text
    if second != cached_second:
        moment = datetime.datetime.fromtimestamp(second, tz=datetime.UTC)
        text = moment.strftime("%Y-%m-%dT%H:%M:%S")
        _second_text = (second, text)
    return f"{text}.{micros // 1000:03d}Z"


def _document(record: logging.LogRecord) -> dict[str, Any]:
    _redactor.filter(record)  # a no-op when the handler's filter already ran
    document: dict[str, Any] = {
        "ts": _timestamp(record),
        "level": record.levelname,
        "logger": record.name,
        "msg": record.getMessage(),
    }
    document.update(record.__dict__["dpp_fields"])
    for name in _extra_names(record):
        if name not in ("ts", "level", "logger", "msg"):
            document[name] = record.__dict__[name]
    if record.exc_text:
        document["exc"] = record.exc_text
    if record.stack_info:
        document["stack"] = record.stack_info
    return document


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the finished line is scrubbed once more."""

    def format(self, record: logging.LogRecord) -> str:
        document = _document(record)
        try:
            line = orjson.dumps(document, default=str, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:  # e.g. an integer beyond 64 bits, or nesting too deep
            line = orjson.dumps({key: _plain(value) for key, value in document.items()})
        return redact_text(line.decode("utf-8"), json_encoded=True)


class TextFormatter(logging.Formatter):
    """For people at a terminal (``DPP_JSON_LOGS=false``): same content, one line each."""

    def format(self, record: logging.LogRecord) -> str:
        document = _document(record)
        head = f"{document.pop('ts')} {document.pop('level'):<8} {document.pop('logger')}"
        message = document.pop("msg")
        exception = document.pop("exc", None)
        stack = document.pop("stack", None)
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in document.items())
        line = f"{head}: {message}" + (f" [{pairs}]" if pairs else "")
        for block in (exception, stack):
            if block:
                line += "\n" + block
        return redact_text(line)


def _plain(value: Any) -> Any:
    """``value`` when orjson can encode it, else its ``str``."""
    try:
        orjson.dumps(value, default=str)
    except TypeError:
        return str(value)
    return value


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and " " not in value:
        return value
    try:
        return orjson.dumps(value, default=str).decode("utf-8")
    except TypeError:
        return repr(value)


# --- setup -----------------------------------------------------------------------------


def configure_logging(settings: Settings, *, stream: TextIO | None = None) -> logging.Handler:
    """Install the DPP handler on the root logger (replacing a previous one).

    Returns the handler so a caller (a test) can remove it again.
    """
    register_secret(settings.admin_token)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.set_name("dpp")
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if settings.json_logs else TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == "dpp":
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    return handler
