"""Option tables: every type renders as a readable name, constraints go in the range column."""

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from netshrink import registry
from netshrink.recipe.describe import options


class Knobs(BaseModel):
    count: Annotated[int, Field(ge=1, le=8)] | Annotated[float, Field(gt=0, le=1)] = 1.0
    ratio: float = Field(0.5, ge=0, lt=1)
    mode: Literal["a", "b"] = "a"
    pick: Literal["a", "b"] | Literal["c"] = "c"
    name: str | None = None


def test_constrained_union_members_render_as_their_types_with_their_bounds() -> None:
    rows = {o.name: o for o in options(Knobs)}
    assert (rows["count"].type, rows["count"].range) == (
        "int | float",
        "int >= 1, <= 8; float > 0, <= 1",
    )
    assert (rows["ratio"].type, rows["ratio"].range) == ("float", ">= 0, < 1")
    assert (rows["mode"].type, rows["mode"].range) == ("a|b", "")
    assert rows["pick"].type == "a|b|c"
    assert (rows["name"].type, rows["name"].range) == ("str | None", "")


def test_no_registered_option_renders_as_annotated() -> None:
    rows = [o for t in registry.all_techniques() for o in options(t.config)]
    assert not [o.name for o in rows if "Annotated" in o.type]
    depth = next(o for o in options(registry.get("distill.kd").config) if o.name == "student.depth")
    assert depth.type == "int | float" and "float > 0, <= 1" in depth.range
