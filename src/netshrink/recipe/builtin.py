"""Recipes shipped in the package (``netshrink list --recipes``); loading by name or path."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from netshrink.errors import RecipeError
from netshrink.recipe.schema import Recipe, loads
from netshrink.recipe.yamlsafe import MAX_BYTES

DEFAULT = "distill-prune-int8"
"""The recipe ``netshrink demo`` runs."""
DEMO_MODEL = "zoo:digits-cnn"
"""The model ``netshrink demo`` compresses."""
DEMO_RUNTIME = "onnxruntime"
"""Where ``netshrink demo`` times both models: the int8 model runs ONNX Runtime's integer
kernels there (eager PyTorch has no fused int8 convolution), and the fp32 baseline runs there
too, so the speedup compares like with like."""

DEMO_TRANSFORMER_RECIPE = "transformer-int8"
"""The recipe ``netshrink demo --model minilm`` runs on the pretrained MiniLM encoder."""
DEMO_TRANSFORMER_RUNTIME = "openvino"
"""Where ``netshrink demo --model minilm`` times both models: OpenVINO runs the int8 MiniLM's
Linears on integer kernels and is the fastest fp32 runtime measured for it as well
(docs/benchmarks/runtimes.md)."""

DEMO_THREADS = 1
"""Intra-op threads ``netshrink demo`` times both models with. Two ONNX Runtime sessions timed
interleaved in one process each keep a worker pool: with spinning workers, the idle pool of one
stole a core from the other (the fp32 baseline measured 9-13 ms in the demo against 4.7 ms
alone, 2 threads); with sleeping workers, every small int8 op paid a wake-up. One thread has no
pool, and its in-process figures matched a separate timing script within 10% (docs/benchmarks/
recipe.md). ``--threads 2`` times on two."""


def _folder() -> resources.abc.Traversable:
    return resources.files("netshrink.recipe") / "builtin"


def names() -> list[str]:
    """Names of the built-in recipes, sorted."""
    return sorted(p.name[: -len(".yaml")] for p in _folder().iterdir() if p.name.endswith(".yaml"))


def text(name: str) -> str:
    """The YAML text of built-in recipe ``name``, or RecipeError listing the built-ins."""
    if name not in names():
        raise RecipeError(f"no built-in recipe named {name!r}; built-ins: {', '.join(names())}")
    return (_folder() / f"{name}.yaml").read_text(encoding="utf-8")


def load(ref: str | Path) -> Recipe:
    """Load a recipe from a YAML file path, or a built-in recipe by name.

    A path that exists wins over a built-in of the same name. Raises :class:`RecipeError` when
    ``ref`` is neither, naming the built-ins.
    """
    path = Path(ref)
    if path.is_file():
        try:
            with path.open(encoding="utf-8") as f:
                body = f.read(MAX_BYTES + 1)  # a longer file is refused by loads, unread
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"cannot read recipe file {str(path)!r}: {exc}") from None
        return loads(body, source=str(path))
    if str(ref) in names():
        return loads(text(str(ref)), source=f"built-in:{ref}")
    raise RecipeError(
        f"{str(ref)!r} is neither a recipe file nor a built-in recipe; "
        f"built-ins: {', '.join(names())}"
    )
