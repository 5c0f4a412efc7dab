"""The technique registry: one source of truth for the Python API, recipes and ``netshrink list``.

A technique is an options model (:class:`~netshrink.config.TechniqueConfig`) plus a function
``(model, config, context) -> model``, registered under a dotted name such as
``prune.magnitude``. :meth:`Technique.apply` validates the options, checks that the context has
what the technique needs, leaves the caller's model untouched (the function works on a copy),
runs the function and then the optional fine-tuning.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from torch import nn

from netshrink.batches import check_finite_weights
from netshrink.config import TechniqueConfig
from netshrink.context import Context
from netshrink.errors import ConfigError
from netshrink.quote import excerpt

FAMILIES = ("prune", "quantize", "distill", "lowrank")

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
    """The options model holding the last key of ``loc`` (``finetune.epochs``: FinetuneConfig)."""
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
class Technique:
    """A registered technique: its name, options model, function and declared needs."""

    name: str
    config: type[TechniqueConfig]
    fn: TechniqueFn
    needs_fn: NeedsFn

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
        """Run the technique on a copy of ``model``; the caller's model is left as it was."""
        ctx.require(self.needs(config), self.name)
        check_finite_weights(model)
        out = self.fn(copy.deepcopy(model), config, ctx)
        if config.finetune is not None and config.finetune.epochs > 0:
            from netshrink.train import finetune

            out = finetune(out, config.finetune, ctx, desc=f"{self.name} fine-tune")
        return out


_REGISTRY: dict[str, Technique] = {}


def technique(
    name: str, config: type[TechniqueConfig], needs: Iterable[str] | NeedsFn = ()
) -> Callable[[TechniqueFn], TechniqueFn]:
    """Register ``fn(model, config, ctx) -> model`` under ``name`` (``family.technique``).

    ``needs`` lists context items (see :class:`~netshrink.context.Context`) the technique
    requires, or is a function of the validated config returning them.
    """
    family, _, short = name.partition(".")
    if family not in FAMILIES or not short.isidentifier():
        raise ValueError(f"technique name must be <{'|'.join(FAMILIES)}>.<identifier>: {name}")
    needs_fn: NeedsFn = needs if callable(needs) else (lambda _cfg, _n=tuple(needs): _n)

    def register(fn: TechniqueFn) -> TechniqueFn:
        if name in _REGISTRY:
            raise ValueError(f"technique {name} is registered twice")
        _REGISTRY[name] = Technique(name, config, fn, needs_fn)
        return fn

    return register


def load_all() -> None:
    """Import every family package so that all built-in techniques are registered."""
    for family in FAMILIES:
        importlib.import_module(f"netshrink.{family}")


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


def export_family(namespace: dict[str, Any], family: str) -> None:
    """Put ``fn(model, **kwargs)`` for every registered ``family.*`` technique into ``namespace``.

    A family package calls ``export_family(globals(), "prune")`` after importing its technique
    modules, which gives ``ns.prune.magnitude(model, sparsity=0.9)``.
    """
    for name, tech in _REGISTRY.items():
        if name.startswith(family + "."):
            fn = python_api(name)
            fn.__doc__ = tech.fn.__doc__
            namespace[name.split(".")[1]] = fn
