"""Byte sizes and cache budgets as people write them: `512MiB`, `2GiB`, `0.25`."""

from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30,
}
BUDGET_HINT = "write a size with a unit (512MiB, 2GiB) or a share of all expert bytes between 0 and 1 (0.25)"


def parse_size(text: str) -> int:
    """`"512MiB"` -> 536870912. Raises ValueError with the accepted forms."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (write e.g. 512MiB, 2GiB or 1.5GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_budget(text: str | int | float) -> int | float:
    """A cache budget as a person types it: a share of all expert bytes (0 to 1) or a size with a unit.

    A bare number above 1 is refused rather than read as bytes: `5` is far more likely to mean 5 GiB
    than 5 bytes, and a silent 5-byte cache caches nothing.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise UsageError(f"a cache budget cannot be negative, got {text}", hint=BUDGET_HINT)
        return text
    s = str(text).strip()
    if re.fullmatch(r"-\s*[0-9]*\.?[0-9]+\s*[a-zA-Z]*", s):
        raise UsageError(f"a cache budget cannot be negative, got {s!r}", hint=BUDGET_HINT)
    if re.fullmatch(r"[0-9]*\.?[0-9]+", s):
        value = float(s)
        if value <= 1.0:
            return value
        raise UsageError(f"budget {s!r} has no unit, and a share of the experts must lie between 0 and 1",
                         hint=f"write {s}GiB (or {s}MiB) for a size, or a share of all expert bytes such as 0.5")
    try:
        return parse_size(s)
    except ValueError:
        raise UsageError(f"not a cache budget: {s!r}", hint=BUDGET_HINT) from None


def resolve_budget(budget: int | float | str, total_bytes: int) -> int:
    """A budget in bytes from bytes, a byte string, or a fraction (0..1) of all expert bytes."""
    if isinstance(budget, str):
        s = budget.strip()
        if re.fullmatch(r"[0-9]*\.?[0-9]+", s) and float(s) <= 1.0 and ("." in s or s in ("0", "1")):
            budget = float(s)
        else:
            return parse_size(s)
    if isinstance(budget, float):
        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"a fractional budget must lie between 0 and 1, got {budget}")
        return int(round(budget * total_bytes))
    if budget < 0:
        raise ValueError(f"a budget cannot be negative, got {budget}")
    return int(budget)


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
