"""Compressed layers inside models nobody here wrote.

Parents that read ``child.weight`` (nn.MultiheadAttention, nn.TransformerEncoderLayer's fast
path, Hugging Face ViT and T5) keep working after any technique replaced the child; GPT-2's
``Conv1D`` is compressed as the Linear it is; tied weights stay stored once; layer types with
no compressed version are named in a warning.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink.artifact.store import artifact_bytes
from netshrink.errors import UnsupportedModuleError
from netshrink.layers import CompressedLayer, tied_modules
from netshrink.measure import count_params, count_stored_bits

transformers = pytest.importorskip("transformers")

CALIB = "calib"
TECHNIQUES: dict[str, tuple[Any, dict[str, Any]]] = {
    "weight_only": (ns.quantize.weight_only, {"bits": 8}),
    "weight_only-int4": (ns.quantize.weight_only, {"bits": 4, "group_size": 8}),
    "dynamic": (ns.quantize.dynamic, {}),
    "half": (ns.quantize.half, {}),
    "static": (ns.quantize.static, {CALIB: True}),
    "magnitude": (ns.prune.magnitude, {"sparsity": 0.5, "kernel": "dense"}),
    "lowrank": (ns.lowrank.svd, {"ratio": 0.5}),
    "lowrank-joint": (
        ns.lowrank.svd,
        {"budget": 0.5, "activation_aware": True, "joint": [["query", "key"]], CALIB: True},
    ),
}


def _apply(name: str, model: nn.Module, x: Any) -> nn.Module:
    fn, options = TECHNIQUES[name]
    options = dict(options)
    if options.pop(CALIB, False):
        options["calib_data"] = [(x, None)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied-layer and untraceable-model notices
        return fn(model, **options)


def _out(model: nn.Module, x: Any, inference: bool = False) -> torch.Tensor:
    """The first output, without gradients, or under ``torch.inference_mode`` as netshrink's
    eager runner and memory meter call a model (tensors made there have no version counter)."""
    with torch.inference_mode() if inference else torch.no_grad():
        y = model(x)
    return y if torch.is_tensor(y) else y[0]


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but ..."
        return nn.TransformerEncoder(layer, 2).eval()


def _vit() -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        image_size=8, patch_size=4, num_channels=3,
    )  # fmt: skip
    return transformers.ViTModel(config, add_pooling_layer=False).eval()


def _t5() -> nn.Module:
    config = transformers.T5Config(
        vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2
    )
    return transformers.T5EncoderModel(config).eval()


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


MODELS = {
    "transformer-encoder": (_encoder, lambda: torch.randn(2, 5, 16)),
    "hf-vit": (_vit, lambda: torch.randn(2, 3, 8, 8)),
    "hf-t5": (_t5, lambda: torch.randint(0, 40, (2, 6))),
}


@pytest.mark.parametrize("technique", list(TECHNIQUES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_parents_that_read_child_weights_keep_working(model_name: str, technique: str) -> None:
    build, inputs = MODELS[model_name]
    torch.manual_seed(0)
    model, x = build(), inputs()
    if (model_name, technique) == ("transformer-encoder", "half"):
        # its fast path would run float16 weights on float32 activations: every layer is left
        # alone, and a stage that changed nothing is refused, naming why
        with pytest.raises(UnsupportedModuleError, match=r"changed nothing.*fast path"):
            ns.quantize.half(model)
        return
    out = _apply(technique, model, x)
    assert any(isinstance(m, CompressedLayer) for m in out.modules())
    assert _out(out, x).shape == _out(model, x).shape
    torch.testing.assert_close(_out(out, x, inference=True), _out(out, x), rtol=0, atol=0)


def _conv1d_names(model: nn.Module) -> list[str]:
    conv1d = transformers.pytorch_utils.Conv1D
    return [n for n, m in model.named_modules() if isinstance(m, conv1d)]


@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_gpt2_conv1d_is_compressed_as_linear_and_tied_weights_stay_tied(
    technique: str, tmp_path
) -> None:
    torch.manual_seed(0)
    model, x = _gpt2(), torch.randint(0, 40, (2, 6))
    before = _conv1d_names(model)
    assert {"lm_head", "transformer.wte"} <= tied_modules(model)
    out = _apply(technique, model, x)
    assert not _conv1d_names(out)
    assert all(isinstance(out.get_submodule(n), CompressedLayer) for n in before)
    assert out.lm_head.weight is out.transformer.wte.weight  # still one tensor
    torch.testing.assert_close(_out(out, x), _out(model, x), atol=0.5, rtol=0)
    ns.save(model, tmp_path / "base")
    ns.save(out, tmp_path / "out")
    assert artifact_bytes(tmp_path / "out") < artifact_bytes(tmp_path / "base")
    back = ns.load(tmp_path / "out", model=_gpt2())
    assert torch.equal(_out(back, x), _out(out, x))
    if not technique.startswith("lowrank"):  # factorized layers hold fewer parameters
        assert count_params(out) == count_params(model)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def _autoencoder() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ConvTranspose2d(4, 3, 3))


def test_weight_only_packs_a_transposed_convolution(tmp_path) -> None:
    torch.manual_seed(0)
    decoder = _autoencoder()
    x = torch.randn(2, 3, 6, 6)
    out = ns.quantize.weight_only(decoder)
    assert isinstance(out[2], CompressedLayer) and out[2].weight.shape == decoder[2].weight.shape
    torch.testing.assert_close(out(x), decoder(x), atol=0.05, rtol=0)
    ns.save(out, tmp_path / "a")
    back = ns.load(tmp_path / "a", model=_autoencoder())
    assert torch.equal(back(x), out(x))


@pytest.mark.parametrize(
    ("technique", "options"),
    [(ns.quantize.weight_only, {}), (ns.quantize.weight_only, {"bits": 4, "group_size": 4}),
     (ns.quantize.dynamic, {})],
)  # fmt: skip
def test_recurrent_layers_are_packed(technique: Any, options: dict, tmp_path) -> None:
    torch.manual_seed(0)
    model, x = _Recurrent().eval(), torch.randn(2, 4, 8)
    out = technique(model, **options)
    assert isinstance(out.lstm, CompressedLayer)
    assert out.lstm.weight_hh_l0.shape == model.lstm.weight_hh_l0.shape  # original names read
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), atol=0.02, rtol=0)
    assert count_params(out) == count_params(model)
    assert count_stored_bits(out) < count_stored_bits(model)
    ns.save(out, tmp_path / "a")
    back = ns.load(tmp_path / "a", model=_Recurrent())
    with torch.no_grad():
        assert torch.equal(back(x), out(x))


def test_layers_without_a_compressed_version_are_named_in_a_warning() -> None:
    x = torch.randn(2, 4, 8)
    with pytest.warns(UserWarning, match=r"leaves lstm \(LSTM\) as they are"):
        ns.quantize.static(_Recurrent(), calib_data=[(x, None)])
    with pytest.warns(UserWarning, match=r"leaves 2 \(ConvTranspose2d\) as they are"):
        ns.quantize.static(_autoencoder(), calib_data=[(torch.randn(2, 3, 6, 6), None)])


@pytest.mark.parametrize(
    ("technique", "options", "kind"),
    [
        (ns.quantize.weight_only, {}, "PackedEmbedding"),
        (ns.quantize.half, {}, "HalfEmbedding"),
        (ns.quantize.static, {"calib_data": [(torch.tensor([[1, 2, 3]]), None)]}, "Int8Embedding"),
    ],
)
def test_embeddings_are_quantized_by_default(technique: Any, options: dict, kind: str) -> None:
    model = nn.Sequential(nn.Embedding(30, 16), nn.Linear(16, 4))
    out = technique(model, **options)
    assert type(out[0]).__name__ == kind
    off = technique(model, embeddings=False, **options)
    assert type(off[0]) is nn.Embedding
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(out(ids), model(ids), atol=0.05, rtol=0)
