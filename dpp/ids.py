"""Prefixed random identifiers (``ten_``, ``key_``, ``run_``)."""

from __future__ import annotations

import math
import re
import secrets

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BITS_PER_CHAR = math.log2(62)
ID_BODY_LENGTH = 26  # 26 base62 characters: ~154 bits of randomness
ID_PATTERN = re.compile(r"^(ten|key|run)_[0-9A-Za-z]{26}$")


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
    match = ID_PATTERN.match(value)
    return match is not None and match.group(1) == prefix
