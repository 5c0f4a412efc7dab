"""Built-in English text that every Python installation carries, for examples, tests and benchmarks.

- :func:`stdlib_corpus`: paragraphs of the docstrings of a fixed list of pure-Python standard
  library modules, read with :mod:`ast` (nothing is imported or run). Text to calibrate,
  fine-tune and distil on.
- :func:`stdlib_training_corpus`: a larger and more varied training text, about 12,400 texts:
  the prose paragraphs of the docstrings of every standard-library module (test packages and
  ``pydoc_data``, the held-out source, left out), and each paragraph's sentences as texts of
  their own. Distilling a 3-layer MiniLM on it instead of :func:`stdlib_corpus` lifts held-out
  fidelity (docs/benchmarks/distill.md).
- :func:`package_training_corpus`: more training text of another register, about 72,000
  texts on netshrink's pinned environment: the docstring paragraphs and sentences of installed
  third-party packages (``DOC_PACKAGES``: numpy, scipy, scikit-learn, ...), none of the other
  two corpora's texts. It depends on the installed versions (deterministic given them).
- :func:`heldout_corpus`: paragraphs of the language reference that ships as
  ``pydoc_data.topics`` (the text ``help("if")`` shows): a different source — reference prose
  rather than API docstrings — for measuring fidelity on text no technique has seen. Any
  paragraph that also occurs in the docstring corpus is dropped.

Both clean and filter the same way (one paragraph = one text, whitespace collapsed; prose only:
a capitalised sentence ending in a full stop, mostly letters, no code), drop duplicates, and
order the texts by their SHA-256 so any prefix mixes every source. They are the same on every
run of one Python version; another version's standard library gives other texts.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

from netshrink.errors import ConfigError

DOCSTRING_MODULES = (
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "difflib",
    "enum",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "hmac",
    "imaplib",
    "inspect",
    "ipaddress",
    "locale",
    "logging",
    "mailbox",
    "mimetypes",
    "netrc",
    "numbers",
    "optparse",
    "pathlib",
    "pdb",
    "pickle",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "queue",
    "random",
    "reprlib",
    "sched",
    "selectors",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "ssl",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "turtle",
    "typing",
    "unittest",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "zipfile",
)
"""Standard-library modules whose docstrings make :func:`stdlib_corpus`, in reading order."""

MIN_CHARS, MAX_CHARS, MIN_WORDS = 40, 400, 6
_SKIPPED_PACKAGES = frozenset(
    {"test", "tests", "idle_test", "pydoc_data", "site-packages", "dist-packages"}
)
"""Folders of the standard library :func:`stdlib_training_corpus` does not read: test suites,
the held-out corpus's source, and installed third-party packages (machine-dependent)."""
DOC_PACKAGES = (
    "numpy",
    "scipy",
    "sklearn",
    "networkx",
    "matplotlib",
    "sympy",
    "transformers",
    "torch",
)
"""Third-party packages whose docstrings :func:`package_training_corpus` reads when installed."""
_SKIPPED_PACKAGE_PARTS = frozenset({"test", "tests", "testing", "_vendor", "vendored"})
_SENTENCE_END = re.compile(r"(?<=\.)\s+(?=[A-Z])")
_PROSE = re.compile(r"[A-Za-z ,.;'()-]")


def is_prose(text: str) -> bool:
    """Whether a cleaned paragraph reads as an English sentence rather than code or a list."""
    return (
        MIN_CHARS <= len(text) <= MAX_CHARS
        and text[0].isupper()
        and text.endswith(".")
        and len(text.split()) >= MIN_WORDS
        and ">>>" not in text
        and len(_PROSE.findall(text)) >= 0.95 * len(text)
    )


def paragraphs(text: str) -> Iterator[str]:
    """The blank-line separated paragraphs of ``text`` that are prose, whitespace collapsed."""
    for block in re.split(r"\n\s*\n", text):
        cleaned = " ".join(block.split())
        if cleaned and is_prose(cleaned):
            yield cleaned


