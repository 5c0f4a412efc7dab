"""Int8 attention for ``quantize.static``: static int8 ranges on the outputs of self-attention's
query and key projections.

Static quantization puts QuantizeLinear/DequantizeLinear (QDQ) around the inputs of Linear
layers; attention's own matmul Q K^T reads the projections' outputs, so without this it runs in
float. With ``attention: true`` each Q and K projection also quantizes its output per tensor
with a calibrated range, and a runtime that moves the DequantizeLinear past the head reshape
and transpose runs Q K^T on int8 inputs.

What was measured (all-MiniLM-L6-v2 in OpenVINO 2026.4, AMD EPYC Zen 5, 1 thread, batch
32 x 128; docs/benchmarks/runtimes.md): with **signed symmetric** codes (int8, zero point 0, as
NNCF puts them) OpenVINO fuses each layer's attention into its int8 MHA kernel
(``Subgraph/i8``) and the model runs about 3% faster than the same static model with float
attention; asymmetric uint8 codes left the kernel in bf16 and gained nothing. V is left in
float: quantizing it too made OpenVINO dequantize V outside the kernel (a Convert and a Multiply
per layer), which cancelled the gain; the softmax output stays float for the same reason.

Only self-attention whose projections :func:`netshrink.hf.blocks.find_attention` finds is
touched (BERT, DistilBERT, ViT, T5, Llama-style ``q_proj``, and GPT-2, whose fused ``c_attn``
holds V too); a model that rotates Q and K after the projections (rotary position embeddings)
does not feed the quantized values to the matmul, so it pays the rounding for no speed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import nn

from netshrink.hf.blocks import find_attention
from netshrink.layers import linear_types
from netshrink.quantize.smoothed import SmoothedLinear


def _projection(module: object) -> bool:
    return isinstance(module, (*linear_types(), SmoothedLinear))


def attention_projections(model: nn.Module, quantized: Iterable[str]) -> set[str]:
    """The names among ``quantized`` (the layers static quantization converts) of the query and
    key projections of ``model``'s self-attention modules.

    Warns when ``model`` has no such projection among them: ``attention: true`` then changes
    nothing.
    """
    chosen = set(quantized)
    attention = find_attention(model, linear=_projection)
    found = {
        slot.module
        for att in attention
        for slot in (*att.q, att.kv[0])
        if slot.kind in ("linear", "conv1d")
    }
    names = found & chosen
    if not names:
        if found:
            why = "none of them is quantized here"
        elif attention:
            why = (
                "its attention computes Q and K inside one module (nn.MultiheadAttention's "
                "in_proj_weight), with no projection output to quantize"
            )
        else:
            why = "it has no self-attention found"
        warnings.warn(
            f"quantize.static: attention: true but {why} (query and key projections of "
            "BERT, DistilBERT, ViT, GPT-2, T5 or Llama-style attention); attention stays float",
            stacklevel=3,
        )
    return names
