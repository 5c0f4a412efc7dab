"""Bounded quoting of values in error messages.

A message that prints a whole parsed value lets a small input cost gigabytes (a YAML alias bomb
expands when printed) and buries the point under megabytes of text; every message that quotes a
value the user gave goes through :func:`excerpt`.
"""

from __future__ import annotations

import reprlib

MAX_CHARS = 200
"""Longest excerpt of a value an error message quotes, in characters."""

_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxlevel = 3
_REPR.maxtuple = _REPR.maxlist = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6
_REPR.maxstring = _REPR.maxother = 80


def excerpt(value: object, limit: int = MAX_CHARS) -> str:
    """``repr(value)`` cut to at most ``limit`` characters, never walking more of it than that.

    Containers show their first few items and nested levels collapse to ``...``, so the cost is
    bounded whatever the value's expanded size.
    """
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
