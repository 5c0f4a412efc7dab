"""The technique registry: one source of truth for the Python API, recipes and ``netshrink list``.

A technique is an options model (:class:`~netshrink.config.TechniqueConfig`) plus a function
``(model, config, context) -> model``, registered under a dotted name such as
``prune.magnitude`` together with the context items it needs and the layer types it puts in the
model. The family is the part of the name before the dot; families are whatever the registered
techniques name, and a family package exports its techniques with :func:`export_family`.

:meth:`Technique.apply` is where every technique is made safe on any model, once: it validates
the options and the context, works on a copy (the caller's model is never modified), turns a
raw exception into an :class:`~netshrink.errors.UnsupportedModuleError` naming the layer that
raised (or a :class:`~netshrink.errors.DataError` when the given model does not run on the given
data either), refuses a result that changed nothing or untied tied weights, checks that one forward
on the example inputs still runs and keeps the output structure and shapes, and only then
fine-tunes.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import pkgutil
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from torch import nn

from netshrink.batches import check_finite_weights
from netshrink.config import TechniqueConfig
from netshrink.context import Context
from netshrink.errors import ConfigError, DataError, NetshrinkError, UnsupportedModuleError
from netshrink.quote import excerpt
from netshrink.safety import (
    Signature,
    changed,
    check_outputs,
    check_ties,
    forward_signature,
    watch,
)

TechniqueFn = Callable[[nn.Module, Any, Context], nn.Module]
NeedsFn = Callable[[Any], Iterable[str]]


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def options_model(annotation: Any) -> type[BaseModel] | None:
    """The options model an annotation holds (``X`` or ``X | None``), if it holds one."""
    for candidate in typing.get_args(annotation) or (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _owner(config: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The options model holding the last key of ``loc`` (``finetune.epochs``: TrainConfig)."""
    for part in loc[:-1]:
        field = config.model_fields.get(str(part))
        nested = options_model(field.annotation) if field else None
        if nested is None:
            break
        config = nested
    return config


