"""es-AR number formatting (utils.numbers): decimal comma, thousands point, percent with a space."""

import doctest
import math

import matplotlib

matplotlib.use("Agg")

import utils.numbers as numbers
from utils.numbers import fmt_num, fmt_pct, fmt_ratio, fmt_unit, tick_formatter


def test_doctests_hold():
    assert doctest.testmod(numbers).failed == 0


def test_thousands_and_decimals():
    assert fmt_num(1234567.891, 2) == "1.234.567,89"
    assert fmt_num(999) == "999"
    assert fmt_num(-1500.5, 1) == "-1.500,5"
    assert fmt_num(-0.0001) == "0"
    assert fmt_num(3.5, 1, signed=True) == "+3,5"


def test_missing_values_print_a_dash():
    assert fmt_num(None) == fmt_pct(math.nan) == fmt_unit(None, "GiB") == fmt_ratio(math.nan) == "—"


def test_percent_and_units_plain_and_latex():
    assert fmt_pct(0.123) == "12,3\u00a0%"
    assert fmt_pct(0.123, latex=True) == r"12,3\,\%"
    assert fmt_unit(7.5, "GiB", 1, latex=True) == r"7,5\,GiB"
    assert fmt_ratio(3.419) == "3,42×"


def test_tick_formatter_uses_as_few_decimals_as_needed():
    fmt = tick_formatter()
    assert [fmt(v) for v in (0, 0.5, 2.25, 10000)] == ["0", "0,5", "2,25", "10.000"]
    assert tick_formatter(percent=True)(0.25) == "25\u00a0%"
