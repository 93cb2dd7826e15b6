"""Sizes as people write them in configuration files: 4096, "64MiB", "64M", "1.5GiB", "64MB"."""

from __future__ import annotations

import re
from typing import Any

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)(B?)\s*$", re.IGNORECASE)
_POWER = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_BINARY = {"TiB": 1 << 40, "GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10}


def parse_size(value: Any, where: str, error: type[ValueError] = ValueError, decimal: bool = True) -> int:
    """A whole, positive number of bytes; ``error`` says ``where`` when the value is not one.

    "K/M/G/T" and "KiB..TiB" are binary. "KB..TB" are decimal, as disk vendors write them; with
    ``decimal=False`` they are refused instead, for files where a 2.4% surprise is worse than an error.
    """
    if isinstance(value, bool):
        raise error(f"{where}: must be a size like 64MiB")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise error(f"{where}: must be a size like 64MiB")
        number, unit, binary, suffix = match.groups()
        is_decimal = bool(unit) and bool(suffix) and not binary
        if is_decimal and not decimal:
            raise error(f"{where}: must be a size like 64MiB (binary units)")
        scaled = float(number) * (1000 if is_decimal else 1024) ** _POWER[unit.upper()]
        if scaled != int(scaled):
            raise error(f"{where}: {value!r} is not a whole number of bytes")
        size = int(scaled)
    if size <= 0:
        raise error(f"{where}: must be positive")
    return size


def format_size(size: int) -> str:
    """The largest binary unit that represents ``size`` exactly ("64MiB", "4096B")."""
    for unit, scale in _BINARY.items():
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"


def human_size(size: int) -> str:
    """A size for people to read, rounded to three significant digits ("1.50GiB", "768MiB", "0B")."""
    for unit, scale in _BINARY.items():
        if size >= scale:
            value = size / scale
            return f"{value:.3g}{unit}" if value < 1000 else f"{value:.0f}{unit}"
    return f"{size}B"
