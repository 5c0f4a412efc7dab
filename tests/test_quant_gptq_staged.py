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


@pytest.mark.parametrize("reference", [False, True])
def test_asymmetric_target_solves_the_damped_system_and_leaves_the_gram_sum_as_it_was(
    reference: bool,
) -> None:
    from netshrink.calibrate.staged import Paired, asymmetric_target

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 12, generator=gen)
    x[:, 5] = 0  # an input never active: its curvature counts as 1, as the solvers treat it
    ref = x + 0.2 * torch.randn(200, 12, generator=gen)
    stats = Paired()
    stats.add(x, ref if reference else None)
    assert stats.gram is not None
    gram = stats.gram.clone()
    cross = None if stats.cross is None else stats.cross.clone()
    w = torch.randn(4, 12, generator=gen)
    target = asymmetric_target(w, stats, 0.1)
    # the float32 sums' system, solved in float64: the target is its float32 solution
    h, c = gram.double(), (gram if cross is None else cross).double()
    curvature = torch.where(h.diagonal() == 0, 1.0, h.diagonal())
    ridge = 0.1 * float(curvature.mean())
    h.diagonal().copy_(curvature + ridge)
    c.diagonal().add_(ridge)
    assert target.dtype == torch.float32
    torch.testing.assert_close(target, torch.linalg.solve(h, c @ w.double().T).T.float())
    assert torch.equal(stats.gram, gram)
    assert stats.cross is None  # used up


@pytest.mark.parametrize("staged", [{}, {"true_sequential": True, "asymmetric": True}])
def test_replaced_layers_are_freed_while_later_blocks_are_calibrated(monkeypatch, staged) -> None:
    """The working copy shrinks as blocks are quantized: no reference to a replaced float layer
    survives (neither in the technique nor in the stack of running modules that forwards
    stopped early leave behind)."""
    import gc
    import sys
    import weakref

    gptq = sys.modules["netshrink.quantize.gptq"]
    replaced: list[weakref.ref[nn.Module]] = []
    alive: list[int] = []
    quantize_seen, replace = gptq._quantize_seen, gptq.replace_module

    def record(model: nn.Module, name: str, new: nn.Module) -> None:
        replaced.append(weakref.ref(model.get_submodule(name)))
        replace(model, name, new)

    def count_then_quantize(*args) -> None:
        gc.collect()
        alive.append(sum(ref() is not None for ref in replaced))
        quantize_seen(*args)

    monkeypatch.setattr(gptq, "replace_module", record)
    monkeypatch.setattr(gptq, "_quantize_seen", count_then_quantize)
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    ns.quantize.gptq(Stack().eval(), calib_data=[(x, None)], bits=4, group_size=0,
                     sequential=True, **staged)  # fmt: skip
    assert len(replaced) == 8 and len(alive) >= 4
    assert alive == [0] * len(alive)
