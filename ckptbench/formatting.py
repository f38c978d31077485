"""How numbers are written for people: one formatter, so every table and figure rounds alike."""

from __future__ import annotations

import math


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def sig(value: float | None, digits: int = 3) -> str:
    """Three significant digits without exponents for large values; empty for a missing value."""
    if _missing(value):
        return ""
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def count(value: float | None) -> str:
    """A whole number with thousands separators; empty for a missing value."""
    return "" if _missing(value) else f"{int(value):,}"


def abbreviated(value: float) -> str:
    """A large count in thousands (k), millions (M) or billions (B), three significant digits."""
    for factor, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g} {unit}"
    return f"{value:g}"
