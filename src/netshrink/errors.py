"""The library's exceptions.

Every error netshrink raises on purpose derives from :class:`NetshrinkError`. Those caused by what
the caller gave (a recipe, an option, a reference, data) derive from :class:`InputError`; the CLI
maps them to exit code 2 and every other :class:`NetshrinkError` to exit code 1.
"""

from __future__ import annotations


class NetshrinkError(Exception):
    """Base class of every error netshrink raises on purpose."""


class InputError(NetshrinkError):
    """Something the caller gave is wrong; the message says what and what would be right."""


class ConfigError(InputError):
    """A technique option is unknown, of the wrong type, or out of range.

    ``stage`` names the recipe stage (index and technique) when the options came from a recipe,
    ``key`` the option at fault.
    """

    def __init__(self, message: str, *, stage: str | None = None, key: str | None = None):
        self.stage = stage
        self.key = key
        where = " ".join(p for p in (stage, f"option '{key}'" if key else None) if p)
        super().__init__(f"{where}: {message}" if where else message)


class RecipeError(ConfigError):
    """A recipe file is malformed: YAML syntax, version, stage layout, unknown technique."""


class TargetError(InputError):
    """A target pattern matched no module, or selected modules a technique cannot use."""


class MissingInputError(InputError):
    """A technique needs a context item (calibration data, example inputs, ...) it was not given."""


class ModelReferenceError(InputError):
    """A ``--model``/``--data``/``--eval`` reference cannot be resolved."""


class DataError(InputError):
    """Data or weights are unusable: empty calibration set, NaN or Inf values."""


class MissingExtraError(InputError):
    """An optional dependency is not installed; the message names the extra that installs it."""


class UnsupportedModuleError(NetshrinkError):
    """A technique met a layer type it cannot handle and cannot skip."""


class ArtifactError(InputError):
    """An artifact directory is missing, corrupt, truncated, foreign or of an unknown version."""


__all__ = [
    "ArtifactError",
    "ConfigError",
    "DataError",
    "InputError",
    "MissingExtraError",
    "MissingInputError",
    "ModelReferenceError",
    "NetshrinkError",
    "RecipeError",
    "TargetError",
    "UnsupportedModuleError",
]
