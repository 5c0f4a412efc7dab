"""``quantize.qat``: quantization-aware training, then conversion exactly like quantize.static.

The model is prepared like static PTQ (BatchNorm folded, activations calibrated and their
scales frozen, on ``activation_bits`` unsigned codes), then each conv/linear trains with
fake-quantized weights whose per-channel scales are learned: Learned Step Size Quantization
(Esser et al. 2020, "Learned Step Size Quantization", Sec. 2) with the straight-through
estimator for rounding. Activation scales stay frozen because a ReLU's output range and the
next layer's input range describe one tensor: learning one of them apart from the other
would quantize that tensor twice on different grids (measured: worse 3-bit QAT). The project's
optimizer is AdamW, whose per-parameter normalization makes LSQ's gradient scaling (Sec. 2.2)
moot and would move a raw step size by ``lr`` per update; the step size is therefore learned
in log space, so each update changes it by a bounded relative amount. Training runs through
:func:`netshrink.train.finetune` (validation on ``val_data`` after each epoch, best weights
kept); the learned scales become the integer layers' weight scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from netshrink.batches import materialize
from netshrink.config import TechniqueConfig, TrainConfig
from netshrink.context import Context
from netshrink.layers import ConvGeometry, linearize, replace_module
from netshrink.quantize.affine import qrange, round_ste
from netshrink.quantize.layers import fake_quant
from netshrink.quantize.observers import ObserverName
from netshrink.quantize.ptq import (
    QUANT_LAYERS,
    BitsOverride,
    convert,
    fold_batchnorms,
    observe_ranges,
    quantize_relus,
    weight_bits,
)
from netshrink.registry import technique
from netshrink.targets import Targets
from netshrink.train import finetune

QParams = tuple[torch.Tensor, torch.Tensor]


class LSQLayer(nn.Module):
    """Training-time wrapper: frozen input/output fake quantization, LSQ weight quantization."""

    def __init__(
        self,
        inner: nn.Conv2d | nn.Linear,
        bits: int,
        inp: QParams,
        out: QParams | None,
        act_bits: int = 8,
        per_channel: bool = True,
    ) -> None:
        super().__init__()
        self.inner, self.bits = inner, bits
        self.qmin, self.qmax = qrange(bits, True)
        self.act_qmax = 2**act_bits - 1
        w = inner.weight.detach()
        rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
        init = rows.abs().amax(1).clamp_min(1e-8) / self.qmax
        self.log_scale = nn.Parameter(init.reshape(-1, *([1] * (w.dim() - 1))).log())
        self.register_buffer("in_scale", inp[0].clone())
        self.register_buffer("in_zp", inp[1].clone())
        self.out = None if out is None else (out[0].clone(), out[1].clone())

    def quantized_weight(self) -> torch.Tensor:
        """Fake-quantized weight; gradients reach both the weight and the scale (LSQ eq. 3)."""
        s = self.log_scale.exp()
        return round_ste(torch.clamp(self.inner.weight / s, self.qmin, self.qmax)) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantized-in, quantized-weight, (quantized-out) forward pass."""
        x = fake_quant(x, self.in_scale, self.in_zp, qmax=self.act_qmax)
        w, b = self.quantized_weight(), self.inner.bias
        if isinstance(self.inner, nn.Conv2d):
            y = ConvGeometry.of(self.inner).conv2d(x, w, b)
        else:
            y = F.linear(x, w, b)
        return y if self.out is None else fake_quant(y, *self.out, qmax=self.act_qmax)


class QATConfig(TechniqueConfig, TrainConfig):
    """Options of ``quantize.qat``, the training options of
    :class:`~netshrink.config.TrainConfig` (``epochs``, ``lr``, ``optimizer``, ...) among them."""

    bits: int = Field(8, ge=2, le=8, description="weight bits during training and after")
    activation_bits: int = Field(
        8, ge=2, le=8, description="activation bits (unsigned); below 8 exact but no faster"
    )
    epochs: int = Field(3, ge=0, le=1000, description="training passes over train_data")
    # 3e-4: the rate the validation split chose most often in benchmarks/quantize.py --part qat;
    # 1e-3 overshoots when fine-tuning a trained network for a few epochs
    lr: float = Field(3e-4, gt=0, le=1, description="learning rate of weights and scales")
    per_channel: bool = Field(True, description="one weight scale per output channel")
    observer: ObserverName = Field("minmax", description="how activation ranges are chosen")
    calib_batches: int = Field(32, ge=1, le=100000, description="calibration batches used at most")
    targets: Targets = Field(default_factory=Targets, description="Conv2d/Linear to quantize")
    overrides: tuple[BitsOverride, ...] = Field(
        (), description="per-module weight bits, e.g. keep the first conv and classifier at 8"
    )


@technique("quantize.qat", QATConfig, needs=("train_data",), creates=QUANT_LAYERS)
def qat(model: nn.Module, config: QATConfig, ctx: Context) -> nn.Module:
    """Quantization-aware training (LSQ weight scales, STE), converted like quantize.static."""
    bits = weight_bits(model, config, config.bits)
    linearize(model, bits)
    model.eval()
    calib = materialize(ctx.calib_data or ctx.train_data or [], "calib_data")
    feeds_add = fold_batchnorms(model, bits)
    act_bits = config.activation_bits
    batches = calib[: config.calib_batches]
    qparams = observe_ranges(model, bits, feeds_add, batches, config.observer, ctx, act_bits)
    for name, b in bits.items():
        inner = model.get_submodule(name)
        out = qparams.get(f"{name}:out")
        inp = qparams[f"{name}:in"]
        layer = LSQLayer(inner, b, inp, out, act_bits, config.per_channel)  # type: ignore[arg-type]
        replace_module(model, name, layer)
    quantize_relus(model, qparams, act_bits)
    # The same training as a stage's ``finetune``: an hf model distils from the uncompressed
    # one, and with ``val_data`` each epoch is validated and the best weights (the calibrated
    # starting scales included) are kept.
    finetune(model, config, ctx, "quantize.qat")
    scales = {}
    for name in bits:
        layer = model.get_submodule(name)
        assert isinstance(layer, LSQLayer)
        scales[name] = layer.log_scale.detach().exp().reshape(-1)  # per channel or one
        replace_module(model, name, layer.inner)
    return convert(model.eval(), bits, qparams, True, scales, act_bits)
