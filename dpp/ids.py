"""Identifiers DPP mints or names: prefixed random ids (``ten_``, ``key_``,
``run_``) and the stable problem type URIs clients branch on (SPEC §3)."""

from __future__ import annotations

import math
import re
import secrets

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BITS_PER_CHAR = math.log2(62)
ID_BODY_LENGTH = 26  # 26 base62 characters: ~154 bits of randomness
ID_PATTERN = re.compile(r"^(ten|key|run)_[0-9A-Za-z]{26}$")
# Every problem ``type`` (HTTP answers and a run's stored ``error``) is under it.
PROBLEM_TYPE_BASE = "https://dpp.dev/problems/"
PROBLEM_SLUG_PATTERN = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


def random_base62(length: int) -> str:
    """``length`` uniformly random base62 characters from one ``secrets`` read.

    One ``token_bytes`` call instead of a ``secrets.choice`` per character (that
    showed up at ~4 % of a loaded server's CPU). The integer carries 64 bits
    more than the characters need, so the modulo bias is below 2**-64.
    """
    assert 1 <= length <= 256
    value = int.from_bytes(secrets.token_bytes(math.ceil(length * BITS_PER_CHAR / 8) + 8))
    characters = []
    for _ in range(length):
        value, digit = divmod(value, 62)
        characters.append(BASE62[digit])
    return "".join(characters)


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
