"""Every zoo model exports to ONNX and runs in ONNX Runtime like in torch, at any batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from netshrink import zoo
from netshrink.artifact.onnx import export_onnx
from netshrink.runtime import OrtRunner


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_model_exports_and_matches_torch(name: str, tmp_path: Path) -> None:
    # Same architecture at a quarter width: export needs neither trained nor full-size weights.
    model = zoo.build(name, width=0.25).eval()
    path = export_onnx(model, tmp_path / f"{name}.onnx", zoo.example_inputs(name, 1))
    x = zoo.example_inputs(name, 5)
    with torch.no_grad():
        expected = model(*x).numpy()
    np.testing.assert_allclose(OrtRunner(path, threads=1)(x), expected, atol=1e-4, rtol=0)
