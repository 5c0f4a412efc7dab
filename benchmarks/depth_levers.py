"""Screen of levers for the 3-layer MiniLM depth student at a tenth of #13's budget.

Chooses on a validation split (400 third-party docstring paragraphs), never on the held-out
corpus; prints one JSON line per arm and appends it to /tmp/student3_screen/results.jsonl.
Arms: base (distill.kd defaults), localonly / local (block-local fit of each student layer to
its two teacher layers, then distill.kd), mse_last (MSE on the last layer's token states),
dense (a 384x384 identity-initialised linear map after pooling), freeze (word embeddings
frozen). Results: docs/benchmarks/distill.md, "Levers that change where training ends".

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/depth_levers.py base
    ... local --epochs 7 --local-epochs 2 | mse_last --w 10 | dense
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import netshrink as ns
from depth_student import MAX_LENGTH as MAXLEN
from depth_student import embeddings, length_batches  # benchmarks/ on sys.path
from netshrink import hf
from netshrink.hf.corpus import package_training_corpus, sentences, stdlib_training_corpus
from netshrink.hf.text import tokenize

torch.set_num_threads(1)
D = Path("/tmp/student3_screen")
D.mkdir(exist_ok=True)


def val_texts() -> list[str]:
    """The screen's validation texts: the first 400 multi-sentence paragraphs of the installed
    packages' docstrings. Built afresh each run, not cached: the corpus follows the installed
    package versions, and a cached split from another environment would silently differ."""
    paras = [t for t in package_training_corpus() if len(sentences(t)) >= 2]
    return paras[:400]


def fidelity(model, batches, base):
    out = embeddings(model, batches)
    cos = F.cosine_similarity(out, base, dim=-1)
    return float(cos.mean()), float(cos.min()), hf.neighbour_agreement(out, base, 5)


class DensePool(nn.Module):
    """mean pool -> 384x384 linear (identity init) -> L2 norm (sentence-transformers Dense)."""

    def __init__(self, dim):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        nn.init.eye_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(self, states, mask):
        m = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(self.dense(pooled), dim=-1)


def teacher_layer_io(teacher, batches):
    """Per batch: inputs of layers 0,2,4 (with the attention mask kwarg) and outputs of 1,3,5."""
    layers = teacher.model.encoder.layer
    rec = {}

    def pre(i):
        def h(mod, args, kwargs):
            rec[("in", i)] = (args[0] if args else kwargs["hidden_states"]).detach()
            rec[("mask", i)] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

        return h

    def post(i):
        def h(mod, args, out):
            rec[("out", i)] = (out[0] if isinstance(out, tuple) else out).detach()

        return h

    hs = [layers[i].register_forward_pre_hook(pre(i), with_kwargs=True) for i in (0, 2, 4)]
    hs += [layers[i].register_forward_hook(post(i)) for i in (1, 3, 5)]
    data = []
    teacher.eval()
    with torch.no_grad():
        for x, _ in batches:
            rec.clear()
            teacher(**x)
            data.append(
                {
                    j: (rec[("in", 2 * j)], rec[("mask", 2 * j)], rec[("out", 2 * j + 1)])
                    for j in range(3)
                }
                | {"real": x["attention_mask"].bool()}
            )
    for h in hs:
        h.remove()
    return data


def block_local(student, data, epochs, lr, loss):
    """Fit student layer j to map teacher h_{2j} -> h_{2j+2} (teacher inputs; no full backward)."""
    layers = student.model.encoder.layer
    for j in range(3):
        layer = layers[j]
        layer.train()
        opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=0.0)
        steps = epochs * len(data)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=steps, pct_start=0.1, anneal_strategy="cos"
        )
        g = torch.Generator().manual_seed(j)
        for _ in range(epochs):
            for k in torch.randperm(len(data), generator=g).tolist():
                h_in, mask, target = data[k][j]
                real = data[k]["real"]
                out = layer(h_in, attention_mask=mask)
                out = out[0] if isinstance(out, tuple) else out
                if loss == "cosine":
                    err = (1 - F.cosine_similarity(out[real], target[real], dim=-1)).mean()
                else:
                    err = F.mse_loss(out[real], target[real])
                opt.zero_grad()
                err.backward()
                opt.step()
                sched.step()
    return student


def main():
    p = argparse.ArgumentParser()
    p.add_argument("arm")
    p.add_argument("--texts", type=int, default=1248)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--w", type=float, default=1.0)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--local-lr", type=float, default=1e-4)
    p.add_argument("--local-loss", default="mse")
    p.add_argument("--heldout", action="store_true")
    a = p.parse_args()
    from netshrink.hf.minilm import minilm_ref

    ref = minilm_ref()
    teacher = hf.load_model(ref)
    tok = hf.load_tokenizer(ref)
    train = length_batches(tok, stdlib_training_corpus(a.texts), seed=0)
    val = tokenize(tok, val_texts(), None, MAXLEN, 64)
    trainev = tokenize(tok, stdlib_training_corpus(400), None, MAXLEN, 64)
    vbase, tbase = embeddings(teacher, val), embeddings(teacher, trainev)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    l0 = os.getloadavg()[0]
    start = ns.distill.kd(teacher, student={"depth": 3}, train_data=train, epochs=0, progress=False)
    kw = dict(
        train_data=train,
        epochs=a.epochs,
        lr=a.lr,
        warmup_steps=min(30, a.epochs * len(train) // 10),
        progress=False,
    )
    features = []
    info = {}
    if a.arm == "mse_last":
        features = [
            {
                "student": "model.encoder.layer.2",
                "teacher": "model.encoder.layer.5",
                "loss": "hint",
                "weight": a.w,
            }
        ]
    if a.arm == "dense":
        start.pooling = DensePool(384)
    if a.arm == "freeze":
        start.model.embeddings.word_embeddings.weight.requires_grad_(False)
    if a.arm == "local":
        c = time.process_time()
        data = teacher_layer_io(teacher, train)
        info["local_teacher_cpu"] = time.process_time() - c
        block_local(start, data, a.local_epochs, a.local_lr, a.local_loss)
        info["local_cpu"] = time.process_time() - c
        info["after_local_val"] = fidelity(start, val, vbase)
    if a.arm == "localonly":
        data = teacher_layer_io(teacher, train)
        block_local(start, data, a.local_epochs, a.local_lr, a.local_loss)
        out = start
    else:
        out = ns.distill.kd(start, teacher=teacher, features=features, **kw) if a.epochs else start
    cpu = time.process_time() - cpu0
    res = dict(
        arm=a.arm,
        args=vars(a),
        cpu=round(cpu, 1),
        wall=round(time.perf_counter() - t0, 1),
        load=(l0, os.getloadavg()[0]),
        steps=a.epochs * len(train),
        batches=len(train),
        val=fidelity(out, val, vbase),
        train=fidelity(out, trainev, tbase),
        **info,
    )
    if a.heldout:
        test = tokenize(tok, hf.heldout_corpus(), None, MAXLEN, 64)
        res["heldout"] = fidelity(out, test, embeddings(teacher, test))
    print(json.dumps(res))
    with open(D / "results.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
