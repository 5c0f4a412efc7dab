"""The ``netshrink`` command line: parses arguments, calls the library, prints results.

Exit codes: 0 success, 2 bad input (usage, recipe, options, references, data: any
:class:`~netshrink.errors.InputError`), 1 any other failure. Bad input prints one ``error:`` line
on stderr, never a traceback. With ``--json`` the last line on stdout is one JSON object.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from netshrink.cliopts import (
    INTERRUPTED,
    MAX_THREADS,
    MODEL_HELP,
    BeforeVerb,
    DataOpt,
    EvalOpt,
    JsonOpt,
    ModelOpt,
    QuietOpt,
    RunsOpt,
    RuntimeOpt,
    SeedOpt,
    TaskOpt,
    ThreadsOpt,
    err,
    for_scripts,
    handles_errors,
    out,
    print_json,
)
from netshrink.errors import ConfigError
from netshrink.recipe.builtin import (
    DEMO_RUNTIME,
    DEMO_THREADS,
    DEMO_TRANSFORMER_RECIPE,
    DEMO_TRANSFORMER_RUNTIME,
)
from netshrink.report.tables import plural
from netshrink.report.terminal import say
from netshrink.search.analysis import SAMPLES
from netshrink.settings import Inputs, Timing

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make trained PyTorch models smaller and faster, and prove it by measuring.",
)


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="print the traceback of an error (before the verb)")
    ] = False,
) -> None:
    """Make trained PyTorch models smaller and faster, and prove it by measuring."""
    BeforeVerb.debug = debug


@app.command("list")
@handles_errors
def list_(
    recipes: Annotated[bool, typer.Option("--recipes", help="list the built-in recipes")] = False,
    schema: Annotated[bool, typer.Option("--schema", help="print the recipe JSON schema")] = False,
) -> None:
    """List every technique with its options, defaults, types, ranges and descriptions."""
    from netshrink import recipe, registry
    from netshrink.recipe.describe import describe

    if schema:
        print_json(recipe.json_schema())
        return
    if recipes:
        table = Table("recipe", "description", "stages", title="built-in recipes")
        for name in recipe.names():
            plan = recipe.load(name)
            table.add_row(name, plan.description, " -> ".join(s.name for s in plan.stages))
        out().print(table)
        return
    techniques = registry.all_techniques()
    if not techniques:
        out().print("no techniques are registered")
    for tech in techniques:
        table = Table(
            "option",
            "type",
            "default",
            "range",
            "description",
            title_justify="left",
            title=f"[bold]{tech.name}[/bold]  {tech.summary}",
        )
        for opt in describe(tech):
            table.add_row(opt.name, opt.type, opt.default, opt.range, opt.description)
        out().print(table)


def _finish_run(result: Any, paths: dict[str, Path], quiet: bool, as_json: bool) -> None:
    from netshrink.report import print_report

    if as_json:
        summary = result.report.summary()
        print_json({**summary, "report_html": str(paths["html"]), "report": str(paths["json"])})
        return
    print_report(result.report, out(), stages=not quiet)
    out().print(f"artifact: {paths['artifact']}")
    out().print(f"report: {paths['html']}")


@app.command()
@handles_errors
def compress(
    model: Annotated[str, typer.Option("--model", help=MODEL_HELP)],
    out: Annotated[Path, typer.Option("--out", help="output folder")],
    recipe: Annotated[
        str | None, typer.Argument(help="recipe YAML file or built-in name (or give --target)")
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            help="search a recipe: size=20x|speedup=3x|latency_ms=|size_mb=, max_drop=0.01",
        ),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option("--weights", help="safetensors state dict for --model")
    ] = None,
    data: DataOpt = None,
    eval_: EvalOpt = None,
    task: TaskOpt = None,
    seed: SeedOpt = 0,
    runtime: RuntimeOpt = "eager",
    threads: ThreadsOpt = None,
    runs: RunsOpt = 20,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run RECIPE (or search one meeting --target) on a model; save artifact and report in --out."""
    from netshrink.recipe.commands import run

    scripted = for_scripts(quiet, as_json)
    if (recipe is None) == (target is None):
        raise ConfigError("give either a RECIPE or --target (e.g. --target size=10x,max_drop=0.01)")
    inputs = Inputs(
        model_ref=model, weights=weights, data_ref=data, eval_ref=eval_, seed=seed, task=task
    )
    timing = Timing(runtime=runtime, threads=threads, runs=runs)
    if target is not None:
        from netshrink.search.commands import run_auto

        found, paths = run_auto(target, inputs, out, timing, progress=not scripted)
        err().print(found.verdict(), soft_wrap=True)
        if note := found.sensitivity.note():
            err().print(f"not searched: {note}", soft_wrap=True)
        err().print(f"recipe: {paths['recipe']}  Pareto front: {paths['pareto']}")
        _finish_run(found.result, paths, quiet, as_json)
        return
    result, paths = run(recipe, inputs, out, timing, progress=not scripted)
    _finish_run(result, paths, quiet, as_json)


