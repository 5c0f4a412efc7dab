"""Which modules a technique touches.

A :class:`Targets` holds ``include`` and ``exclude`` patterns on qualified module names (glob
by default, a regular expression when prefixed with ``re:``) and an optional list of module type
names. A module is selected when its name matches an include pattern, its type is one of
``types`` (when given) and no exclude pattern matches it: exclude wins. A pattern that matches no
module at all is an error, never a silent no-op.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from netshrink.errors import TargetError


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


class Targets(BaseModel):
    """Module selection: name patterns (glob or ``re:``), type names, exclusions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    include: tuple[str, ...] = Field(
        ("*",), description="qualified-name patterns to select (glob, or 're:' regex)"
    )
    exclude: tuple[str, ...] = Field((), description="qualified-name patterns to leave alone")
    types: tuple[str, ...] = Field(
        (), description="module class names to keep (e.g. Linear, Conv2d); empty: the technique's"
    )

    def select(
        self, model: nn.Module, default_types: Sequence[type[nn.Module]] = ()
    ) -> dict[str, nn.Module]:
        """Return ``{qualified name: module}`` of the selected modules, in definition order.

        ``default_types`` are the types the technique can handle; they apply when ``types`` is
        empty. Raises :class:`TargetError` when a pattern matches nothing, when a type name is
        unknown to the model, or when the selection ends up empty.
        """
        modules = {name: m for name, m in model.named_modules() if name}
        names_by_type = {type(m).__name__ for m in modules.values()}
        for t in self.types:
            if t not in names_by_type:
                raise TargetError(
                    f"type '{t}' is not in the model; its module types are: "
                    f"{', '.join(sorted(names_by_type))}"
                )
        for pattern in (*self.include, *self.exclude):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise TargetError(f"bad regular expression {pattern!r}: {exc}") from exc
            if pattern != "*" and not any(_matches(pattern, n) for n in modules):
                sample = ", ".join(list(modules)[:12])
                raise TargetError(
                    f"pattern {pattern!r} matches no module; module names look like: {sample}"
                )

        def type_ok(m: nn.Module) -> bool:
            if self.types:
                return type(m).__name__ in self.types
            return not default_types or isinstance(m, tuple(default_types))

        selected = {
            name: m
            for name, m in modules.items()
            if any(_matches(p, name) for p in self.include)
            and not any(_matches(p, name) for p in self.exclude)
            and type_ok(m)
        }
        if not selected:
            wanted = list(self.types) or [t.__name__ for t in default_types]
            raise TargetError(
                f"no module selected (include={list(self.include)}, exclude={list(self.exclude)},"
                f" types={wanted})"
            )
        return selected
