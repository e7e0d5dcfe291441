r"""Numbers as an Argentine reader reads them (es-AR): decimal comma, thousands grouped with a point.

Every number a notebook prints into a figure, a table or Spanish prose goes through these helpers, so that
"1,491 %" can never be read as 1491 % and "28.941 tok/s" never as 28,9. Number and unit are joined by a
non-breaking space (``\xa0`` below)::

    >>> fmt_num(28941.4)
    '28.941'
    >>> fmt_num(0.5, 2)
    '0,50'
    >>> fmt_pct(0.01491, 3)
    '1,491\xa0%'
    >>> fmt_unit(7.5, "GiB", 1)
    '7,5\xa0GiB'

A missing value (``None`` or NaN) prints as an em dash. ``latex=True`` escapes what LaTeX needs (``\%``) and
joins number and unit with a non-breaking thin space.
"""

from __future__ import annotations

import math
from typing import Any

from matplotlib.ticker import FuncFormatter

MISSING = "—"
THOUSANDS = "."
DECIMAL = ","


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt_num(x: float | int | None, decimals: int = 0, *, signed: bool = False) -> str:
    """``x`` with ``decimals`` decimals, a decimal comma and points between thousands (es-AR)."""
    if _missing(x):
        return MISSING
    text = f"{x:{'+' if signed else ''},.{decimals}f}"  # 28,941.40 in the C locale
    text = text.replace(",", "\0").replace(".", DECIMAL).replace("\0", THOUSANDS)
    return "0" if text == "-0" and not signed else text  # an ASCII minus: pdflatex has no U+2212


def fmt_pct(fraction: float | None, decimals: int = 1, *, signed: bool = False, latex: bool = False) -> str:
    """A share (0.123) as a percentage with a space before the sign, as the RAE writes it: ``12,3 %``."""
    if _missing(fraction):
        return MISSING
    return _join(fmt_num(100 * fraction, decimals, signed=signed), r"\%" if latex else "%", latex)


def fmt_unit(x: float | None, unit: str, decimals: int = 0, *, latex: bool = False) -> str:
    """A number and its unit, ``7,5 GiB`` (non-breaking space; a thin one in LaTeX)."""
    if _missing(x):
        return MISSING
    return _join(fmt_num(x, decimals), unit, latex)


def fmt_ratio(x: float | None, decimals: int = 2) -> str:
    """A speed-up or ratio, ``3,42×``."""
    return MISSING if _missing(x) else f"{fmt_num(x, decimals)}×"


def _join(number: str, unit: str, latex: bool) -> str:
    return f"{number}\\,{unit}" if latex else f"{number}\u00a0{unit}"


def tick_formatter(decimals: int | None = None, *, percent: bool = False) -> FuncFormatter:
    """A matplotlib tick formatter in es-AR; ``decimals=None`` uses as few as the ticks need.

    ``percent=True`` reads the tick as a share (0.25 → ``25 %``).
    """
    def fmt(value: float, _pos: Any = None) -> str:
        shown = 100 * value if percent else value
        places = decimals if decimals is not None else _places(shown)
        text = fmt_num(shown, places)
        return f"{text}\u00a0%" if percent else text

    return FuncFormatter(fmt)


def _places(value: float) -> int:
    """The fewest decimals (up to 3) that print ``value`` exactly enough for a tick label."""
    for places in range(4):
        if abs(round(value, places) - value) < 1e-9 * max(1.0, abs(value)):
            return places
    return 3


def use_es_ar_ticks(ax: Any, axis: str = "both", decimals: int | None = None, *, percent: bool = False) -> None:
    """Format the numeric tick labels of ``ax`` (``"x"``, ``"y"`` or ``"both"``) in es-AR."""
    if axis in ("x", "both"):
        ax.xaxis.set_major_formatter(tick_formatter(decimals, percent=percent))
    if axis in ("y", "both"):
        ax.yaxis.set_major_formatter(tick_formatter(decimals, percent=percent))
