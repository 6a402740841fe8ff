"""API key format: generation, parsing, checksum, hashing (pure)."""

from __future__ import annotations

import hashlib
import zlib

from hypothesis import given
from hypothesis import strategies as st

from dpp.ids import BASE62
from dpp.tenancy.keys import (
    KEY_LENGTH,
    ParsedKey,
    generate_api_key,
    key_hint,
    key_sha256,
    parse_api_key,
    parse_bearer,
)


def test_generated_key_has_the_documented_shape() -> None:
    key = generate_api_key()
    assert len(key) == KEY_LENGTH == 50
    prefix, body_and_checksum = key[:9], key[9:]
    assert prefix == "dpp_live_"
    body, checksum = body_and_checksum.split("_")
    assert len(body) == 32 and set(body) <= set(BASE62)
    # SPEC §6: CRC32 (zlib) of everything before the last "_", 8 lowercase hex digits
    assert checksum == f"{zlib.crc32(key[: key.rindex('_')].encode()):08x}"


def test_known_vector() -> None:
    head = "dpp_live_" + "A" * 32
    key = f"{head}_{zlib.crc32(head.encode()):08x}"
    parsed = parse_api_key(key)
    assert parsed is not None
    assert parsed.body == "A" * 32
    assert parsed.text == key


def test_checksum_is_zero_padded() -> None:
    # find a body whose CRC32 has a leading zero nibble and check the padding
    for index in range(10_000):
        head = "dpp_live_" + f"{index:032d}"
        crc = zlib.crc32(head.encode())
        if crc < 0x10000000:
            key = f"{head}_{crc:08x}"
            assert parse_api_key(key) is not None
            assert parse_api_key(f"{head}_{crc:x}") is None
            return
    raise AssertionError("no short CRC found")


def test_keys_are_distinct() -> None:
    keys = {generate_api_key() for _ in range(1_000)}
    assert len(keys) == 1_000


def test_bad_shapes_are_refused() -> None:
    key = generate_api_key()
    assert parse_api_key("") is None
    assert parse_api_key(key + "0") is None
    assert parse_api_key(key[:-1]) is None
    assert parse_api_key(key.replace("dpp_live_", "dpp_test_")) is None
    assert parse_api_key(key.upper()) is None
    if any(character.isalpha() for character in key[-8:]):
        assert parse_api_key(key[:-8] + key[-8:].upper()) is None
    assert parse_api_key(" " + key[:-1]) is None
    # a non-ASCII digit that Unicode considers a digit is still not base62
    assert parse_api_key(key[:9] + "\u0661" + key[10:]) is None


def test_repr_hides_the_secret() -> None:
    key = generate_api_key()
    parsed = parse_api_key(key)
    assert parsed is not None
    assert key not in repr(parsed)
    assert parsed.body not in repr(parsed)


def test_hash_and_hint() -> None:
    key = generate_api_key()
    assert key_sha256(key) == hashlib.sha256(key.encode()).digest()
    assert len(key_sha256(key)) == 32
    assert key_hint(key) == key[9:41][-4:]


def test_parse_bearer() -> None:
    key = generate_api_key()
    assert parse_bearer(f"Bearer {key}") == key
    assert parse_bearer(f"bearer {key}") == key
    assert parse_bearer(f"  BEARER   {key}  ") == key
    assert parse_bearer(None) is None
    assert parse_bearer("") is None
    assert parse_bearer("Bearer") is None
    assert parse_bearer("Bearer ") is None
    assert parse_bearer(f"Basic {key}") is None
    assert parse_bearer(f"Bearer {key} extra") is None
    assert parse_bearer("Bearer " + "x" * 5_000) is None


@given(st.text(max_size=120))
def test_random_strings_never_raise(text: str) -> None:
    result = parse_api_key(text)
    assert result is None or isinstance(result, ParsedKey)
    bearer = parse_bearer(text)
    assert bearer is None or isinstance(bearer, str)


@given(st.text(alphabet=BASE62 + "_-", min_size=40, max_size=60))
def test_near_shapes_never_raise(text: str) -> None:
    candidate = "dpp_live_" + text
    result = parse_api_key(candidate)
    if result is not None:
        assert result.text == candidate


@given(st.integers(min_value=0, max_value=10**6))
def test_generated_keys_always_parse(_: int) -> None:
    key = generate_api_key()
    parsed = parse_api_key(key)
    assert parsed is not None
    assert parsed.text == key


@given(
    st.integers(min_value=0, max_value=KEY_LENGTH - 1),
    st.sampled_from(BASE62 + "_abcdef"),
)
def test_one_character_changes_fail(position: int, replacement: str) -> None:
    key = generate_api_key()
    if key[position] == replacement:
        return
    changed = key[:position] + replacement + key[position + 1 :]
    # CRC32 detects every single-character substitution, so no change survives
    assert parse_api_key(changed) is None


def test_random_base62_is_the_right_alphabet_and_length_and_varies() -> None:
    from dpp.ids import BASE62, random_base62

    seen = {random_base62(26) for _ in range(200)}
    assert len(seen) == 200
    assert all(len(value) == 26 and set(value) <= set(BASE62) for value in seen)
    # every position uses the whole alphabet over enough draws (no stuck digits)
    firsts = {random_base62(1) for _ in range(5_000)}
    assert firsts == set(BASE62)
