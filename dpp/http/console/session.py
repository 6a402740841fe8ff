"""The console's session cookie and CSRF tokens: HMAC, keyed by the admin token.

Stateless on purpose: the key is derived from ``DPP_ADMIN_TOKEN`` (HMAC-SHA256
with a fixed label), so every replica accepts a cookie any replica issued, and
rotating the admin token ends every session at once — no session table, and
nothing in Redis to lose. A cookie is ``v1.<expires>.<nonce>.<mac>``: the
expiry (Unix seconds) is inside the MAC, so it cannot be extended; the nonce
makes each session's CSRF token its own (``csrf_token``: HMAC of the nonce).
The sign-in form, which has no session yet, is bound the same way to a
short-lived random pre-session cookie. Every comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Final

__all__ = [
    "SESSION_COOKIE",
    "SESSION_TTL_S",
    "SIGN_IN_COOKIE",
    "Session",
    "csrf_token",
    "issue_session",
    "session_key",
    "sign_in_csrf",
    "verify_csrf",
    "verify_session",
]

SESSION_COOKIE: Final = "dpp_console"
SIGN_IN_COOKIE: Final = "dpp_console_sign_in"
SESSION_TTL_S: Final = 8 * 3600  # one working day; then sign in again
SIGN_IN_TTL_S: Final = 3600
_VERSION: Final = "v1"
_KEY_LABEL: Final = b"dpp console session key v1"


def session_key(admin_token: str) -> bytes:
    """The MAC key of every console cookie and token: rotate the admin token to
    revoke every session. The token itself is never a cookie's key directly."""
    assert admin_token
    return hmac.new(admin_token.encode("utf-8"), _KEY_LABEL, hashlib.sha256).digest()


def _mac(key: bytes, label: str, message: str) -> str:
    digest = hmac.new(key, f"{label}\x00{message}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class Session:
    nonce: str
    expires_at: int  # Unix seconds


def issue_session(key: bytes, *, now: float | None = None, ttl_s: int = SESSION_TTL_S) -> str:
    """A new session cookie value, valid for ``ttl_s``."""
    expires = int(time.time() if now is None else now) + ttl_s
    nonce = secrets.token_urlsafe(18)
    body = f"{_VERSION}.{expires}.{nonce}"
    return f"{body}.{_mac(key, 'session', body)}"


def verify_session(key: bytes, value: str | None, *, now: float | None = None) -> Session | None:
    """The session a cookie value carries, or None: missing, malformed, forged
    (its MAC does not match this key) or expired."""
    if not value or len(value) > 200:
        return None
    parts = value.split(".")
    if len(parts) != 4 or parts[0] != _VERSION or not parts[1].isdigit():
        return None
    body = ".".join(parts[:3])
    if not hmac.compare_digest(_mac(key, "session", body), parts[3]):
        return None
    expires = int(parts[1])
    if expires <= (time.time() if now is None else now):
        return None
    return Session(nonce=parts[2], expires_at=expires)


def csrf_token(key: bytes, session: Session) -> str:
    """The CSRF token of every form in this session."""
    return _mac(key, "csrf", session.nonce)


def sign_in_csrf(key: bytes, pre_session: str) -> str:
    """The sign-in form's CSRF token, bound to the pre-session cookie."""
    return _mac(key, "sign-in", pre_session)


def verify_csrf(expected: str, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(
        expected.encode("ascii"), presented.encode("utf-8", "replace")
    )