def _module_source(name: str) -> Path | None:
    root = Path(sysconfig.get_paths()["stdlib"])
    for candidate in (root / f"{name}.py", root / name / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _docstrings(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def _unique_by_hash(texts: Iterable[str], exclude: frozenset[str] = frozenset()) -> tuple[str, ...]:
    unique = {t for t in texts if t not in exclude}
    return tuple(sorted(unique, key=lambda t: hashlib.sha256(t.encode()).digest()))


@lru_cache(maxsize=1)
def _stdlib_texts() -> tuple[str, ...]:
    sources = [p for name in DOCSTRING_MODULES if (p := _module_source(name))]
    return _unique_by_hash(
        para for p in sources for doc in _docstrings(p) for para in paragraphs(doc)
    )


@lru_cache(maxsize=1)
def _heldout_texts() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    texts = (para for key in sorted(topics) for para in paragraphs(topics[key]))
    return _unique_by_hash(texts, exclude=frozenset(_stdlib_texts()))


def _all_module_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [
        p
        for p in sorted(root.rglob("*.py"))
        if not _SKIPPED_PACKAGES.intersection(p.relative_to(root).parts)
    ]


def _readable_docstrings(path: Path) -> Iterator[str]:
    try:
        yield from _docstrings(path)
    except (SyntaxError, ValueError):  # a few modules are templates or not UTF-8
        return


def sentences(paragraph: str) -> list[str]:
    """The sentences of a prose paragraph (split after a full stop before a capital) of at
    least ``MIN_WORDS`` words."""
    return [s for s in _SENTENCE_END.split(paragraph) if len(s.split()) >= MIN_WORDS]


def _docstring_units(sources: Iterable[Path]) -> set[str]:
    """The prose paragraphs of the docstrings in ``sources``, and each paragraph's sentences."""
    paras = {
        para for path in sources for doc in _readable_docstrings(path) for para in paragraphs(doc)
    }
    return paras | {s for para in paras for s in sentences(para)}


@lru_cache(maxsize=1)
def _training_texts() -> tuple[str, ...]:
    return _unique_by_hash(
        _docstring_units(_all_module_sources()), exclude=frozenset(_heldout_texts())
    )


def _package_sources(root: Path, packages: Iterable[str]) -> list[Path]:
    return [
        path
        for name in packages
        for path in sorted((root / name).rglob("*.py"))
        if not _SKIPPED_PACKAGE_PARTS.intersection(path.relative_to(root).parts)
    ]


@lru_cache(maxsize=2)
def _package_texts(root: Path, packages: tuple[str, ...]) -> tuple[str, ...]:
    heldout = set(_heldout_texts())
    held_sentences = {s for para in heldout for s in sentences(para)}
    exclude = frozenset(heldout | held_sentences | set(_training_texts()))
    return _unique_by_hash(_docstring_units(_package_sources(root, packages)), exclude=exclude)


def _take(texts: tuple[str, ...], n: int | None, what: str) -> list[str]:
    if n is not None and not 0 < n <= len(texts):
        raise ConfigError(
            f"{what} has {len(texts)} texts on this Python; ask for 1..{len(texts)}, not {n}"
        )
    return list(texts if n is None else texts[:n])


def stdlib_corpus(n: int | None = None) -> list[str]:
    """The first ``n`` (all when None) texts of the standard-library docstring corpus."""
    return _take(_stdlib_texts(), n, "the docstring corpus")


def heldout_corpus(n: int | None = None) -> list[str]:
    """The first ``n`` (all when None) texts of the held-out language-reference corpus."""
    return _take(_heldout_texts(), n, "the held-out corpus")


def stdlib_training_corpus(n: int | None = None) -> list[str]:
    """The first ``n`` (all when None) texts of the larger docstring corpus: paragraphs and
    sentences of every standard-library module's docstrings, none of the held-out texts."""
    return _take(_training_texts(), n, "the docstring training corpus")


def package_training_corpus(
    n: int | None = None, packages: Iterable[str] = DOC_PACKAGES, root: Path | None = None
) -> list[str]:
    """The first ``n`` (all when None) texts of the docstrings of installed third-party
    packages: paragraphs and sentences, as :func:`stdlib_training_corpus` takes them.

    ``packages`` are top-level package folders under ``root`` (default: this environment's
    site-packages); missing ones are skipped, test folders and vendored code are not read.
    The texts depend on the installed versions, so they are the same on every run of one
    environment. No text of :func:`stdlib_training_corpus` and no held-out paragraph or
    sentence of one is included. Raises :class:`ConfigError` when ``n`` exceeds the texts found.
    """
    base = Path(sysconfig.get_paths()["purelib"]) if root is None else root
    return _take(_package_texts(base, tuple(packages)), n, "the package docstring corpus")
