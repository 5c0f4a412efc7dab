"""Saving a recipe run into a folder: both artifacts, provenance in the manifest, the report."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from netshrink.outdir import destination
from netshrink.recipe.result import Result

PROVENANCE_KEY = "provenance"
"""Key of the run's provenance in the compressed artifact's ``manifest_extra``."""


def save_run(result: Result, out: str | Path, extra: Mapping[str, Any] | None = None) -> dict:
    """Save ``out/baseline``, ``out/model`` and the report files; return their paths by kind.

    Both manifests record ``extra`` (the model and data references and the example inputs'
    shapes, which ``netshrink measure`` and ``export`` read back); the compressed one adds the
    report's provenance (resolved recipe, seed, per-stage measurements). The headline's bytes
    become those of the two saved artifacts, as ``du -b`` would count them.
    """
    from netshrink.artifact import artifact_bytes, save
    from netshrink.report import write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = result.report
    assert result.baseline is not None, "save_run needs the Result returned by compress"
    save(result.baseline, out / "baseline", manifest_extra={PROVENANCE_KEY: dict(extra or {})})
    provenance = {**report.provenance(), **(extra or {})}
    # The description is prose for report.json: in the manifest its bytes would count in the
    # compressed artifact's size and move the compression rate.
    provenance["recipe"] = {k: v for k, v in report.recipe.items() if k != "description"}
    save(result.model, out / "model", manifest_extra={PROVENANCE_KEY: provenance})
    report.artifact = str(destination(out) / "model")  # where it lies once swapped in
    report.delivered_bytes = (artifact_bytes(out / "baseline"), artifact_bytes(out / "model"))
    paths = write(report, out)
    return {"artifact": out / "model", "baseline": out / "baseline", **paths}
