"""Writing a run's report: ``report.md``, ``report.html``, ``report.json`` and the plots.

:func:`write` renders a :class:`~netshrink.report.record.Report` into a folder; every file is
written atomically (temporary file in the same folder, then renamed).
"""

from __future__ import annotations

import json
from pathlib import Path

from netshrink.outdir import write_atomic
from netshrink.report.html import html
from netshrink.report.plots import figures
from netshrink.report.record import Report
from netshrink.report.terminal import print_report
from netshrink.report.text import markdown


def write(report: Report, out: str | Path) -> dict[str, Path]:
    """Write the report files into ``out`` (created if missing); return their paths by kind."""
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    figs = figures(report)
    for fig in figs:
        write_atomic(out / "plots" / f"{fig.name}.png", fig.png)
    md_figures = [(f.title, f.caption, f"plots/{f.name}.png") for f in figs]
    paths = {"md": out / "report.md", "html": out / "report.html", "json": out / "report.json"}
    write_atomic(paths["md"], markdown(report, md_figures).encode())
    write_atomic(paths["html"], html(report, figs).encode())
    write_atomic(paths["json"], (json.dumps(report.to_dict(), indent=2) + "\n").encode())
    return paths


__all__ = ["print_report", "write", "write_atomic"]
