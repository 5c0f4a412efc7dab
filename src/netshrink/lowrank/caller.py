"""Warnings attributed to the code that called netshrink, wherever inside it they arise.

``warnings.warn`` names the frame ``stacklevel`` steps up, but a warning raised deep in the
factorization is reached through a varying number of netshrink frames (the Python API, the
registry, the technique, a helper), so no fixed ``stacklevel`` points at the caller's line.
The warning names the first frame outside netshrink up the stack (past the innermost run of
netshrink frames), as Python 3.12's ``skip_file_prefixes`` does; 3.11 needs the walk below.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import FrameType

_PACKAGE = Path(__file__).resolve().parents[1]
"""The netshrink package's folder: frames of files under it are netshrink's own."""


def _own(frame: FrameType) -> bool:
    """Whether ``frame`` runs a file of the netshrink package."""
    return Path(frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


def warn(message: str) -> None:
    """``warnings.warn(message)`` (a UserWarning) attributed to the first frame outside
    netshrink above this call: the line that called netshrink, also when that is user code
    netshrink itself runs (a forward, a loss) calling netshrink again."""
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and _own(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)
