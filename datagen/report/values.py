"""Turning table values into what the report shows.

The report reads files a user can edit (``summary.json``, the parquet tables, ``run.json``), so a
value may not be what its column says. A number is used as a number only when it is one; anything
else is shown as the text it is (the template escapes it), never computed with.
"""

from __future__ import annotations

import math
from typing import Any

DASH = "—"


def as_number(v: Any) -> float | int | None:
    """``v`` if it is a finite int or float (not a bool), else ``None``."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def as_dict(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def show(v: Any) -> str:
    """Any value as text: ``None`` as a dash, everything else as ``str``."""
    return DASH if v is None else str(v)


def fixed(v: Any, digits: int = 3) -> str:
    """A number to ``digits`` decimals; anything else as its text."""
    n = as_number(v)
    return f"{n:.{digits}f}" if n is not None else show(v)


def mib(v: Any) -> str:
    """A byte count in MiB, one decimal."""
    n = as_number(v)
    return f"{n / 2**20:.1f}" if n is not None else show(v)


def percent_of(n: Any, total: Any) -> str:
    a, b = as_number(n), as_number(total)
    return f"{100 * a / b:.1f}%" if a is not None and b else DASH


def ratio(n: Any, total: Any, digits: int = 2) -> str:
    a, b = as_number(n), as_number(total)
    return f"{a / b:.{digits}f}" if a is not None and b else ""
