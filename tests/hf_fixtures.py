"""Tiny random-init transformers models saved as folders, with a word-piece tokenizer, for the
``netshrink.hf`` tests. Every model has hidden size 32, 2 layers and 2 heads."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
import transformers

WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "and",
    "is",
    "in",
    "it",
    "for",
    "that",
    "on",
    "with",
    "as",
    "by",
    "this",
    "be",
    "are",
    "from",
    "or",
    "at",
    "not",
    "which",
    "return",
    "returns",
    "value",
    "values",
    "object",
    "objects",
    "file",
    "files",
    "list",
    "string",
    "strings",
    "number",
    "data",
    "name",
    "names",
    "function",
    "class",
    "module",
    "type",
    "error",
    "if",
    "when",
    "none",
    "true",
    "false",
    "default",
    "new",
    "set",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = list(
    dict.fromkeys(
        [
            *SPECIALS,
            *WORDS,
            *string.ascii_lowercase,
            *(f"##{c}" for c in string.ascii_lowercase + string.digits),
            *string.digits,
            *string.punctuation,
        ]
    )
)
VOCAB_SIZE = len(VOCAB)
HIDDEN = 32

TEXTS = [
    "The function returns a list of strings.",
    "If the value is none, the default is used.",
    "An error is raised when the file is not found.",
    "This class holds the data of one module.",
    "Return true if the object is a string, else false.",
    "The name of the new type is set by the caller.",
]


def tokenizer(folder: Path) -> transformers.BertTokenizerFast:
    """A lower-casing word-piece tokenizer over :data:`VOCAB`, saved into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = transformers.BertTokenizerFast.from_pretrained(folder)
    tok.save_pretrained(folder)
    return tok


def _bert(**extra: int) -> transformers.BertConfig:
    sizes = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    }
    return transformers.BertConfig(**(sizes | extra))


def build(kind: str) -> transformers.PreTrainedModel:
    """A random-init model (seed 0) of ``kind``: bert, bert-4x4 (4 layers of 4 heads), bert-cls,
    bert-mlm, distilbert-mlm, gpt2, t5-encoder or t5."""
    torch.manual_seed(0)
    t5 = {
        "vocab_size": VOCAB_SIZE,
        "d_model": HIDDEN,
        "d_kv": 16,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 2,
        "decoder_start_token_id": 0,
    }
    makers = {
        "bert": lambda: transformers.BertModel(_bert()),
        "bert-4x4": lambda: transformers.BertModel(
            _bert(num_hidden_layers=4, num_attention_heads=4)
        ),
        "bert-cls": lambda: transformers.BertForSequenceClassification(_bert(num_labels=3)),
        "bert-mlm": lambda: transformers.BertForMaskedLM(_bert()),
        "distilbert-mlm": lambda: transformers.DistilBertForMaskedLM(
            transformers.DistilBertConfig(
                vocab_size=VOCAB_SIZE,
                dim=HIDDEN,
                n_layers=2,
                n_heads=2,
                hidden_dim=64,
                max_position_embeddings=64,
            )
        ),
        "gpt2": lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=VOCAB_SIZE,
                n_embd=HIDDEN,
                n_layer=2,
                n_head=2,
                n_positions=64,
                bos_token_id=3,
                eos_token_id=3,
            )
        ),
        "t5-encoder": lambda: transformers.T5EncoderModel(transformers.T5Config(**t5)),
        "t5": lambda: transformers.T5Model(transformers.T5Config(**t5)),
    }
    return makers[kind]().eval()


def model_dir(folder: Path, kind: str) -> Path:
    """Save a :func:`build` model of ``kind`` and the tokenizer into ``folder``; return it."""
    build(kind).save_pretrained(folder)
    tokenizer(folder)
    return folder


def sentence_transformers_dir(
    folder: Path, pooling: dict[str, bool], normalize: bool, extra_module: str | None = None
) -> Path:
    """A BERT folder laid out as sentence-transformers saves one, with the given pooling flags."""
    model_dir(folder, "bert")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    if extra_module:
        modules.append({"idx": 3, "name": "3", "path": "3", "type": extra_module})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    flags = {f"pooling_mode_{k}": v for k, v in pooling.items()}
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": HIDDEN, **flags})
    )
    return folder


def encode(tok: transformers.PreTrainedTokenizerBase, texts: list[str] = TEXTS) -> dict:
    """``texts`` as padded keyword tensors."""
    return dict(tok(texts, padding="longest", return_tensors="pt"))
