"""Prefixed random identifiers (``ten_``, ``key_``, ``run_``)."""

from __future__ import annotations

import re
import secrets

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ID_BODY_LENGTH = 26  # 26 base62 characters: ~154 bits of randomness
ID_PATTERN = re.compile(r"^(ten|key|run)_[0-9A-Za-z]{26}$")


def new_id(prefix: str) -> str:
    assert prefix in ("ten", "key", "run"), prefix
    return prefix + "_" + "".join(secrets.choice(BASE62) for _ in range(ID_BODY_LENGTH))


def is_id(value: str, prefix: str) -> bool:
    """Whether ``value`` has the shape of a ``prefix`` id (no storage touched)."""
    match = ID_PATTERN.match(value)
    return match is not None and match.group(1) == prefix
