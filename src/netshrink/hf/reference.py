"""``hf:`` model references: a local folder written by ``save_pretrained`` or a hub id.

:func:`load_model` returns the pretrained model wrapped as a :class:`TaskModel`;
:func:`fresh_model` builds the same architecture from the config alone (random weights), which is
what ``ns.load`` rebuilds an artifact into. Only transformers' own classes are built, with
``trust_remote_code`` off: a model folder never makes netshrink run code it names.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from netshrink.errors import ModelReferenceError
from netshrink.hf.model import TaskModel
from netshrink.hf.pooling import pooling_of
from netshrink.hf.quiet import quiet_torchao
from netshrink.hf.tasks import Task, check_task, infer_task, task_of_architecture
from netshrink.quote import excerpt

PREFIX = "hf:"
_AUTO_CLASSES: dict[Task, str] = {
    "embedding": "AutoModel",
    "classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
}


def transformers_module() -> ModuleType:
    """The ``transformers`` package, or :class:`ModelReferenceError` saying how to install it.

    torchao's known import messages are silenced first (:mod:`netshrink.hf.quiet`)."""
    quiet_torchao()
    try:
        import transformers
    except ImportError:
        raise ModelReferenceError(
            "hf: references need the transformers package; install it with "
            "pip install 'netshrink[transformers]'"
        ) from None
    return transformers


def _source(ref: str) -> tuple[str, Path | None]:
    """The folder or hub id ``ref`` names, and the folder as a Path when it is local."""
    source = ref.removeprefix(PREFIX)
    if not source:
        raise ModelReferenceError(f"{ref!r} names no model; write hf:<folder> or hf:<org/name>")
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelReferenceError(
                f"{ref!r}: {path} has no config.json; give a folder written by save_pretrained"
            )
        _check_links(ref, path)
        return str(path), path
    # A hub id is "name" or "org/name"; anything else that does not exist is a missing folder.
    looks_local = path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1
    if looks_local or path.exists():
        raise ModelReferenceError(
            f"{ref!r}: {path} is not a directory; give a folder holding config.json "
            "(written by save_pretrained) or a hub id such as org/name"
        )
    return source, None


def _check_links(ref: str, folder: Path) -> None:
    """Refuse a file of ``folder`` that is a link to a place outside it: a model folder is read
    as one unit, and a link could make it read any file. The links of a hub cache snapshot
    (``snapshots/<revision>/x -> ../../blobs/<hash>``) stay inside their repository and pass."""
    root = folder.resolve()
    cache = root.parent.parent if root.parent.name == "snapshots" else root
    tops = list(folder.iterdir())
    # two levels: the files and the module folders of a sentence-transformers layout
    inner = [e for top in tops if top.is_dir() and not top.is_symlink() for e in top.iterdir()]
    for entry in (*tops, *inner):
        if entry.is_symlink() and not entry.resolve().is_relative_to(cache):
            raise ModelReferenceError(
                f"{ref!r}: {entry} is a link to {entry.resolve()}, outside the model folder; "
                "copy the file into the folder instead"
            )


