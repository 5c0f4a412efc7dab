"""Warnings attributed to the code that called netshrink, wherever inside it they arise.

``warnings.warn`` names the frame ``stacklevel`` steps up, but a warning raised deep in the
factorization is reached through a varying number of netshrink frames (the Python API, the
registry, the technique, a helper), so no fixed ``stacklevel`` points at the caller's line.
Python 3.12's ``skip_file_prefixes`` does this; 3.11 needs the walk below.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]
"""The netshrink package's folder: frames of files under it are netshrink's own."""


def warn(message: str) -> None:
    """``warnings.warn(message)`` (a UserWarning) attributed to the caller of the outermost
    netshrink frame on the stack: the user's line that called netshrink."""
    frame, level, outermost = sys._getframe(0), 1, 1
    while frame is not None:
        if Path(frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE):
            outermost = level
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=outermost + 1)
