"""``export --hf``: pruned transformers written as folders transformers ``from_pretrained`` loads
with the pruned shapes and identical outputs (tiny random-init models)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from typer.testing import CliRunner

import hf_fixtures
import netshrink as ns
from netshrink import hf
from netshrink.cli import app
from netshrink.errors import ConfigError, InputError
from netshrink.hf.export import export_hf
from netshrink.layers import edits
from test_prune_heads import build, output

torch.set_num_threads(1)


def per_layer(model: nn.Module, x: dict) -> nn.Module:
    """Heads and FFN neurons pruned globally: layers end with different sizes."""
    first = hf.blocks.find_ffn(model)[0]
    with torch.no_grad():  # 3/4 of layer 0's neurons weak: the global ranking takes them
        hf.blocks.slot_weight(model, first.down)[: 3 * first.size // 4] *= 0.01
    pruned = ns.prune.heads(model, ratio=0.5, scope="global", example_inputs=x)
    return ns.prune.ffn(pruned, ratio=0.5, scope="global", example_inputs=x)


AUTO = {"DistilBertForMaskedLM": "AutoModelForMaskedLM", "GPT2LMHeadModel": "AutoModelForCausalLM"}


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "t5-encoder", "vit", "llama-gqa"])
def test_per_layer_sizes_load_with_generated_code(name: str, tmp_path: Path) -> None:
    model, x = build(name)
    pruned = per_layer(model, x)
    sizes = {f.size for f in hf.blocks.find_ffn(pruned)}
    assert len(sizes) == 2  # not expressible by a stock config
    result = export_hf(pruned, tmp_path / "out")
    assert result.remote_code
    code = next((tmp_path / "out").glob("modeling_netshrink_*.py")).read_text()
    assert "netshrink" not in "".join(line for line in code.splitlines() if "import" in line)
    auto = getattr(transformers, AUTO.get(type(model).__name__, "AutoModel"))
    loaded = auto.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert [f.size for f in hf.blocks.find_ffn(loaded)] == [
        f.size for f in hf.blocks.find_ffn(pruned)
    ]
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, x), output(pruned, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5-encoder"])
def test_uniform_sizes_make_a_stock_folder(name: str, tmp_path: Path) -> None:
    model, x = build(name)
    pruned = ns.prune.ffn(model, ratio=0.5, example_inputs=x)
    if name == "t5-encoder":  # T5 keeps the same heads in every block and stores d_kv apart
        pruned = ns.prune.heads(pruned, ratio=0.5, example_inputs=x)
    result = export_hf(pruned, tmp_path / "out")
    assert not result.remote_code
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in config
    loaded = type(model).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, x), output(pruned, x), atol=1e-6, rtol=0)
    if name == "t5-encoder":
        assert config["num_heads"] == 1


def _stand_in_drop_layers(model: nn.Module, args: dict[str, Any]) -> None:
    """Stand-in for the ``hf.drop_layers`` edit of the depth work (same contract): keep the
    listed layers of the ModuleList ``args["module"]``."""
    parent, _, name = args["module"].rpartition(".")
    layers = model.get_submodule(args["module"])
    setattr(model.get_submodule(parent), name, nn.ModuleList(layers[i] for i in args["keep"]))


def test_dropped_layers_set_the_layer_count(tmp_path: Path) -> None:
    with contextlib.suppress(ValueError):  # the real edit is registered: test against it
        edits.edit_kind("hf.drop_layers")(_stand_in_drop_layers)
    folder = hf_fixtures.model_dir(tmp_path / "bert", "bert")
    model = hf.load_model(f"hf:{folder}")
    edits.apply_edit(model, "hf.drop_layers", module="model.encoder.layer", keep=[1])
    pruned = ns.prune.ffn(model, ratio=0.25)
    result = export_hf(pruned, tmp_path / "out")
    assert not result.remote_code and "num_hidden_layers=1" in result.changes
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (1, 48)
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    x = hf_fixtures.encode(hf.load_tokenizer(f"hf:{folder}"))
    with torch.no_grad():
        expected = pruned.model(**x).last_hidden_state
        torch.testing.assert_close(loaded(**x).last_hidden_state, expected, atol=1e-6, rtol=0)


def test_cli_export_hf_keeps_tokenizer_and_sentence_transformers_files(tmp_path: Path) -> None:
    folder = hf_fixtures.sentence_transformers_dir(
        tmp_path / "st", {"mean_tokens": True}, normalize=True
    )
    model = hf.load_model(f"hf:{folder}")
    pruned = ns.prune.heads(model, ratio=0.5, scope="global")
    ns.save(pruned, tmp_path / "artifact")
    result = CliRunner().invoke(
        app, ["export", str(tmp_path / "artifact"), "--hf", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert "trust_remote_code=True" in result.output
    out = tmp_path / "out"
    assert {"vocab.txt", "modules.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert (out / "1_Pooling" / "config.json").is_file()
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    embedded = st.encode(hf_fixtures.TEXTS, convert_to_tensor=True)
    tokens = hf_fixtures.encode(hf.load_tokenizer(f"hf:{folder}"))
    with torch.no_grad():
        torch.testing.assert_close(embedded, pruned(**tokens), atol=1e-5, rtol=0)


def test_export_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    model, _ = build("bert")
    with pytest.raises(ConfigError, match="float"):
        export_hf(ns.quantize.dynamic(model), tmp_path / "q")
    with pytest.raises(ConfigError, match="transformers model"):
        export_hf(nn.Sequential(nn.Linear(2, 2)), tmp_path / "s")
    with pytest.raises(ConfigError, match="T5EncoderModel"):
        export_hf(build("t5-encoder")[0].encoder, tmp_path / "t5")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    with pytest.raises(InputError):
        export_hf(model, tmp_path / "full")
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me"
