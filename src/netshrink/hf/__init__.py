"""Hugging Face integration: ``hf:`` model references, ``text:`` data, task metrics and losses,
the heads and FFNs of transformer blocks (found by :mod:`netshrink.hf.blocks`, cut by
:mod:`netshrink.hf.shrink`) and ``export --hf``.

transformers is an optional dependency: importing this package does not need it, loading a model
or tokenizer does (and says how to install it when missing).
"""

from netshrink.hf.corpus import heldout_corpus, stdlib_corpus
from netshrink.hf.depth import drop_layers, layer_stacks
from netshrink.hf.export import HfExport, export_hf
from netshrink.hf.inputs import data_for, evaluate_for
from netshrink.hf.losses import LOSSES, loss_for
from netshrink.hf.metrics import Fidelity, fidelity, metric_for, metric_name, neighbour_agreement
from netshrink.hf.model import TaskModel
from netshrink.hf.pooling import Pooling, pooling_of
from netshrink.hf.reference import fresh_model, load_model, load_tokenizer, reference_info
from netshrink.hf.tasks import TASKS, Task, infer_task
from netshrink.hf.text import read_texts, text_data, texts_data

__all__ = [
    "LOSSES",
    "TASKS",
    "Fidelity",
    "HfExport",
    "Pooling",
    "Task",
    "TaskModel",
    "data_for",
    "drop_layers",
    "evaluate_for",
    "export_hf",
    "fidelity",
    "fresh_model",
    "heldout_corpus",
    "infer_task",
    "layer_stacks",
    "load_model",
    "load_tokenizer",
    "loss_for",
    "metric_for",
    "metric_name",
    "neighbour_agreement",
    "pooling_of",
    "read_texts",
    "reference_info",
    "stdlib_corpus",
    "text_data",
    "texts_data",
]
