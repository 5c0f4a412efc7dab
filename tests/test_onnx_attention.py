"""ONNX export of Hugging Face attention: traced with transformers' eager attention, so the graph
has no IsNaN/Where guard after each softmax (torch's SDPA decomposition) and OpenVINO can fuse
it; outputs equal the model's own (SDPA) attention, and the model keeps its implementation."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
import transformers

import hf_fixtures
from netshrink import hf
from netshrink.artifact.onnx import _eager_attention, export_onnx
from netshrink.runtime import OpenVinoRunner, OrtRunner

ATOL = 1e-5
"""Largest |difference| from the eager-mode model (SDPA attention) accepted, on unit-norm
embeddings and on logits of a random-init model (seen: 2e-7 and 1e-6): the same float math in
another order."""


def inputs(folder: Path) -> dict[str, torch.Tensor]:
    """The fixture texts padded on the right to 24 tokens: every text has padding, and every
    query row sees at least one real token."""
    tok = hf.load_tokenizer(f"hf:{folder}")
    enc = tok(hf_fixtures.TEXTS, padding="max_length", max_length=24, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_export_traces_eager_attention_and_matches_sdpa(kind: str, tmp_path: Path) -> None:
    model = hf.load_model(f"hf:{hf_fixtures.model_dir(tmp_path / kind, kind)}")
    assert model.model.config._attn_implementation == "sdpa"
    x = inputs(tmp_path / kind)
    assert (x["attention_mask"] == 0).any()
    with torch.no_grad():
        expected = model(**x)
    path = export_onnx(model, tmp_path / "model.onnx", x)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Softmax" in ops and "IsNaN" not in ops
    assert model.model.config._attn_implementation == "sdpa"  # put back
    for runner in (OrtRunner(path, threads=1), OpenVinoRunner(path, threads=1, precision="f32")):
        torch.testing.assert_close(runner(x), expected, atol=ATOL, rtol=0)


def test_attention_is_put_back_when_the_export_fails(tmp_path: Path) -> None:
    model = hf.load_model(f"hf:{hf_fixtures.model_dir(tmp_path / 'bert', 'bert')}")
    with pytest.raises(Exception, match="ONNX export"):
        export_onnx(model, tmp_path / "model.onnx", {"input_ids": torch.zeros(2, 3, 4)})
    assert model.model.config._attn_implementation == "sdpa"


def test_a_composite_model_gets_each_sub_models_attention_back() -> None:
    # CLIP's text and vision towers may use different implementations; putting the top level's
    # name back would set both to it
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 100, "max_position_embeddings": 16}  # fmt: skip
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 8, "patch_size": 4}  # fmt: skip
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    model = transformers.CLIPModel(config).eval()
    model.set_attn_implementation({"": "sdpa", "text_config": "sdpa", "vision_config": "eager"})

    def implementations() -> tuple[str, str]:
        return (
            model.config.text_config._attn_implementation,
            model.config.vision_config._attn_implementation,
        )

    with _eager_attention(model):
        assert implementations() == ("eager", "eager")
    assert implementations() == ("sdpa", "eager")
