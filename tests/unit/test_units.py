"""Durations, sizes and rates as people type them."""

from __future__ import annotations

import pytest

from coordinator.units import (
    ByteCount,
    Percent,
    UnitError,
    format_duration,
    kbit,
    parse_duration,
    parse_rate,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("200ms", 0.2),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("1m30s", 90.0),
        (" 10S ", 10.0),
        ("0ms", 0.0),
    ],
)
def test_parse_duration_accepts_units(text: str, seconds: float) -> None:
    """Test that durations with ms, s, m, h (and sums of them) parse to seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["30", "", "s", "30 seconds", "-5s", "5d", "1m30"])
def test_parse_duration_refuses_bare_or_unknown(text: str) -> None:
    """Test that a duration without a known unit is refused with the forms that work."""
    with pytest.raises(UnitError, match=r"not a duration: .*e\.g\. 200ms, 30s"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64MiB", ByteCount(64 * 2**20)),
        ("512Mi", ByteCount(512 * 2**20)),
        ("1G", ByteCount(10**9)),
        ("1GiB", ByteCount(2**30)),
        ("1.5k", ByteCount(1500)),
        ("100b", ByteCount(100)),
        ("50%", Percent(50.0)),
        ("12.5%", Percent(12.5)),
    ],
)
def test_parse_size_bytes_and_percent(text: str, size: ByteCount | Percent) -> None:
    """Test that sizes follow Kubernetes' units (G = 10^9, Gi = 2^30) and percents."""
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("512", "not a size"),
        ("1 parsec", "unknown size unit 'parsec'"),
        ("150%", "0% < share <= 100%"),
        ("0%", "0% < share <= 100%"),
        ("0MiB", "empty size"),
    ],
)
def test_parse_size_refuses_with_reason(text: str, message: str) -> None:
    """Test that bad sizes are refused with a message naming the problem."""
    with pytest.raises(UnitError, match=message):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("10mbit", 10_000_000),
        ("512kbit", 512_000),
        ("1gbit", 10**9),
        ("1mibit", 2**20),
        ("1mbps", 8_000_000),
        ("100bit", 100),
    ],
)
def test_parse_rate_uses_tc_units(text: str, bits: int) -> None:
    """Test that rates use tc's units: `bit` counts bits, `bps` counts bytes."""
    assert parse_rate(text) == bits


@pytest.mark.parametrize("text", ["10", "10mb", "fast", "0mbit"])
def test_parse_rate_refuses_bad_rates(text: str) -> None:
    """Test that bare numbers, unknown units and zero rates are refused."""
    with pytest.raises(UnitError, match="rate"):
        parse_rate(text)


def test_kbit_rounds_up() -> None:
    """Test that a sub-kbit rate becomes 1 kbit/s, never 0."""
    assert kbit(100) == 1
    assert kbit(10_000_000) == 10_000


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (30, "30s"), (125, "2m05s"), (3600, "1h00m")],
)
def test_format_duration(seconds: float, text: str) -> None:
    """Test that durations are shown in short human form."""
    assert format_duration(seconds) == text
