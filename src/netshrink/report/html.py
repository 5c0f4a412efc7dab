"""``report.html``: one self-contained page (inline CSS, PNG figures as base64, no scripts)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape

import yaml

from netshrink.recipe.result import Report
from netshrink.report.plots import Figure
from netshrink.report.tables import (
    DEFINITIONS,
    headline,
    layer_rows,
    measured_on,
    notes,
    stage_headers,
    stage_rows,
)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.headline td { font-size: 1.2em; } .note { color: #a33; }
figure { margin: 2em 0; } figcaption { font-size: 0.85em; color: #555; max-width: 50em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], cls: str = "") -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(fig: Figure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (
        f'<figure><h2>{escape(fig.title)}</h2><img alt="{escape(fig.title)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{escape(fig.caption)}</figcaption>'
        "</figure>"
    )


def html(report: Report, figures: Sequence[Figure]) -> str:
    """The whole page as a string; it references no file and no network address."""
    parts = [
        "<h1>netshrink report</h1>",
        _table(["", ""], headline(report), "headline"),
        "<h2>Stages</h2>",
        _table(stage_headers(report), stage_rows(report)),
        *(f'<p class="note">{escape(n)}</p>' for n in notes(report)),
        f"<p>{escape(measured_on(report))}.</p>",
        *(_figure(f) for f in figures),
    ]
    layer_headers, rows = layer_rows(report)
    if rows:
        parts += ["<h2>Layers of the compressed model</h2>", _table(layer_headers, rows)]
    parts.append("<h2>Definitions</h2><ul>")
    parts += [f"<li><b>{escape(k)}</b>: {escape(v)}</li>" for k, v in DEFINITIONS]
    parts.append("</ul><h2>Recipe (resolved)</h2>")
    parts.append(f"<pre>{escape(yaml.safe_dump(report.recipe, sort_keys=False))}</pre>")
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>netshrink report</title><style>{_CSS}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )
