"""Reading recipe YAML with bounds: plain data only, no duplicate keys, no alias bombs.

``yaml.safe_load`` already refuses tags that build Python objects. It does not refuse a key given
twice (the last silently wins, so a second ``stages:`` drops the first stage list), nor aliases
whose expansion is exponential ("billion laughs": nine nested aliases of ten make 10^9 nodes out
of a 1 KB file), and deeply nested flow collections end in a RecursionError. :func:`load_yaml`
composes the document with a loader that counts every node as it would be expanded, caps the
nesting depth and refuses duplicate keys, each with the line where the problem is.
"""

from __future__ import annotations

from typing import Any

import yaml

from netshrink.errors import RecipeError

MAX_BYTES = 256 * 1024
"""Largest recipe file read, in bytes (the shipped recipes are under 1 KB)."""
MAX_DEPTH = 32
"""Deepest nesting of mappings and sequences (a recipe needs about 6)."""
MAX_NODES = 20_000
"""Most YAML nodes a recipe may hold once every alias is expanded."""


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class _BoundedLoader(yaml.SafeLoader):
    """A safe loader that bounds depth and expanded size and refuses duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._expanded: dict[int, int] = {}  # id(node) -> node count once aliases are expanded

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._expanded:
                line = event.start_mark.line + 1
                raise RecipeError(f"line {line}: recursive alias *{event.anchor}")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise RecipeError(f"line {mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
        node = super().compose_node(parent, index)
        self._depth -= 1
        if id(node) not in self._expanded:
            self._expanded[id(node)] = 1 + sum(self._expanded[id(c)] for c in _children(node))
        if self._expanded[id(node)] > MAX_NODES:
            raise RecipeError(
                f"line {_line(node)}: the recipe expands to more than {MAX_NODES} values "
                "(aliases repeat what they name); write it out plainly"
            )
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the base class reports it
                continue
            if duplicate:
                raise RecipeError(
                    f"line {_line(key_node)}: key {str(key)[:80]!r} is given twice in one mapping; "
                    "keep one (YAML would silently drop the first)"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load_yaml(text: str, source: str = "<recipe>") -> Any:
    """Parse one YAML document of plain data within the bounds above; RecipeError otherwise."""
    if len(text) > MAX_BYTES:
        raise RecipeError(f"{source}: {len(text)} characters; a recipe holds at most {MAX_BYTES}")
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader refuses control characters (a NUL) at once
        return loader.get_single_data()
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise RecipeError(f"{source}: nested too deeply to read") from None
    finally:
        if loader is not None:
            loader.dispose()
