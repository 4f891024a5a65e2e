"""One set of argument checks for every module: each returns the normalized
value or raises a `ValueError` that names the argument and the value."""

import math
import numbers

import numpy as np


def check_int(name, value, minimum=1):
    """An integer `>= minimum` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {kind}, got {value!r}.")
    return int(value)


def check_positive_int(name, value):
    """An integer `>= 1`."""
    return check_int(name, value, 1)


def check_optional_int(name, value, minimum=1):
    """None, or an integer `>= minimum`."""
    return None if value is None else check_int(name, value, minimum)


def check_number(name, value, *, minimum=None, maximum=None, low_open=False, high_open=False,
                 allow_none=False):
    """A finite real number in the given range (bools refused), as a float."""
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if low_open else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if high_open else value <= maximum
    if not ok:
        low = "" if minimum is None else f"{'(' if low_open else '['}{minimum}"
        high = "" if maximum is None else f"{maximum}{')' if high_open else ']'}"
        where = f" in {low}, {high}" if low and high else (
            f" {'>' if low_open else '>='} {minimum}" if low else (
                f" {'<' if high_open else '<='} {maximum}" if high else ""))
        none = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be a finite number{where}{none}, got {value!r}.")
    return float(value)


def check_alpha(alpha):
    """None, or a positive number (the LoRA scaling numerator)."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0:
        raise ValueError(f"`alpha` must be a positive number or None, got {alpha!r}.")
    return float(alpha)


def check_dropout(dropout):
    """A rate in `[0, 1)`."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not (
        0.0 <= dropout < 1.0
    ):
        raise ValueError(f"`dropout` must be a number in [0, 1), got {dropout!r}.")
    return float(dropout)


def check_seed(seed):
    """None, or a non-negative integer."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"`seed` must be None or a non-negative integer, got {seed!r}.")
    return int(seed)


def check_bool(name, value):
    """True or False (numpy bools accepted)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return bool(value)


def check_choice(name, value, choices):
    """One of `choices` (a mapping's keys or a sequence)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return value
