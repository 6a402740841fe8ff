"""Byte ranges of a download (RFC 9110 §14): which part of a representation a
``Range`` request asks for.

One range is served (``206``); a request naming several ranges, another unit,
or a malformed ``Range`` is answered with the whole representation (``200``),
as the RFC lets a server do: a resuming client still gets every byte, only
more of them. A range wholly past the end is ``416`` (``Unsatisfiable``).
``If-Range`` makes the range conditional on the client's copy being the one
stored: with any other validator (an old ETag, a weak one, a date -- results
carry no Last-Modified) the whole representation is sent, so a client never
splices bytes of two different results.
"""

from __future__ import annotations

from dataclasses import dataclass

# a range-spec's numbers: at most this many digits (a 10^18-byte file is beyond
# any result); longer is malformed, so a huge number cannot cost a big-int parse
POSITION_DIGITS_MAX = 18


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes ``first`` .. ``last`` (inclusive) of a ``size``-byte representation."""

    first: int
    last: int
    size: int

    def __post_init__(self) -> None:
        assert 0 <= self.first <= self.last < self.size, self

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.first}-{self.last}/{self.size}"


@dataclass(frozen=True, slots=True)
class Unsatisfiable:
    """No byte of the representation is in the requested range: ``416``."""

    size: int

    @property
    def content_range(self) -> str:
        return f"bytes */{self.size}"


def _position(text: str) -> int | None:
    text = text.strip(" \t")
    if not text or len(text) > POSITION_DIGITS_MAX or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def requested_range(
    range_header: str | None, if_range: str | None, size: int, etag: str | None
) -> ByteRange | Unsatisfiable | None:
    """The part of a ``size``-byte representation with strong entity tag ``etag``
    (quoted; None when it has none) a request asks for: a ``ByteRange``,
    ``Unsatisfiable``, or None for the whole representation."""
    assert size >= 0
    if range_header is None:
        return None
    if if_range is not None and (etag is None or if_range.strip(" \t") != etag):
        return None  # the client's copy is another one (or named by date): send it whole
    unit, equals, specs = range_header.partition("=")
    if not equals or unit.strip(" \t").lower() != "bytes" or "," in specs:
        return None  # another unit, malformed, or several ranges: the whole representation
    first_text, dash, last_text = specs.partition("-")
    if not dash:
        return None
    if not first_text.strip(" \t"):
        # a suffix: the last N bytes
        suffix = _position(last_text)
        if suffix is None:
            return None
        if suffix == 0:
            return Unsatisfiable(size)
        if size == 0:
            return None  # an empty representation: the (empty) whole
        return ByteRange(max(0, size - suffix), size - 1, size)
    first = _position(first_text)
    if first is None:
        return None
    if last_text.strip(" \t"):
        last = _position(last_text)
        if last is None or last < first:
            return None  # invalid (RFC 9110 §14.1.1): ignored
    else:
        last = size - 1
    if first >= size:
        return Unsatisfiable(size)
    return ByteRange(first, min(last, size - 1), size)
