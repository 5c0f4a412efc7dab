"""llm-compressor's GPTQ on the same MiniLM weights and calibration data as ``one_shot.py``.

Runs in its own throwaway virtual environment (llm-compressor pins other transformers and
compressed-tensors versions than netshrink's), CPU only:

    python -m venv /tmp/peer && /tmp/peer/bin/pip install torch==2.13.0
    /tmp/peer/bin/pip install --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0 \\
        transformers==5.17.0 accelerate datasets
    /tmp/peer/bin/pip install loguru pydantic psutil requests pillow httpx "huggingface-hub<2" \\
        tokenizers safetensors pyyaml tqdm numpy multiprocess pandas pyarrow xxhash
    PYTHONPATH=src python benchmarks/one_shot.py --peer-data /tmp/peer_data.pt ...
    /tmp/peer/bin/python benchmarks/one_shot_peer.py /tmp/peer_data.pt none /tmp/emb_none.pt
    PYTHONPATH=src python benchmarks/one_shot.py --peer "llm-compressor=/tmp/emb_none.pt" ...

``VARIANT``: ``none`` (no act-order, min-max ranges), ``static`` (llm-compressor's default
static act-order), ``mse`` (static act-order, the mse observer's searched ranges). Every variant
is int4, symmetric, groups of 128, damping 0.01, calibrated sequentially per BertLayer on each
calibration text unpadded. Prints the seconds and the mean cosine to the fp32 embeddings.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from torch.utils.data import DataLoader
from transformers import BertModel


def recipe(variant: str) -> GPTQModifier:
    """The GPTQ modifier of ``variant`` (see the module docstring)."""
    if variant == "mse":
        weights = QuantizationArgs(
            num_bits=4, type="int", symmetric=True, strategy="group", group_size=128,
            observer="mse",
        )  # fmt: skip
        scheme = QuantizationScheme(targets=["Linear"], weights=weights)
        return GPTQModifier(config_groups={"int4": scheme}, dampening_frac=0.01)
    order = {"actorder": None} if variant == "none" else {}
    return GPTQModifier(targets="Linear", scheme="W4A16", dampening_frac=0.01, **order)


def main() -> None:
    data_file, variant, out = sys.argv[1:4]
    torch.set_num_threads(1)
    data = torch.load(data_file, weights_only=True)
    model = BertModel.from_pretrained(data["model"], add_pooling_layer=False).eval()
    texts = [
        {k: v[i : i + 1, : int(batch["attention_mask"][i].sum())] for k, v in batch.items()}
        for batch in data["calib"]
        for i in range(len(batch["input_ids"]))
    ]  # one unpadded text per batch: llm-compressor counts every position it is given
    start = time.perf_counter()
    oneshot(
        model=model, dataset=DataLoader(texts, batch_size=None), recipe=recipe(variant),
        pipeline="sequential", sequential_targets=["BertLayer"], num_calibration_samples=len(texts),
    )  # fmt: skip
    seconds = time.perf_counter() - start
    with torch.no_grad():
        out_emb = []
        for batch in data["eval"]:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out_emb.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    emb = torch.cat(out_emb)
    torch.save(emb, out)
    print(f"seconds {seconds:.0f} cosine {float((emb * data['reference']).sum(-1).mean()):.4f}")


if __name__ == "__main__":
    main()