def _pretrained(what: str, ref: str, call: Any, source: str, **kwargs: Any) -> Any:
    """Run a transformers loader on ``source``; its failures (files missing, unreadable, or
    weights whose shapes do not fit the config) become :class:`ModelReferenceError`."""
    from safetensors import SafetensorError

    try:
        return call(source, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        where = "" if Path(source).is_dir() else f" ({source!r} is no local folder: tried the hub)"
        said = excerpt(" ".join(str(exc).split()), 300).strip("'\"")
        raise ModelReferenceError(f"{ref!r}: cannot load its {what}{where}: {said}") from None


def load_tokenizer(ref: str) -> Any:
    """The tokenizer of ``hf:<folder or hub id>``. A tokenizer without a padding token (GPT-2's)
    pads with its end-of-text token, the usual choice: padded positions are masked out anyway."""
    transformers = transformers_module()
    source, _ = _source(ref)
    tokenizer = _pretrained("tokenizer", ref, transformers.AutoTokenizer.from_pretrained, source)
    if len(tokenizer) <= len(tokenizer.all_special_ids):
        # transformers builds a tokenizer of special tokens alone when the files are missing:
        # every word would become the unknown token
        raise ModelReferenceError(
            f"{ref!r}: its tokenizer knows no words, only its {len(tokenizer)} special tokens; "
            "save the tokenizer into the folder (tokenizer.save_pretrained)"
        )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _model_class(transformers: ModuleType, architectures: list[str] | None, task: Task) -> Any:
    """The class the config names when it serves ``task`` (e.g. T5EncoderModel, which no Auto
    class picks), else the task's Auto class."""
    name = architectures[0] if architectures else ""
    cls = getattr(transformers, name, None) if name else None
    is_model = isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
    if is_model and task_of_architecture(name) == task:
        return cls
    return getattr(transformers, _AUTO_CLASSES[task])


def _build(ref: str, task: str | None, pretrained: bool) -> TaskModel:
    transformers = transformers_module()
    source, folder = _source(ref)
    config = _pretrained("config", ref, transformers.AutoConfig.from_pretrained, source)
    chosen = check_task(task) if task is not None else infer_task(folder, config.architectures, ref)
    if hasattr(config, "use_cache"):
        config.use_cache = False  # no key/value cache: one output tensor, exportable graphs
    pooling = pooling_of(folder) if chosen == "embedding" else None
    cls = _model_class(transformers, config.architectures, chosen)
    if pretrained:
        model, info = _pretrained(
            "weights", ref, cls.from_pretrained, source, config=config, output_loading_info=True
        )
        _check_complete(ref, chosen, info.get("missing_keys", ()))
    else:
        _check_fits(ref, cls, config)
        model = _construct(cls, config)
    if chosen == "embedding" and getattr(config, "is_encoder_decoder", False):
        model = model.get_encoder()  # sentence embeddings come from the encoder alone
    mask_token_id = load_tokenizer(ref).mask_token_id if chosen == "masked-lm" else None
    canonical = f"{PREFIX}{ref.removeprefix(PREFIX)}"
    return TaskModel(model.float(), chosen, canonical, pooling, mask_token_id).eval()


def _construct(cls: Any, config: Any) -> nn.Module:
    """``cls``'s model for ``config`` with freshly initialised weights."""
    return (
        cls.from_config(config, trust_remote_code=False)
        if cls.__name__.startswith("Auto")
        else cls(config)
    )


def _check_fits(ref: str, cls: Any, config: Any) -> None:
    """Refuse a config whose model would take more than half this machine's memory, counted on
    the meta device (nothing allocated): a config.json edited to a vocabulary of 10**10 tokens
    would otherwise be allocated and initialised before anything failed."""
    import torch

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return  # the system does not say: nothing to compare with
    with torch.device("meta"):
        probe = _construct(cls, config)
    size = sum(p.numel() * p.element_size() for p in probe.parameters())
    if size > memory // 2:
        raise ModelReferenceError(
            f"{ref!r}: its config.json describes a model of {size / 2**30:.1f} GiB, more than "
            f"half of this machine's {memory / 2**30:.1f} GiB of memory"
        )


def _check_complete(ref: str, task: str, missing: Any) -> None:
    """Refuse a model some of whose weights the folder lacks: transformers would initialise them
    at random (a classification head on a base model), and the compressed model of a random
    head measures nothing."""
    missing = sorted(missing)
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise ModelReferenceError(
            f"{ref!r}: its weights lack {len(missing)} tensors of the {task} model ({shown}): "
            "they would be random; give the --task the folder was saved for, or a folder saved "
            "with that task's head"
        )


def load_model(ref: str, task: str | None = None) -> TaskModel:
    """The pretrained model ``hf:<folder or hub id>`` names, as a :class:`TaskModel` in eval mode.

    ``task`` is one of ``embedding``, ``classification``, ``causal-lm``, ``masked-lm``; when
    omitted it is inferred (sentence-transformers files -> embedding, else the config's
    ``architectures``). Weights are loaded as float32. Raises :class:`ModelReferenceError` for a
    missing folder, an unloadable model or a missing transformers package, and
    :class:`~netshrink.errors.ConfigError` for an unknown or uninferable task.
    """
    return _build(ref, task, pretrained=True)


def fresh_model(ref: str, task: str | None = None) -> TaskModel:
    """The architecture of :func:`load_model` ``(ref, task)`` built from its config alone, with
    freshly initialised weights: the model to pass as ``ns.load(path, model=...)``."""
    return _build(ref, task, pretrained=False)


def reference_info(model: nn.Module) -> dict[str, str] | None:
    """``{"ref": "hf:...", "task": ...}`` for a model :func:`load_model` built (what an artifact
    stores to rebuild it with :func:`fresh_model`), or None for any other model."""
    info = getattr(model, "netshrink_hf", None)
    return dict(info) if isinstance(info, dict) else None
