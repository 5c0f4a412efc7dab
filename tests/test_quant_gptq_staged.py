"""quantize.gptq on the staged engine: true-sequential stages and GPTAQ's full-precision
targets (``asymmetric``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink.errors import ConfigError
from netshrink.quantize.packed import PackedLinear
from test_calibrate import tiny_bert


class Residual(nn.Module):
    """x + W2 tanh(W1 x): one block of :func:`stack`."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Stack(nn.Module):
    """Four residual blocks in a ModuleList (the sequential engine's default blocks)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Residual(width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _output_error(model: nn.Module, quantized: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = model(x)
        return float((quantized(x) - ref).norm() / ref.norm())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_precision_targets_lower_the_model_output_error(seed: int) -> None:
    torch.manual_seed(seed)
    model = Stack().eval()
    x = torch.randn(512, 32) * torch.linspace(0.2, 3, 32)  # inputs of unequal sizes
    options = {"bits": 3, "group_size": 0, "sequential": True, "true_sequential": True}
    calib = [(x, None)]
    plain = ns.quantize.gptq(model, calib_data=calib, **options)
    gptaq = ns.quantize.gptq(model, calib_data=calib, asymmetric=True, **options)
    assert all(isinstance(m, PackedLinear) for m in (gptaq.blocks[3].fc1, gptaq.blocks[3].fc2))
    err_plain, err_gptaq = _output_error(model, plain, x), _output_error(model, gptaq, x)
    assert err_gptaq < 0.9 * err_plain, (err_gptaq, err_plain)


@pytest.mark.parametrize("asymmetric", [False, True])
def test_staged_bert_quantizes_every_block_layer(asymmetric: bool) -> None:
    model, calib = tiny_bert()
    out = ns.quantize.gptq(
        model, bits=4, group_size=8, symmetric=False, awq=True, calib_data=calib,
        sequential=True, true_sequential=True, asymmetric=asymmetric,
    )  # fmt: skip
    layers = {n for n, m in out.named_modules() if isinstance(m, PackedLinear)}
    assert len(layers) == 3 * 6 + 1  # q, k, v, attention output, intermediate, output; pooler
    with torch.no_grad():
        x = calib[0][0]
        cos = nn.functional.cosine_similarity(
            out(**x).last_hidden_state, model(**x).last_hidden_state, dim=-1
        )
    assert float(cos.min()) > 0.9


@pytest.mark.parametrize("options", [{"true_sequential": True}, {"asymmetric": True}])
def test_staged_options_without_sequential_are_config_errors(options: dict) -> None:
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    with pytest.raises(ConfigError, match="sequential"):
        ns.quantize.gptq(model, calib_data=[(torch.randn(4, 8), None)], **options)
