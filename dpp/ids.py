"""Identifiers DPP mints or names: prefixed random ids (``ten_``, ``key_``,
``run_``) and the stable problem type URIs clients branch on (SPEC §3)."""

from __future__ import annotations

import re
import secrets

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ID_BODY_LENGTH = 26  # 26 base62 characters: ~154 bits of randomness
ID_PATTERN = re.compile(r"^(ten|key|run)_[0-9A-Za-z]{26}$")
# Every problem ``type`` (HTTP answers and a run's stored ``error``) is under it.
PROBLEM_TYPE_BASE = "https://dpp.dev/problems/"
PROBLEM_SLUG_PATTERN = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


# Random bytes → base62 characters in one C call: a byte below 248 (4 * 62) maps
# to character ``byte % 62`` (each exactly 4 bytes: uniform); 248-255 are dropped.
BASE62_OF_BYTE = bytes(BASE62.encode("ascii")[byte % 62] for byte in range(248)) + bytes(8)
BYTES_NOT_BASE62 = bytes(range(248, 256))
RANDOM_BYTES_SLACK = 4  # a byte is dropped with p = 1/32: 4 spare make a retry rare


def random_base62(length: int) -> str:
    """``length`` uniformly random base62 characters.

    Rejection sampling on ``secrets`` bytes, mapped by ``bytes.translate``: no
    per-character Python (a ``secrets.choice`` per character showed up at ~4 %
    of a loaded server's CPU; a divmod loop still cost ~3 µs per request id).
    """
    assert 1 <= length <= 256
    characters = b""
    while len(characters) < length:
        drawn = secrets.token_bytes(length - len(characters) + RANDOM_BYTES_SLACK)
        characters += drawn.translate(BASE62_OF_BYTE, BYTES_NOT_BASE62)
    return characters[:length].decode("ascii")


def new_id(prefix: str) -> str:
    assert prefix in ("ten", "key", "run"), prefix
    return prefix + "_" + random_base62(ID_BODY_LENGTH)


def is_id(value: str, prefix: str) -> bool:
    """Whether ``value`` has the shape of a ``prefix`` id (no storage touched)."""
    match = ID_PATTERN.fullmatch(value)  # "$" alone would let "\n" through
    return match is not None and match.group(1) == prefix


def problem_type(slug: str) -> str:
    """The problem type URI for ``slug`` (``pack-error`` -> ``https://dpp.dev/problems/pack-error``)."""
    assert PROBLEM_SLUG_PATTERN.fullmatch(slug), slug
    return PROBLEM_TYPE_BASE + slug
