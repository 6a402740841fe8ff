"""API keys: generation, parsing and hashing (pure; no storage, no I/O).

A key is ``dpp_live_<32 base62>_<8 lowercase hex>`` (SPEC §3, §6). The last
part is the CRC32 (zlib) of everything before the last ``_``. The checksum is
not a secret and proves nothing about validity; it exists so that a typo, a
truncated paste or random garbage is refused *before* any storage is touched,
which keeps junk traffic off Postgres. Only ``key_sha256(key)`` is ever
stored; the key itself is shown once at creation.

``parse_api_key`` and ``parse_bearer`` never raise on any input: they sit on
the unauthenticated request path.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import zlib
from dataclasses import dataclass, field

from dpp.ids import BASE62

KEY_PREFIX = "dpp_live_"
KEY_BODY_LENGTH = 32  # 32 base62 characters: ~190 bits from `secrets`
KEY_CHECKSUM_LENGTH = 8
KEY_LENGTH = len(KEY_PREFIX) + KEY_BODY_LENGTH + 1 + KEY_CHECKSUM_LENGTH
KEY_HINT_LENGTH = 4
KEY_PATTERN = re.compile(r"dpp_live_([0-9A-Za-z]{32})_([0-9a-f]{8})")
# An Authorization header longer than this is refused unparsed (bounded work).
AUTHORIZATION_LENGTH_MAX = 1024


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A key whose shape and checksum are right. Says nothing about storage.

    ``repr`` leaves the secret out so that a stray log line cannot leak it.
    """

    text: str = field(repr=False)
    body: str = field(repr=False)
    checksum: str


def _checksum(head: str) -> str:
    """CRC32 of ``head`` as 8 lowercase zero-padded hex digits (SPEC §6)."""
    return format(zlib.crc32(head.encode("ascii")), "08x")


def generate_api_key() -> str:
    """A new random key with its checksum; the caller shows it once, stores its hash."""
    body = "".join(secrets.choice(BASE62) for _ in range(KEY_BODY_LENGTH))
    head = KEY_PREFIX + body
    key = f"{head}_{_checksum(head)}"
    assert len(key) == KEY_LENGTH
    assert parse_api_key(key) is not None
    return key


def parse_api_key(text: str) -> ParsedKey | None:
    """The key if ``text`` has the key shape and a matching checksum, else None."""
    if not isinstance(text, str) or len(text) != KEY_LENGTH:
        return None
    match = KEY_PATTERN.fullmatch(text)
    if match is None:
        return None
    body, checksum = match.group(1), match.group(2)
    if _checksum(text[: -KEY_CHECKSUM_LENGTH - 1]) != checksum:
        return None
    return ParsedKey(text=text, body=body, checksum=checksum)


def parse_bearer(authorization: str | None) -> str | None:
    """The credentials of an ``Authorization: Bearer <credentials>`` value, or None.

    The scheme is case-insensitive (RFC 9110 §11.1); surrounding whitespace is
    ignored; anything else (another scheme, no credentials, embedded spaces)
    is None.
    """
    if authorization is None or len(authorization) > AUTHORIZATION_LENGTH_MAX:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip(" ")
    if scheme.lower() != "bearer" or not credentials or " " in credentials:
        return None
    return credentials


def key_sha256(key: str) -> bytes:
    """The stored form of a key: its SHA-256 digest (32 bytes)."""
    assert len(key) == KEY_LENGTH and key.startswith(KEY_PREFIX), "not an API key"
    digest = hashlib.sha256(key.encode("ascii")).digest()
    assert len(digest) == 32
    return digest


def key_hint(key: str) -> str:
    """The last 4 characters of the key body: lets an operator tell keys apart
    without storing anything that helps guess one (4 of 32 random characters)."""
    parsed = parse_api_key(key)
    assert parsed is not None, "not an API key"
    hint = parsed.body[-KEY_HINT_LENGTH:]
    assert len(hint) == KEY_HINT_LENGTH
    return hint
