"""``analyze``: the per-layer sensitivity result, saved as versioned JSON, plotted and cached."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netshrink.batches import example_args, materialize
from netshrink.context import Batch, Context
from netshrink.errors import ArtifactError, ConfigError, MissingInputError
from netshrink.outdir import write_atomic
from netshrink.search.probe import Prober
from netshrink.search.reach import unread_layers
from netshrink.search.sensitivity import (
    FAMILIES,
    PROBED,
    copy_model,
    default_settings,
    families_of,
    is_table,
    knob,
    layer_bytes,
    layer_macs,
    probe_layers,
)
from netshrink.targets import Targets

VERSION = 3
"""Version of the sensitivity JSON layout; a cached file of another version is recomputed.
2: probes run on a capped subset of the data, recorded as ``samples``; 3: the selected layers
the output never reads are listed in ``unread`` and not probed."""

SAMPLES = 64
"""Examples a probe runs by default: the first whole batches of the data holding at most this
many (at least one batch). Every probe runs them once, so this sets the cost of an analysis."""


@dataclass
class Sensitivity:
    """Per-layer sensitivity curves of one model on one data set.

    ``points``: one per (layer, family, value) with ``metric`` (None without an evaluate
    function), ``error`` (relative output error, 0 = identical) and ``bytes`` (the layer's stored
    bytes after the change). ``layers``: per layer its kind, stored bytes and MACs per sample
    unchanged. ``combined``: stored bytes of each layer pruned then quantized. ``samples``:
    examples each probe ran. ``unread``: selected layers left out because the model's output
    never reads them (:mod:`netshrink.search.reach`).
    """

    key: str
    baseline_metric: float | None
    layers: dict[str, dict[str, Any]]
    points: list[dict[str, Any]]
    combined: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, list[float]] = field(default_factory=dict)
    samples: int = 0
    unread: list[str] = field(default_factory=list)
    version: int = VERSION

    def headline(self) -> str:
        """One line: what was probed, e.g. ``370 probes (37 layers) on 42 samples each``, and
        the layers left out as unread."""
        probed = (
            f"{len(self.points)} probes ({len(self.layers)} layers) on {self.samples} samples each"
        )
        return "; ".join(filter(None, [probed, self.note()]))

    def note(self) -> str:
        """The layers left out as unread, in words ("" when none)."""
        if not self.unread:
            return ""
        layers = f"{len(self.unread)} layer{'s' if len(self.unread) > 1 else ''}"
        return f"{layers} left out, the output never reads them: {', '.join(self.unread)}"

    def curve(self, layer: str, family: str) -> list[dict[str, Any]]:
        """The points of one layer and family, in probing order."""
        return [p for p in self.points if p["layer"] == layer and p["family"] == family]

    def to_json(self) -> str:
        """The result as JSON text."""
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Sensitivity:
        """Parse :meth:`to_json` output; ArtifactError on another version or a bad layout."""
        try:
            data = json.loads(text)
            if data.get("version") != VERSION:
                raise ArtifactError(
                    f"sensitivity JSON version {data.get('version')!r}; netshrink reads {VERSION}"
                )
            return cls(**data)
        except (json.JSONDecodeError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"not a netshrink sensitivity JSON: {exc}") from None

    def save(self, path: str | Path) -> Path:
        """Write the JSON atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        write_atomic(path, self.to_json().encode())
        return path

    def plot(self, path: str | Path) -> Path:
        """One panel per family, one curve per layer: metric (or output error) vs setting."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        families = [f for f in FAMILIES if any(p["family"] == f for p in self.points)]
        fig, axes = plt.subplots(
            1,
            len(families),
            figsize=(5 * len(families) + 2, 4),
            squeeze=False,
            layout="constrained",
        )
        use_metric = self.baseline_metric is not None
        for ax, family in zip(axes[0], families, strict=True):
            for layer in self.layers:
                pts = self.curve(layer, family)
                ys = [p["metric"] if use_metric else p["error"] for p in pts]
                ax.plot([p["value"] for p in pts], ys, marker="o", label=layer)
            ax.set_title(family)
            ax.set_xlabel(f"{PROBED[family]} {knob(family).name}")
            ax.set_ylabel("metric" if use_metric else "relative output error")
        # One legend for all panels, outside them on the right: inside, it covered the curves.
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, title="layer", loc="outside right upper", fontsize=6)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def cache_dir() -> Path:
    """Where sensitivity results are cached: ``$NETSHRINK_CACHE/sensitivity`` or the user cache."""
    from platformdirs import user_cache_dir

    root = os.environ.get("NETSHRINK_CACHE") or user_cache_dir("netshrink")
    return Path(root) / "sensitivity"


def fingerprint(
    model: nn.Module, data: list[Batch], settings: dict[str, Any], names: list[str]
) -> str:
    """SHA-256 of the model's state dict, the data's tensors, the settings and the layer names."""
    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for x, y in data:
        for t in (x, y):
            if torch.is_tensor(t):
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(
        json.dumps({"settings": settings, "layers": names, "v": VERSION}, sort_keys=True).encode()
    )
    return h.hexdigest()[:32]


def check_settings(
    families: Sequence[str], settings: dict[str, Sequence[float]] | None
) -> dict[str, list[float]]:
    """Resolve the families' probe settings, rejecting unknown families."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ConfigError(
            f"families {list(families)!r}: choose one or more of {', '.join(FAMILIES)}"
        )
    given = dict(settings or {})
    return {f: [float(v) for v in given.get(f, default_settings(f))] for f in families}


