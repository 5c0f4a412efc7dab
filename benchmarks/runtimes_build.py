"""What every runtimes.py variant builder shares: the setup, the built variant, and cached ONNX
and OpenVINO exports with the runners that time them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from minilm import SentenceEncoder
from netshrink.artifact import artifact_bytes, save
from netshrink.artifact.onnx import export_onnx
from netshrink.runtime import OpenVinoRunner, OrtRunner, save_ir
from runtimes_kernels import ort_integer_nodes
from runtimes_text import Embed


@dataclass
class Built:
    """A variant ready to run: its embedding function, artifact bytes, executed primitives."""

    embed: Embed
    bytes: int
    primitives: dict[str, int] | None = None
    precision: str = ""


@dataclass
class Setup:
    """What every builder shares: the fp32 encoder, calibration batches, a work folder."""

    fp32: SentenceEncoder
    calib: list[tuple[torch.Tensor, torch.Tensor]]
    work: Path
    threads: int
    calib_longest: list[tuple[torch.Tensor, torch.Tensor]]
    """128 calibration sentences in batches of 8, each padded to its longest sentence."""

    @property
    def example(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.calib[0]


def folder_bytes(*paths: Path) -> int:
    return sum(p.stat().st_size for p in paths)


def netshrink_bytes(model: torch.nn.Module, work: Path, name: str) -> int:
    return artifact_bytes(save(model, work / name))


def cached_onnx(setup: Setup, name: str, make: Callable[[], torch.nn.Module]) -> Path:
    """netshrink's ONNX export of ``make()`` at ``work/name.onnx``, reused when it exists."""
    path = setup.work / f"{name}.onnx"
    if not path.exists():
        export_onnx(make(), path, setup.example)
    return path


def ort_variant(path: Path, setup: Setup) -> Built:
    runner = OrtRunner(path, threads=setup.threads)
    nodes = ort_integer_nodes(path)
    return Built(lambda i, m: runner((i, m)), folder_bytes(path), nodes)


def cached_ir(setup: Setup, name: str, make: Callable[[], object]) -> Path:
    """OpenVINO IR of ``make()`` (a module, or an ONNX file) at ``work/name.xml``, reused."""
    xml = setup.work / f"{name}.xml"
    if not xml.exists():
        save_ir(make(), xml, setup.example)  # type: ignore[arg-type]
    return xml


def ov_variant(xml: Path, setup: Setup, precision: str = "default") -> Built:
    """OpenVINO on an IR; bytes are the IR it deploys as (.xml + .bin)."""
    runner = OpenVinoRunner(xml, threads=setup.threads, precision=precision)  # type: ignore[arg-type]
    size = folder_bytes(xml, xml.with_suffix(".bin"))
    return Built(lambda i, m: runner((i, m)), size, runner.primitives(), runner.precision)
