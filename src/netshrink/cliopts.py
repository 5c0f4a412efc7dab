"""What every ``netshrink`` verb shares: its consoles, its common options, and how errors become
one line and an exit code (2 for bad input, 1 for any other failure)."""

from __future__ import annotations

import functools
import json
import os
import traceback
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from netshrink import progress
from netshrink.errors import InputError, NetshrinkError
from netshrink.quote import excerpt


def out() -> Console:
    """A console on stdout: ``$COLUMNS`` or the terminal's width, else 160 columns when stdout
    is not a terminal (a log file), so the stage table keeps all its columns."""
    console = Console(highlight=False)
    if console.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        return console
    return Console(highlight=False, width=160)


def err() -> Console:
    """A console on stderr, for errors and notices."""
    return Console(stderr=True, highlight=False)


F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="end stdout with one JSON object")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars, headline only")]
MAX_SEED = 2**32 - 1
"""Largest seed: numpy's generators take seeds below 2**32."""
INTERRUPTED = 130
"""The exit code typer gives a command interrupted by Ctrl-C (128 + SIGINT)."""
MAX_THREADS = (os.cpu_count() or 1) * 4
"""Most intra-op threads accepted: more only oversubscribes the cores (and can exhaust memory)."""
SeedOpt = Annotated[int, typer.Option(min=0, max=MAX_SEED, help="seed of every random choice")]
RunsOpt = Annotated[int, typer.Option(min=20, max=100000, help="timed runs per latency median")]
RuntimeOpt = Annotated[
    str,
    typer.Option(
        help="where latency is timed: eager, onnxruntime, openvino (its default precision, "
        "bf16 on bf16 CPUs) or openvino-f32"
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(min=1, max=MAX_THREADS, help="intra-op threads for timing (default: torch's)"),
]
MODEL_HELP = "zoo:<name>, hf:<folder> or pkg.module:factory"
ModelOpt = Annotated[str | None, typer.Option("--model", help=MODEL_HELP)]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="pkg.module:function -> {train, val, calib[, test]}, or text:<file> for an hf: "
        "model (default: zoo data, or the built-in text corpus)",
    ),
]
TaskOpt = Annotated[
    str | None,
    typer.Option(
        "--task", help="hf: model task: embedding, classification, causal-lm, masked-lm (inferred)"
    ),
]
EvalOpt = Annotated[
    str | None, typer.Option("--eval", help="pkg.module:metric(model, batches) -> float")
]


def handles_errors(fn: F) -> F:
    """Map netshrink errors to an ``error:`` line and exit code 2 (bad input) or 1 (failure)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            debug_traceback(exc)
            err().print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(2) from None
        except NetshrinkError as exc:
            debug_traceback(exc)
            err().print(f"[red]failed:[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(1) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # a bug or the system (memory, disk): still one line
            debug_traceback(exc)
            err().print(
                f"[red]failed:[/red] {type(exc).__name__}: {escape(excerpt(str(exc)))} "
                "(--debug shows the traceback)",
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


class BeforeVerb:
    """Options given before the verb, for the whole invocation."""

    debug = False


def debug_traceback(exc: BaseException) -> None:
    """With ``--debug``, print ``exc``'s traceback (the user's code's, for a UserCodeError)."""
    if BeforeVerb.debug:
        traceback.print_exception(exc)


def for_scripts(quiet: bool, as_json: bool) -> bool:
    """Turn progress bars off for ``--quiet``/``--json``; return whether output is for scripts."""
    progress.set_enabled(not (quiet or as_json))
    return quiet or as_json


def print_json(data: dict[str, Any]) -> None:
    print(json.dumps(data, default=str))
