"""The run documents' pure renderers: RFC 3339 timestamps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from dpp.runs.documents import timestamp


def reference(value: datetime) -> str:
    """The rendering timestamp() must keep, byte for byte."""
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def test_timestamp_renders_utc_with_microseconds_and_z() -> None:
    assert timestamp(None) is None
    assert timestamp(datetime(2026, 1, 31, 23, 59, 59, 123456, UTC)) == (
        "2026-01-31T23:59:59.123456Z"
    )
    # microseconds always printed, zero included
    assert timestamp(datetime(2026, 1, 31, tzinfo=UTC)) == "2026-01-31T00:00:00.000000Z"
    assert timestamp(datetime(2026, 1, 31, 0, 0, 0, 1, UTC)) == "2026-01-31T00:00:00.000001Z"
    assert timestamp(datetime(1, 1, 1, tzinfo=UTC)) == "0001-01-01T00:00:00.000000Z"
    assert timestamp(datetime.max.replace(tzinfo=UTC)) == "9999-12-31T23:59:59.999999Z"


def test_timestamp_converts_any_offset_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert timestamp(datetime(2026, 3, 1, 1, 30, tzinfo=plus_two)) == (
        "2026-02-28T23:30:00.000000Z"
    )
    # UTC under another tzinfo object renders the same
    for tz in (ZoneInfo("UTC"), timezone(timedelta(0)), ZoneInfo("Europe/Paris")):
        value = datetime(2026, 7, 1, 12, 0, 0, 5, tzinfo=tz)
        assert timestamp(value) == reference(value)
    naive = datetime(2026, 7, 1, 12, 0, 0, 5)  # local time, as astimezone reads it
    assert timestamp(naive) == reference(naive)


def test_timestamp_cached_path_matches_the_reference() -> None:
    start = datetime(2026, 12, 2, 13, 0, tzinfo=UTC)
    for step in range(2_000):
        value = start + timedelta(microseconds=step * 7_919, days=step)
        assert timestamp(value) == reference(value)
        assert timestamp(value) == reference(value)  # the cached answer too
        assert timestamp(value, cached=False) == reference(value)
    plus_two = timezone(timedelta(hours=2))
    local = datetime(2026, 3, 1, 1, 30, tzinfo=plus_two)
    assert timestamp(local, cached=False) == "2026-02-28T23:30:00.000000Z"
    assert timestamp(None, cached=False) is None