def config_error(exc: ValidationError, config: type[TechniqueConfig], stage: str) -> ConfigError:
    """Turn the first pydantic validation error into a :class:`ConfigError` naming stage and key."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or None
    if err["type"] == "extra_forbidden":
        fields = _owner(config, tuple(err["loc"])).model_fields
        leaf = str(err["loc"][-1])
        message = f"unknown option{_suggest(leaf, fields)}; valid options: {', '.join(fields)}"
    else:
        field = config.model_fields.get(str(err["loc"][0])) if err["loc"] else None
        about = f" ({field.description})" if field and field.description else ""
        message = f"{err['msg']}; got {excerpt(err.get('input'))}{about}"
    return ConfigError(message, stage=stage, key=key)


@dataclass(frozen=True)
class Knob:
    """How the search tries a technique on one layer.

    ``name`` is the option it turns, ``values`` the settings it tries, and
    ``options(value, targets)`` the technique's options at ``value`` on the layers ``targets``
    (a Targets mapping) selects. The cost of each setting is measured, not declared: the search
    saves the probed layer and counts its bytes and MACs.
    """

    name: str
    values: tuple[float, ...]
    options: Callable[[float, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Applied:
    """What :meth:`Technique.run` returns: the new model, and what the technique left undone.

    ``notes`` are the technique's own words for what it achieved short of what was asked
    ("achieved 12% of 30%: ... is not traceable"); the recipe's stage record carries them.
    """

    model: nn.Module
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Technique:
    """A registered technique: its name, options, function, needs and the layers it creates."""

    name: str
    config: type[TechniqueConfig]
    fn: TechniqueFn
    needs_fn: NeedsFn
    creates: tuple[type[nn.Module], ...] = ()
    """Layer types the technique puts in place of the original ones (none: it edits in place)."""
    knob: Knob | None = field(default=None, compare=False)

    @property
    def family(self) -> str:
        """``prune`` for ``prune.magnitude``."""
        return self.name.partition(".")[0]

    @property
    def summary(self) -> str:
        """First line of the technique function's docstring."""
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""

    def make_config(self, options: Mapping[str, Any] | None, stage: str | None = None) -> Any:
        """Validate ``options`` into this technique's frozen config, or raise ConfigError."""
        if options is not None and not isinstance(options, Mapping):
            raise ConfigError(
                f"options must be a mapping of option: value, got {type(options).__name__}",
                stage=stage or self.name,
            )
        try:
            return self.config.model_validate(dict(options or {}))
        except ValidationError as exc:
            raise config_error(exc, self.config, stage or self.name) from None

    def needs(self, config: Any) -> tuple[str, ...]:
        """Context items this technique needs with ``config`` (fine-tuning adds train_data)."""
        needs = list(self.needs_fn(config))
        if config.finetune is not None and config.finetune.epochs > 0:
            needs.append("train_data")
        return tuple(dict.fromkeys(needs))

    def apply(self, model: nn.Module, config: Any, ctx: Context) -> nn.Module:
        """Run the technique on a copy of ``model`` (see :meth:`run`) and return the new model."""
        return self.run(model, config, ctx).model

    def run(self, model: nn.Module, config: Any, ctx: Context) -> Applied:
        """Run the technique safely on a copy of ``model``; the caller's model stays as it was.

        In order: check the needs and the weights; when ``ctx.example_inputs`` is given, record
        the output structure and shapes of one forward; run the technique (any exception that is
        not a :class:`~netshrink.errors.NetshrinkError` becomes a DataError when the unchanged
        model fails on the first batch of its data too, else an UnsupportedModuleError naming
        the layer running when it was raised); refuse a model that did not change or lost a
        weight tie; check that
        one forward still runs with the same output structure and shapes; fine-tune. The
        technique's warnings are shown and returned as the result's notes.
        """
        ctx.require(self.needs(config), self.name)
        check_finite_weights(model)
        work = copy.deepcopy(model)
        expected = self._reference(work, ctx)
        with _notes() as notes:
            out = self._guarded(self.fn, work, config, ctx, model)
        if not changed(model, out):
            why = f": {'; '.join(notes)}" if notes else ""
            raise UnsupportedModuleError(
                f"{self.name} changed nothing in {type(model).__name__}{why}; check the "
                "options and targets, or that the model has layers this technique handles"
            )
        check_ties(model, out, self.name)
        if expected is not None:
            assert ctx.example_inputs is not None
            check_outputs(out, ctx.example_inputs, expected, self.name)
        if config.finetune is not None and config.finetune.epochs > 0:
            from netshrink.train import finetune

            def tune(m: nn.Module, cfg: Any, c: Context) -> nn.Module:
                return finetune(m, cfg.finetune, c, desc=f"{self.name} fine-tune")

            out = self._guarded(tune, out, config, ctx, model)
        return Applied(out, tuple(notes))

    def _reference(self, model: nn.Module, ctx: Context) -> Signature | None:
        """The output signature of ``model`` on the example inputs, or None without them."""
        if ctx.example_inputs is None:
            return None
        try:
            return forward_signature(model, ctx.example_inputs)
        except UnsupportedModuleError as exc:
            raise DataError(
                f"{self.name}: the model as given does not run on example_inputs ({exc}); give "
                "inputs its forward accepts: a tuple of positional inputs or a dict of keywords"
            ) from exc.__cause__

    def _guarded(
        self, fn: TechniqueFn, model: nn.Module, config: Any, ctx: Context, original: nn.Module
    ) -> nn.Module:
        """``fn(model, config, ctx)``, with a raw exception turned into UnsupportedModuleError."""
        with watch() as flight:
            try:
                return fn(model, config, ctx)
            except NetshrinkError:
                raise
            except Exception as exc:
                self._blame_data(original, config, ctx)
                where = flight.culprit(model, exc)
                hint = (
                    f" in {where}; leave that layer out with targets.exclude"
                    if where
                    else "; the model's outputs or data are not what it expects"
                )
                raise UnsupportedModuleError(
                    f"{self.name} failed on {type(original).__name__}{hint} "
                    f"({type(exc).__name__}: {exc})"
                ) from exc

    def _blame_data(self, original: nn.Module, config: Any, ctx: Context) -> None:
        """Raise :class:`DataError` when the caller's unchanged model fails on the first batch of
        the data this technique read: then the data, not a layer, is what to fix (an
        encoder-decoder given encoder inputs only fails in its decoder, which no
        ``targets.exclude`` can mend). Data given as a one-pass iterator is not read again."""
        for item in ("calib_data", "train_data"):
            data = getattr(ctx, item)
            if item not in self.needs(config) or data is None or iter(data) is data:
                continue
            first = next(iter(data), None)
            if first is None:
                continue
            try:
                forward_signature(original, first[0])
            except UnsupportedModuleError as exc:
                raise DataError(
                    f"{self.name}: the model as given does not run on {item}'s first batch "
                    f"({exc}); give inputs its forward accepts (an encoder-decoder needs its "
                    "decoder inputs too)"
                ) from exc.__cause__


