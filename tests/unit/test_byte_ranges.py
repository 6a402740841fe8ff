"""Which part of a result a ``Range`` request asks for (RFC 9110 §14)."""

from __future__ import annotations

import pytest

from dpp.http.ranges import POSITION_DIGITS_MAX, ByteRange, Unsatisfiable, requested_range

ETAG = '"9f86d081884c7d65"'


def wanted(range_header: str | None, size: int = 1000, if_range: str | None = None) -> object:
    return requested_range(range_header, if_range, size, ETAG)


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=100-", 100, 999),  # resume from byte 100
        ("bytes=-100", 900, 999),  # the last 100 bytes
        ("bytes=-5000", 0, 999),  # a suffix longer than the result: all of it
        ("bytes=990-5000", 990, 999),  # a last position past the end is clipped
        ("bytes=999-999", 999, 999),
        ("BYTES = 10 - 19", 10, 19),  # the unit is case-insensitive; blanks around
    ],
)
def test_one_range_is_served_as_asked(header: str, first: int, last: int) -> None:
    part = wanted(header)
    assert part == ByteRange(first, last, 1000)
    assert isinstance(part, ByteRange)
    assert part.length == last - first + 1
    assert part.content_range == f"bytes {first}-{last}/1000"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "bytes=0-99,200-299",  # several ranges: the whole result, never a multipart body
        "items=0-9",  # another unit
        "bytes 0-99",  # no '='
        "bytes=5",  # no '-'
        "bytes=abc-",
        "bytes=10-5",  # last before first: invalid, ignored
        "bytes=-",
        "bytes=+1-2",
        "bytes=\uff11-2",  # a non-ASCII digit (FULLWIDTH DIGIT ONE)
        "bytes=0x10-",
        "bytes=" + "9" * (POSITION_DIGITS_MAX + 1) + "-",
        "",
    ],
)
def test_anything_else_gets_the_whole_result(header: str | None) -> None:
    assert wanted(header) is None


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_a_range_with_no_byte_of_the_result_is_unsatisfiable(header: str) -> None:
    part = wanted(header)
    assert part == Unsatisfiable(1000)
    assert isinstance(part, Unsatisfiable)
    assert part.content_range == "bytes */1000"


def test_an_empty_result_has_no_range_but_its_whole() -> None:
    assert wanted("bytes=0-", size=0) == Unsatisfiable(0)
    assert wanted("bytes=-10", size=0) is None  # the (empty) whole


def test_if_range_sends_the_range_only_for_the_copy_being_resumed() -> None:
    assert wanted("bytes=100-", if_range=ETAG) == ByteRange(100, 999, 1000)
    # another result, a weak tag, or a date (results carry no Last-Modified): the whole
    for other in ('"another"', f"W/{ETAG}", "Wed, 21 Oct 2026 07:28:00 GMT"):
        assert wanted("bytes=100-", if_range=other) is None
    # a result without a digest has no validator: If-Range never matches
    assert requested_range("bytes=100-", ETAG, 1000, None) is None
    assert requested_range("bytes=100-", None, 1000, None) == ByteRange(100, 999, 1000)
