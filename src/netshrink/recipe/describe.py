"""Every technique's options as documentation rows, read from the registry's config models.

``netshrink list`` and the docs print these; nothing here restates an option by hand, so the
listing cannot drift from what the recipe validator accepts.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from netshrink.registry import Technique, options_model

_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("multiple_of", "multiple of"))


@dataclass(frozen=True)
class OptionDoc:
    """One option: dotted name (nested options as ``finetune.epochs``), type, default, range."""

    name: str
    type: str
    default: str
    range: str
    description: str


def type_name(annotation: Any) -> str:
    """A short readable type: ``float``, ``l1|l2``, ``int | None``, ``list[str]``, ``mapping``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (tuple, list) and args:
        return f"list[{type_name(args[0])}]"
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def bounds(field: FieldInfo) -> str:
    """The field's numeric constraints as text, e.g. ``>= 0, < 1``; empty when unconstrained."""
    parts = []
    for meta in field.metadata:
        for attr, symbol in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(see below)"
    return "None" if value is None else repr(value)


def options(model: type[BaseModel], prefix: str = "") -> Iterator[OptionDoc]:
    """Rows for every field of ``model``, nested option models expanded after their parent."""
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        yield OptionDoc(
            dotted,
            type_name(field.annotation),
            _default(field),
            bounds(field),
            field.description or "",
        )
        sub = options_model(field.annotation)
        if sub is not None:
            yield from options(sub, prefix=f"{dotted}.")


def describe(tech: Technique) -> list[OptionDoc]:
    """Documentation rows of every option of ``tech``."""
    return list(options(tech.config))
