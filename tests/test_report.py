"""The report's renderings from a hand-built Report: numbers, notes, figures, JSON schema."""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path

import pytest
from rich.console import Console

from netshrink.measure import Measurement
from netshrink.recipe import meter
from netshrink.report import print_report, write
from netshrink.report.plots import figures
from netshrink.report.record import (
    SCHEMA_VERSION,
    SUMMARY_FIELDS,
    Environment,
    LayerInfo,
    Report,
    StageRecord,
)
from netshrink.report.tables import STAGE_HEADERS, measured_on, plural, rate, stage_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def measured(size: int, latency: float, metric: float, params: int = 1000) -> Measurement:
    return Measurement(
        params=params,
        nonzero_params=params // 2,
        macs=params * 10,
        bytes=size,
        latency_ms=latency,
        latency_p90_ms=latency * 1.1,
        runtime="eager",
        threads=2,
        batch_size=32,
        runs=20,
        peak_memory_bytes=4096,
        metric=metric,
        metric_name="accuracy",
    )


def make_report(layers: list[LayerInfo]) -> Report:
    base = StageRecord(None, "baseline", "baseline", measured(40_000, 2.0, 0.98), 2.0)
    stages = [
        StageRecord(
            0,
            "prune.channels",
            "applied",
            measured(10_000, 1.0, 0.97),
            2.2,
            {"ratio": 0.5},
            seconds=3.5,
            layers=layers,
        ),
        StageRecord(
            1,
            "prune.magnitude",
            "rolled back",
            measured(5_000, 1.0, 0.80),
            2.1,
            guard_metric=0.8,
            note="metric fell 0.17 > max_drop 0.01: stage undone",
        ),
        StageRecord(2, "quantize.static", "skipped", None, note="skipped: an earlier guard"),
    ]
    env = Environment("Test CPU (x86_64, 2 cores)", "eager", 2, 20, {"torch": "2.13.0"})
    return Report(base, stages, {"version": 1, "stages": []}, 7, "accuracy", env)


LAYERS = [
    LayerInfo("conv1", "Conv2d", sparsity=0.0, bits=8),
    LayerInfo("fc", "Linear", sparsity=0.5, bits=32, rank=4),
]


def test_headline_uses_the_final_kept_stage() -> None:
    report = make_report(LAYERS)
    s = report.summary()
    assert report.final is report.stages[0]
    assert s["compression_rate"] == pytest.approx(4.0)
    assert s["speedup_rate"] == pytest.approx(2.2)  # the interleaved baseline of that stage
    assert (s["latency_ms_before"], s["latency_ms_after"]) == (2.2, 1.0)
    assert s["metric_drop"] == pytest.approx(0.01)


def test_headline_and_stage_table_agree_on_bytes_once_saved() -> None:
    report = make_report(LAYERS)
    final = report.final.measurement
    report.delivered_bytes = (40_100, final.bytes + 1_500)  # the manifest's provenance
    s = report.summary()
    assert (s["baseline_bytes"], s["compressed_bytes"]) == (40_000, final.bytes)
    row = dict(zip(STAGE_HEADERS, stage_rows(report)[1], strict=True))
    assert row["compression"] == rate(s["compression_rate"]) == "4x"
    assert s["artifact_bytes"] == final.bytes + 1_500
    assert "artifact on disk" in str(report)


def test_text_and_terminal_views_carry_numbers_notes_and_settings() -> None:
    report = make_report(LAYERS)
    text = str(report)
    assert "4x  (39.1 KiB -> 9.77 KiB)" in text and "0.9800 / 0.9700" in text
    assert "1 prune.magnitude: metric fell 0.17 > max_drop 0.01: stage undone" in text
    assert "Test CPU (x86_64, 2 cores), runtime eager, 2 threads, median of 20" in text
    console = Console(record=True, width=200)
    print_report(report, console)
    shown = console.export_text()
    assert "rolled back" in shown and "skipped" in shown and "2.2x" in shown
    assert "not shown here" not in shown  # 200 columns hold every column


def test_terminal_table_keeps_the_columns_that_fit_in_priority_order() -> None:
    report = make_report(LAYERS)
    console = Console(record=True, width=80)
    print_report(report, console)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    header = next(line for line in lines if line.startswith("stage "))
    assert header.split() == ["stage", "status", "compression", "speedup", "accuracy", "drop"]
    assert any(line.split()[:4] == ["1", "prune.magnitude", "rolled", "back"] for line in lines)
    assert "not shown here: bytes, latency ms, params, MACs, non-zero, seconds" in " ".join(lines)


