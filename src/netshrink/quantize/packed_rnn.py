"""Recurrent layers (LSTM, GRU, RNN) whose weight matrices are stored as low-bit codes.

Each weight matrix (``weight_ih_l0``, ``weight_hh_l0``, ...) is held by a
:class:`~netshrink.quantize.packed.PackedLinear` (int8 or packed int4 codes, one scale per row
or per group); biases stay float. The forward decodes the matrices and runs torch's own
recurrent kernel on them, through a weightless template of the original layer on the ``meta``
device. Storage shrinks, the recurrence still runs in float: torch has no integer recurrent
kernel on CPU that an artifact could rebuild.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netshrink.layers import CompressedLayer
from netshrink.quantize.packed import Codec, PackedLinear

_TYPES: dict[str, type[nn.RNNBase]] = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}


def packable(module: nn.Module) -> bool:
    """True for a plain nn.LSTM, nn.GRU or nn.RNN (a subclass may have its own forward)."""
    return type(module) in _TYPES.values()


def input_widths(rnn: nn.RNNBase) -> list[int]:
    """Columns of each weight matrix of ``rnn``: a group size must divide all of them."""
    return [p.shape[1] for n, p in rnn.named_parameters() if n.startswith("weight")]


def _rnn_args(rnn: nn.RNNBase) -> dict[str, Any]:
    """Constructor arguments of ``rnn`` (an nn.LSTM, nn.GRU or nn.RNN)."""
    args = {
        "input_size": rnn.input_size,
        "hidden_size": rnn.hidden_size,
        "num_layers": rnn.num_layers,
        "bias": rnn.bias,
        "batch_first": rnn.batch_first,
        "dropout": rnn.dropout,
        "bidirectional": rnn.bidirectional,
    }
    if isinstance(rnn, nn.LSTM):
        args["proj_size"] = rnn.proj_size
    if type(rnn) is nn.RNN:
        args["nonlinearity"] = rnn.nonlinearity
    return args


class PackedRNN(CompressedLayer):
    """An LSTM/GRU/RNN with int8 or packed int4 weight matrices (decoded on the fly).

    The original's parameter names (``weight_ih_l0``, ...) still read as float tensors, so code
    that reads them keeps working.
    """

    def __init__(self, kind: str, rnn: dict[str, Any], codec: Codec, group_size: int) -> None:
        super().__init__()
        if kind not in _TYPES:
            raise ValueError(f"kind must be one of {', '.join(_TYPES)}, got {kind!r}")
        self.kind, self.rnn, self.codec, self.group_size = kind, dict(rnn), codec, group_size
        # a list, so that the template is not a submodule: it holds no tensors worth moving
        self._template = [_TYPES[kind](**rnn, device="meta")]
        self.matrices = nn.ModuleDict()
        for name, p in self._template[0].named_parameters():
            if name.startswith("weight"):
                rows, cols = p.shape
                self.matrices[name] = PackedLinear(cols, rows, codec, group_size, False)
            else:
                self.register_parameter(name, nn.Parameter(torch.zeros(p.shape)))

    @classmethod
    @torch.no_grad()
    def from_float(cls, rnn: nn.RNNBase, codec: Codec, group_size: int = 0) -> PackedRNN:
        """Encode the weight matrices of ``rnn`` (``group_size`` 0 or dividing every
        :func:`input_widths`); copy its biases."""
        if not packable(rnn):
            raise TypeError(f"{type(rnn).__name__} is not an nn.LSTM, nn.GRU or nn.RNN")
        new = cls(type(rnn).__name__, _rnn_args(rnn), codec, group_size)
        for name, p in rnn.named_parameters():
            if name.startswith("weight"):
                new.matrices[name].fill(p, None)
            else:
                getattr(new, name).copy_(p)
        return new.to(next(rnn.parameters()).device)

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments."""
        return {
            "kind": self.kind,
            "rnn": self.rnn,
            "codec": self.codec,
            "group_size": self.group_size,
        }

    def __getattr__(self, name: str) -> Any:
        matrices = self.__dict__.get("_modules", {}).get("matrices")
        if matrices is not None and name in matrices:
            return matrices[name].weight
        return super().__getattr__(name)

    def _float_tensors(self) -> list[torch.Tensor]:
        return list(self._weights().values())

    def _weights(self) -> dict[str, torch.Tensor]:
        """Every parameter of the original layer by name, weight matrices decoded."""
        out = {name: m.weight for name, m in self.matrices.items()}
        return {**out, **dict(self.named_parameters(recurse=False))}

    def weight_bits(self) -> int:
        """Bits of one weight code."""
        return next(iter(self.matrices.values())).weight_bits()

    def forward(self, *args: Any) -> Any:
        """The recurrent layer's forward, on the decoded weights."""
        return torch.func.functional_call(self._template[0], self._weights(), args)

    def extra_repr(self) -> str:
        return f"{self.kind}({self.rnn}), codec={self.codec}"