def first_samples(batches: list[Batch], samples: int) -> list[Batch]:
    """The first whole batches of ``batches`` holding at most ``samples`` examples, at least one
    batch (the examples of a batch are counted along the first dimension of its inputs)."""
    if samples < 1:
        raise ConfigError(f"samples={samples}: a probe needs at least one example, e.g. 64")
    chosen, count = [], 0
    for x, y in batches:
        size = len(example_args(x)[0])
        if chosen and count + size > samples:
            break
        chosen.append((x, y))
        count += size
    return chosen


def analyze(
    model: nn.Module,
    *,
    example_inputs: tuple[Any, ...],
    data: Iterable[Batch],
    evaluate: Callable[..., float] | None = None,
    families: Sequence[str] = FAMILIES,
    settings: dict[str, Sequence[float]] | None = None,
    targets: Targets | None = None,
    calib_data: Iterable[Batch] | None = None,
    samples: int = SAMPLES,
    cache: bool | str | Path = True,
    progress: bool = True,
    seed: int = 0,
) -> Sensitivity:
    """Measure each selected Linear/Conv2d layer's sensitivity to each family, one at a time,
    and each embedding table's to the quant family.

    ``data``: batches the metric and output error are measured on; each probe runs the first
    whole batches holding at most ``samples`` examples, once (see :data:`SAMPLES`).
    ``evaluate(model, batches) -> float`` (higher is better); without it only the output error
    is recorded. ``settings`` overrides a family's probed values. ``cache``: True for the user
    cache folder, a folder path, or False; a cached result for the same state dict, probed data
    and settings is returned without probing. Selected layers whose output the model's output
    never reads (e.g. BERT's pooler under mean pooling) are not probed, and are listed in the
    result's ``unread``. The model is not changed.
    """
    values = check_settings(families, settings)
    batches = first_samples(materialize(data, "data"), samples)
    if not batches:
        raise MissingInputError("analyze needs data: at least one (inputs, targets) batch")
    baseline = copy_model(model)
    kinds = (nn.Linear, nn.Conv2d, nn.Embedding)
    names = [
        n
        for n, m in (targets or Targets()).select(baseline, default_types=kinds).items()
        if (is_table(m) or not isinstance(m, nn.Embedding)) and families_of(m, list(values))
    ]
    key = fingerprint(baseline, batches, values, names)
    path = None
    if cache is not False:
        path = (cache_dir() if cache is True else Path(cache)) / f"{key}.json"
        if path.is_file():
            try:
                return Sensitivity.from_json(path.read_text(encoding="utf-8"))
            except ArtifactError:
                pass  # a stale or foreign file: recompute and overwrite it
    ctx = Context(example_inputs=example_inputs, calib_data=calib_data, seed=seed, progress=False)
    unread = unread_layers(baseline, batches[0][0], names)
    names = [n for n in names if n not in unread]
    if not names:
        raise ConfigError(
            f"the model's output reads none of the selected layers ({', '.join(unread)}); "
            "select layers on the path to the output"
        )
    torch.manual_seed(seed)
    prober = Prober(baseline, batches, evaluate)
    base = prober.probe(baseline)
    macs = layer_macs(baseline, example_inputs, names)
    layers = {
        n: {
            "kind": type(baseline.get_submodule(n)).__name__,
            "bytes": layer_bytes(baseline, n),
            "macs": macs.get(n, 0),
            "params": baseline.get_submodule(n).weight.numel(),
        }
        for n in names
    }
    points, combined = probe_layers(baseline, names, values, prober, ctx, progress)
    count = sum(len(example_args(x)[0]) for x, _ in batches)
    result = Sensitivity(key, base.metric, layers, points, combined, values, count, unread)
    if path is not None:
        result.save(path)
    return result