@contextmanager
def _notes() -> Iterator[list[str]]:
    """Collect the messages of the UserWarnings raised in the block, and show them again."""
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        yield notes
    for w in caught:
        if issubclass(w.category, UserWarning):
            notes.append(str(w.message))
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


_REGISTRY: dict[str, Technique] = {}


def technique(
    name: str,
    config: type[TechniqueConfig],
    needs: Iterable[str] | NeedsFn = (),
    *,
    creates: Iterable[type[nn.Module]] = (),
    knob: Knob | None = None,
) -> Callable[[TechniqueFn], TechniqueFn]:
    """Register ``fn(model, config, ctx) -> model`` under ``name`` (``family.technique``).

    ``needs`` lists context items (see :class:`~netshrink.context.Context`) the technique
    requires, or is a function of the validated config returning them. ``creates`` names the
    layer types it puts in the model; ``knob`` tells the search how to try it on one layer.
    """
    family, _, short = name.partition(".")
    if not (family.isidentifier() and short.isidentifier()):
        raise ValueError(f"technique name must be <family>.<identifier>: {name}")
    needs_fn: NeedsFn = needs if callable(needs) else (lambda _cfg, _n=tuple(needs): _n)

    def register(fn: TechniqueFn) -> TechniqueFn:
        if name in _REGISTRY:
            raise ValueError(f"technique {name} is registered twice")
        _REGISTRY[name] = Technique(name, config, fn, needs_fn, tuple(creates), knob)
        return fn

    return register


def load_all() -> None:
    """Import netshrink, whose family packages register every built-in technique."""
    importlib.import_module("netshrink")


def families() -> tuple[str, ...]:
    """The families of the registered techniques, sorted: ``("distill", "lowrank", ...)``."""
    load_all()
    return tuple(sorted({t.family for t in _REGISTRY.values()}))


def get(name: str) -> Technique:
    """Return the technique registered as ``name`` or raise ConfigError listing the choices."""
    load_all()
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown technique '{name}'{_suggest(name, _REGISTRY)}; "
            f"registered: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def all_techniques() -> list[Technique]:
    """Every registered technique, sorted by name."""
    load_all()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def python_api(name: str) -> Callable[..., nn.Module]:
    """Build ``fn(model, **kwargs)`` for technique ``name``.

    Keyword arguments that name a context item (``example_inputs``, ``calib_data``, ...) go to the
    context; the rest are the technique's options.
    """
    context_items = set(Context.item_names())

    def call(model: nn.Module, **kwargs: Any) -> nn.Module:
        tech = get(name)
        ctx_kwargs = {k: v for k, v in kwargs.items() if k in context_items}
        options = {k: v for k, v in kwargs.items() if k not in context_items}
        config = tech.make_config(options)
        return tech.apply(model, config, Context(**ctx_kwargs))

    call.__name__ = name.split(".")[1]
    call.__qualname__ = name
    return call


def export_family(namespace: dict[str, Any]) -> None:
    """Make a package a technique family: import its modules, export its techniques.

    A family package (``netshrink/prune/__init__.py``) ends with ``export_family(globals())``:
    every module in the package is imported, so each technique registers itself, and
    ``fn(model, **kwargs)`` for every registered ``<family>.*`` technique is put into the
    package's namespace and ``__all__``, which gives ``ns.prune.magnitude(model, sparsity=0.9)``.
    Adding a technique file to the package is all it takes to add a technique.
    """
    package = namespace["__name__"]
    for module in pkgutil.iter_modules(namespace["__path__"]):
        importlib.import_module(f"{package}.{module.name}")
    family = package.rpartition(".")[2]
    exported = namespace.setdefault("__all__", [])
    for name, tech in sorted(_REGISTRY.items()):
        if tech.family == family:
            fn = python_api(name)
            fn.__doc__ = tech.fn.__doc__
            short = name.split(".")[1]
            namespace[short] = fn
            exported.append(short)
