"""Sizes for people: bytes in binary units."""

from __future__ import annotations

__all__ = ["format_bytes"]


def format_bytes(n: int) -> str:
    """Human-readable size with binary units, e.g. ``format_bytes(1288490189) == "1.2 GiB"``.

    Args:
        n: a number of bytes.
    """
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    value, i = float(n), 0
    while abs(value) >= 1024 and i < len(units) - 1:
        value, i = value / 1024, i + 1
    return f"{n} B" if i == 0 else f"{value:.1f} {units[i]}"
