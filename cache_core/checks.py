"""Argument checks of cache_core: one message style for every integer, number and choice it takes.

(``magi1.checks`` holds the same three for the model package: neither package may import the other.)
"""

from __future__ import annotations

import math


def check_int(name, value, *, low=None, high=None, hint=""):
    """``value`` must be an int (not a bool) within ``[low, high]``; ``hint`` follows the range."""
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low) or (
            high is not None and value > high):
        raise ValueError(f"{name} must be {_integer_range(low, high)}{hint}, got {value!r}")
    return value


def check_number(name, value, *, low=None, high=None, low_open=False):
    """``value`` must be a finite int or float within ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        raise ValueError(f"{name} must be {_number_range(low, high, low_open)}, got {value!r}")
    return value


def check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def _integer_range(low, high):
    if low == 1 and high is None:
        return "a positive integer"
    if high is None:
        return "an integer" if low is None else f"an integer >= {low}"
    return f"an integer in [{low}, {high}]"


def _number_range(low, high, low_open):
    if low is not None and high is not None and not low_open:
        return f"a finite number in [{low:g}, {high:g}]"
    bounds = [f"{'>' if low_open else '>='} {low:g}"] if low is not None else []
    bounds += [f"<= {high:g}"] if high is not None else []
    return " ".join(["a finite number"] + [" and ".join(bounds)] if bounds else ["a finite number"])
