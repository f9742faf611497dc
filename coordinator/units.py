"""Durations, sizes and rates as people type them: `30s`, `512MiB`, `10mbit`.

Every parser refuses a bare number: `--duration 30` could mean seconds or
minutes and `--size 512` bytes or megabytes, and a chaos tool must not guess.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final


class UnitError(ValueError):
    """A value that does not parse; the text shows the forms that do."""


_NUMBER: Final = r"(\d+(?:\.\d+)?|\.\d+)"

_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART: Final = re.compile(_NUMBER + r"(ms|s|m|h)")
_DURATION_HINT: Final = "e.g. 200ms, 30s, 2m, 1h or 1m30s"


def parse_duration(text: str) -> float:
    """Seconds in `text`: `200ms`, `30s`, `2m`, `1h`, or a sum like `1m30s`."""
    compact = text.strip().lower()
    position = 0
    seconds = 0.0
    while position < len(compact):
        part = _DURATION_PART.match(compact, position)
        if part is None:
            break
        seconds += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        position = part.end()

    if not compact or position != len(compact):
        msg = f"{text!r} is not a duration: give a number with a unit, {_DURATION_HINT}"
        raise UnitError(msg)
    return seconds


@dataclass(frozen=True)
class ByteCount:
    bytes: int


@dataclass(frozen=True)
class Percent:
    percent: float


# Kubernetes' convention, which edge operators already write in manifests:
# decimal K/M/G/T (and KB, MB, ...) are powers of 1000, Ki/Mi/Gi/Ti (and KiB,
# MiB, ...) powers of 1024.
_SIZE_UNITS: Final = {
    "b": 1,
    "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mi": 2**20, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "ti": 2**40, "tib": 2**40,
}  # fmt: skip
_SIZE: Final = re.compile(_NUMBER + r"\s*([a-z]+|%)")
_SIZE_HINT: Final = "e.g. 512MiB, 1Gi, 1G (10^9 bytes) or 30% (of the node's memory)"


def parse_size(text: str) -> ByteCount | Percent:
    """A byte count (`64MiB`, `1G`) or a share of the node's memory (`30%`)."""
    found = _SIZE.fullmatch(text.strip().lower())
    if found is None:
        msg = f"{text!r} is not a size: give a number with a unit, {_SIZE_HINT}"
        raise UnitError(msg)
    number, unit = float(found.group(1)), found.group(2)

    if unit == "%":
        if not 0 < number <= 100:
            msg = f"{text!r} is not a share of memory: give 0% < share <= 100%"
            raise UnitError(msg)
        return Percent(number)

    if unit not in _SIZE_UNITS:
        msg = f"{text!r} has an unknown size unit {unit!r}: {_SIZE_HINT}"
        raise UnitError(msg)
    count = math.ceil(number * _SIZE_UNITS[unit])
    if count <= 0:
        msg = f"{text!r} is an empty size: give more than 0 bytes"
        raise UnitError(msg)
    return ByteCount(count)


# tc's convention: `bit` units count bits, `bps` units count bytes per second.
_RATE_UNITS: Final = {
    "bit": 1,
    "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
    "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40,
    "bps": 8,
    "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9, "tbps": 8 * 10**12,
}  # fmt: skip
_RATE: Final = re.compile(_NUMBER + r"\s*([a-z]+)")
_RATE_HINT: Final = "e.g. 512kbit, 10mbit, 1gbit (bits/s) or 1mbps (bytes/s, as in tc)"


def parse_rate(text: str) -> int:
    """Bits per second in `text`, with tc's units: `10mbit`, `512kbit`, `1mbps`."""
    found = _RATE.fullmatch(text.strip().lower())
    if found is None or found.group(2) not in _RATE_UNITS:
        msg = f"{text!r} is not a rate: give a number with a unit, {_RATE_HINT}"
        raise UnitError(msg)

    bits = math.ceil(float(found.group(1)) * _RATE_UNITS[found.group(2)])
    if bits <= 0:
        msg = f"{text!r} is a zero rate: to drop all traffic use `inject partition`"
        raise UnitError(msg)
    return bits


def kbit(bits_per_second: int) -> int:
    """Whole kbit/s, rounded up so that a small rate never becomes zero."""
    return math.ceil(bits_per_second / 1000)


def format_duration(seconds: float) -> str:
    """A short human form of `seconds`: `250ms`, `30s`, `2m05s`, `1h00m`."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