@app.command()
@handles_errors
def analyze(
    model: Annotated[str, typer.Option("--model", help=MODEL_HELP)],
    out: Annotated[Path, typer.Option("--out", help="output folder")] = Path("netshrink-analyze"),
    weights: Annotated[
        Path | None, typer.Option("--weights", help="safetensors state dict for --model")
    ] = None,
    data: DataOpt = None,
    eval_: EvalOpt = None,
    task: TaskOpt = None,
    seed: SeedOpt = 0,
    samples: Annotated[
        int,
        typer.Option(
            min=1, max=1_000_000, help="examples each probe runs: the first validation batches"
        ),
    ] = SAMPLES,
    quiet: QuietOpt = False,
) -> None:
    """Per-layer sensitivity to pruning, weight bits and rank; writes sensitivity.json/.png."""
    from netshrink.search.commands import run_analyze

    for_scripts(quiet, False)
    inputs = Inputs(
        model_ref=model, weights=weights, data_ref=data, eval_ref=eval_, seed=seed, task=task
    )
    start = time.perf_counter()
    sens, paths = run_analyze(inputs, out, progress=not quiet, samples=samples)
    seconds = time.perf_counter() - start
    typer.echo(f"{sens.headline()} ({seconds:.0f} s)")
    typer.echo(f"sensitivity: {paths['json']}\nplot: {paths['plot']}")


DEMO_MODELS = ("digits", "minilm")
"""``netshrink demo --model``: the built-in digits CNN, or the pretrained MiniLM sentence encoder
of the ``netshrink[minilm]`` extra."""


@app.command()
@handles_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="output folder")] = Path("netshrink-demo"),
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="digits: the built-in CNN; minilm: the pretrained MiniLM sentence encoder "
            "(extra netshrink[minilm])",
        ),
    ] = "digits",
    seed: SeedOpt = 0,
    runtime: Annotated[
        str | None,
        typer.Option(
            help=f"where latency is timed (default: {DEMO_RUNTIME} for digits, "
            f"{DEMO_TRANSFORMER_RUNTIME} for minilm)"
        ),
    ] = None,
    threads: Annotated[
        int, typer.Option(min=1, max=MAX_THREADS, help="intra-op threads for timing")
    ] = DEMO_THREADS,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compress a built-in example end to end, offline: the digits CNN (default recipe) or the
    pretrained MiniLM (transformer recipe, evaluated on held-out text)."""
    from netshrink.recipe import DEFAULT, DEMO_MODEL
    from netshrink.recipe.commands import minilm_demo, resolve, run

    if model not in DEMO_MODELS:
        raise ConfigError(f"unknown demo model {model!r}; use one of {', '.join(DEMO_MODELS)}")
    scripted = for_scripts(quiet, as_json)
    minilm = model == "minilm"
    recipe = DEMO_TRANSFORMER_RECIPE if minilm else DEFAULT
    runtime = runtime or (DEMO_TRANSFORMER_RUNTIME if minilm else DEMO_RUNTIME)
    if not scripted:
        say(
            err(),
            f"netshrink demo: recipe {recipe} on {'MiniLM' if minilm else DEMO_MODEL}",
            f"timed on {runtime}",
            plural(threads, "thread"),
        )
    inputs = Inputs(model_ref=None if minilm else DEMO_MODEL, seed=seed)
    timing = Timing(runtime=runtime, threads=threads)
    resolver = minilm_demo if minilm else resolve
    result, paths = run(recipe, inputs, out, timing, progress=not scripted, resolver=resolver)
    _finish_run(result, paths, quiet, as_json)


@app.command()
@handles_errors
def measure(
    target: Annotated[str, typer.Argument(help="artifact folder or zoo:<name>")],
    model: ModelOpt = None,
    data: DataOpt = None,
    eval_: EvalOpt = None,
    task: TaskOpt = None,
    runtime: RuntimeOpt = "eager",
    threads: ThreadsOpt = None,
    runs: RunsOpt = 20,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure a saved artifact or a zoo model: params, MACs, bytes, latency, metric."""
    from netshrink.recipe.commands import measure_target

    for_scripts(quiet, as_json)
    inputs = Inputs(model_ref=model, data_ref=data, eval_ref=eval_, task=task)
    measured = measure_target(target, inputs, Timing(runtime=runtime, threads=threads, runs=runs))
    if as_json:
        print_json(measured.to_dict())
    else:
        out().print(str(measured))