def test_plural_follows_the_count() -> None:
    assert [plural(n, "thread") for n in (0, 1, 2)] == ["0 threads", "1 thread", "2 threads"]
    report = make_report(LAYERS)
    report.environment.threads = 1
    assert "runtime eager, 1 thread, median of 20 timed runs" in measured_on(report)


def test_figures_include_only_the_layer_plots_with_values() -> None:
    names = [f.name for f in figures(make_report(LAYERS))]
    assert names == [
        "metric-vs-size",
        "metric-vs-latency",
        "layer-sparsity",
        "layer-bits",
        "layer-rank",
    ]
    plain = [LayerInfo("fc", "Linear", sparsity=0.0, bits=32)]
    figs = figures(make_report(plain))
    assert [f.name for f in figs] == ["metric-vs-size", "metric-vs-latency"]
    assert all(f.png.startswith(PNG_MAGIC) for f in figs)
    assert all("2 threads" in f.caption and "runtime eager" in f.caption for f in figs)


def test_int8_rounding_zeros_and_uniform_bits_get_no_chart() -> None:
    int8 = [LayerInfo(f"l{i}", "QuantLinear", sparsity=0.002 * i, bits=8) for i in range(5)]
    assert [f.name for f in figures(make_report(int8))] == ["metric-vs-size", "metric-vs-latency"]
    uniform = [LayerInfo(f"l{i}", "SparseLinear", sparsity=0.5, bits=32) for i in range(3)]
    assert "layer-sparsity" not in [f.name for f in figures(make_report(uniform))]
    pruned = [*uniform, LayerInfo("head", "SparseLinear", sparsity=0.9, bits=32)]
    assert "layer-sparsity" in [f.name for f in figures(make_report(pruned))]


def test_html_shows_every_stage_against_the_baseline_and_each_caption_once(
    tmp_path: Path,
) -> None:
    report = make_report(LAYERS)
    page = write(report, tmp_path)["html"].read_text()
    glance = page.split('<table class="glance">')[1].split("</table>")[0]
    rows = glance.split("<tr>")[2:]  # after the header row
    assert len(rows) == 4
    assert "9.77 KiB, 4x" in rows[1] and "1 ms, 2.2x" in rows[1] and "-0.0100" in rows[1]
    assert 'style="width:25.0%"' in rows[1]  # 10 000 of the baseline's 40 000 bytes
    assert "1 prune.magnitude (rolled back)" in rows[2]
    assert "2 quantize.static (skipped)" in rows[3]
    for fig in figures(report):
        assert page.count(escape(fig.caption)) == 1


def test_written_files(tmp_path: Path) -> None:
    paths = write(make_report(LAYERS), tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert set(SUMMARY_FIELDS) <= set(data["summary"])
    statuses = [s["status"] for s in data["stages"]]
    assert statuses == ["baseline", "applied", "rolled back", "skipped"]
    assert data["stages"][1]["measurement"]["latency_ms"] == 1.0
    assert data["stages"][1]["speedup"] == pytest.approx(2.2)
    page = paths["html"].read_text()
    images = page.split('src="data:image/png;base64,')[1:]
    assert len(images) == 5
    assert base64.b64decode(images[0].split('"')[0]).startswith(PNG_MAGIC)
    assert "<script" not in page and "http" not in page
    assert "stage undone" in page and "fraction of weights that are zero" in page
    md = paths["md"].read_text()
    for name in ("metric-vs-size", "layer-bits"):
        assert f"](plots/{name}.png)" in md and (tmp_path / "plots" / f"{name}.png").is_file()
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_labels_of_close_points_do_not_overlap() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    from netshrink.report.plots import _label_points

    fig = MplFigure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    points = [(58.1, 0.9888, "baseline"), (12.3, 0.9926, "1 prune.channels")]
    points += [(1.42, 0.9926, "2 quantize.static"), (7.7, 0.9926, "0 distill.kd")]
    ax.scatter([p[0] for p in points], [p[1] for p in points])
    ax.set_xlim(-5, 65)
    _label_points(fig, ax, points)
    renderer = FigureCanvasAgg(fig).get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == 4
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


@pytest.mark.parametrize("saturating", [True, False])
def test_machine_says_when_int8_kernels_lack_vnni(
    monkeypatch: pytest.MonkeyPatch, saturating: bool
) -> None:
    # An int8 model slower than fp32 on an AVX2-only CPU is explained by the "measured on" line.
    monkeypatch.setattr(meter, "SATURATING_INT8", saturating)
    described = meter.machine()
    assert described.endswith("cores, int8 without VNNI)" if saturating else "cores)")
