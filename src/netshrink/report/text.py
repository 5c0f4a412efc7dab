"""Plain-text and Markdown renderings of a report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import yaml

from netshrink.report.tables import (
    DEFINITIONS,
    headline,
    layer_rows,
    measured_on,
    notes,
    stage_headers,
    stage_rows,
)

if TYPE_CHECKING:
    from netshrink.report.record import Report


def aligned(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A fixed-width text table: columns padded to their widest cell."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in lines
    )


def plain_table(report: Report) -> str:
    """The headline and the per-stage table as plain text (``str(report)``)."""
    head = "\n".join(f"{label}: {value}" for label, value in headline(report))
    parts = [
        head,
        aligned(stage_headers(report), stage_rows(report)),
        *notes(report),
        measured_on(report),
    ]
    return "\n\n".join(parts)


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(report: Report, figures: Sequence[tuple[str, str, str]] = ()) -> str:
    """``report.md``: headline, stages, per-layer table, figures (title, caption, file)."""
    out = ["# netshrink report", "", _md_table(["", ""], headline(report)), ""]
    out += ["## Stages", "", _md_table(stage_headers(report), stage_rows(report)), ""]
    out += [f"- {n}" for n in notes(report)]
    out += ["", measured_on(report) + ".", ""]
    for title, caption, path in figures:
        out += [f"## {title}", "", f"![{title}]({path})", "", caption, ""]
    layer_headers, rows = layer_rows(report)
    if rows:
        out += ["## Layers of the compressed model", "", _md_table(layer_headers, rows), ""]
    out += ["## Definitions", ""] + [f"- **{k}**: {v}" for k, v in DEFINITIONS]
    recipe = yaml.safe_dump(report.recipe, sort_keys=False)
    out += ["", "## Recipe (resolved)", "", "```yaml", recipe.rstrip(), "```", ""]
    return "\n".join(out)