@app.command()
@handles_errors
def export(
    artifact: Annotated[Path, typer.Argument(help="artifact folder (e.g. OUT/model)")],
    onnx: Annotated[Path | None, typer.Option("--onnx", help="ONNX file to write")] = None,
    openvino: Annotated[
        Path | None, typer.Option("--openvino", help="folder for OpenVINO IR model.xml/.bin")
    ] = None,
    hf: Annotated[
        Path | None, typer.Option("--hf", help="folder transformers from_pretrained loads")
    ] = None,
    model: ModelOpt = None,
    task: TaskOpt = None,
) -> None:
    """Export a saved artifact to ONNX, OpenVINO IR and/or a transformers folder."""
    from netshrink.recipe.commands import export_hf, export_onnx, export_openvino

    if onnx is None and openvino is None and hf is None:
        raise ConfigError("give --onnx FILE, --openvino DIR, --hf DIR, or several")
    if onnx is not None:
        out().print(f"onnx: {export_onnx(artifact, onnx, model_ref=model, task=task)}")
    if openvino is not None:
        path = export_openvino(artifact, openvino, model_ref=model, task=task)
        out().print(f"openvino: {path}")
    if hf is not None:
        out().print(f"hf: {export_hf(artifact, hf, model_ref=model, task=task)}")


def main() -> None:
    """Entry point of the ``netshrink`` console script and ``python -m netshrink``.

    The command runs in a watched child process (:mod:`netshrink.supervisor`), so that user code
    ending the process (``os._exit``, ``os.abort``, a signal) is still one error line.
    """
    from netshrink.supervisor import supervise

    raise SystemExit(supervise(_run_app))


def _run_app() -> int:
    """Run the command line; return its exit code.

    A usage error (an unknown verb or option, a value out of its range) is one ``error:`` line
    and exit 2, like every other bad input, instead of click's boxed usage text. An interrupt
    (Ctrl-C; typer turns it into exit code 130) is one ``failed: interrupted`` line and exit 1.
    """
    try:
        code = app(standalone_mode=False)
        if code == INTERRUPTED:
            err().print("[red]failed:[/red] interrupted", soft_wrap=True)
            return 1
    except Exception as exc:
        # typer raises click's exception types, from click or from the copy it vendors: match
        # them by class name rather than by one module's classes
        kinds = {c.__name__ for c in type(exc).__mro__}
        ctx = getattr(exc, "ctx", None)
        if "NoArgsIsHelpError" in kinds:
            print(ctx.get_help() if ctx else str(exc), file=sys.stderr)
        elif "UsageError" in kinds:
            hint = f" (see: {ctx.command_path} --help)" if ctx else ""
            err().print(f"[red]error:[/red] {escape(exc.format_message())}{hint}", soft_wrap=True)
        elif "Abort" in kinds:
            err().print("[red]failed:[/red] interrupted", soft_wrap=True)
            return 1
        else:
            raise
        code = 2
    return code if isinstance(code, int) else 0
