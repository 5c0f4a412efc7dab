"""``report.html``: one self-contained page (inline CSS, PNG figures as base64, no scripts)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING

import yaml

from netshrink.report.plots import Figure
from netshrink.report.tables import (
    DEFINITIONS,
    headline,
    human_bytes,
    layer_rows,
    measured_on,
    notes,
    rate,
    stage_headers,
    stage_rows,
)

if TYPE_CHECKING:
    from netshrink.report.record import Report

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 76em; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.headline td { font-size: 1.2em; } .note { color: #a33; }
.glance td { vertical-align: middle; } .glance .bar { width: 14em; }
.track { background: #eee; height: 0.9em; width: 100%; }
.fill { background: #4a7bb7; height: 100%; min-width: 1px; }
.better { color: #176b2c; } .worse { color: #a33; } .undone { color: #888; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(30em, 1fr));
           gap: 1em 2em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #555; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], cls: str = "") -> str:
    """A table; no header row when ``headers`` is empty."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    attr = f' class="{cls}"' if cls else ""
    thead = f"<thead><tr>{head}</tr></thead>" if headers else ""
    return f"<table{attr}>{thead}<tbody>{body}</tbody></table>"


def _figure(fig: Figure) -> str:
    """A figure with its title above and its caption below, each once."""
    data = base64.b64encode(fig.png).decode("ascii")
    return (
        f'<figure><h3>{escape(fig.title)}</h3><img alt="{escape(fig.title)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{escape(fig.caption)}</figcaption>'
        "</figure>"
    )


def _bar(fraction: float, text: str) -> str:
    """A bar ``fraction`` of the baseline's length (capped at 100%) followed by ``text``."""
    width = f"{min(max(fraction, 0.0), 1.0) * 100:.1f}%"
    return (
        f'<td class="bar"><div class="track"><div class="fill" style="width:{width}"></div>'
        f"</div></td><td>{escape(text)}</td>"
    )


def glance(report: Report) -> str:
    """Size, latency and metric of every stage against the baseline, as bars of the baseline's
    length: the first table of the page."""
    base = report.baseline.measurement
    assert base is not None
    metric = report.metric_name
    rows = []
    for record in (report.baseline, *report.stages):
        m = record.measurement
        undone = record.status in ("rolled back", "skipped")
        status = f" ({record.status})" if undone else ""
        label = f'<td class="{"undone" if undone else ""}">{escape(record.label + status)}</td>'
        if m is None or record.speedup is None:
            rows.append(f'<tr>{label}<td colspan="6"></td></tr>')
            continue
        change = round(record.metric - report.baseline.metric, 4) + 0.0  # no "-0.0000"
        cls = "worse" if change < 0 else "better" if change > 0 else ""
        rows.append(
            f"<tr>{label}"
            + _bar(m.bytes / base.bytes, f"{human_bytes(m.bytes)}, {rate(base.bytes / m.bytes)}")
            + _bar(1 / record.speedup, f"{m.latency_ms:.3g} ms, {rate(record.speedup)}")
            + f'<td>{record.metric:.4f}</td><td class="{cls}">{change:+.4f}</td></tr>'
        )
    head = (
        '<tr><th>stage</th><th colspan="2">size on disk, compression</th>'
        f'<th colspan="2">latency, speedup</th><th>{escape(metric)}</th><th>change</th></tr>'
    )
    return f'<table class="glance"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def html(report: Report, figures: Sequence[Figure]) -> str:
    """The whole page as a string; it references no file and no network address."""
    parts = [
        "<h1>netshrink report</h1>",
        _table([], headline(report), "headline"),
        "<h2>Every stage against the baseline</h2>",
        glance(report),
        *(f'<p class="note">{escape(n)}</p>' for n in notes(report)),
        f"<p>{escape(measured_on(report))}. Bars are fractions of the baseline's size and "
        "latency (shorter is better).</p>",
        '<div class="figures">',
        *(_figure(f) for f in figures),
        "</div>",
        "<h2>Stages in detail</h2>",
        _table(stage_headers(report), stage_rows(report)),
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
