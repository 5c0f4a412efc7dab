"""A hostile user's sweep of the command line: malformed inputs and faults, each in a fresh process.

Not part of ``make test`` (it takes minutes). Every case runs ``python -m netshrink ...`` and is
classified:

- ``clear``: exit 1 or 2, an ``error:`` or ``failed:`` line, no traceback;
- ``traceback``: a Python traceback on stderr;
- ``silent``: exit 0 where an error was due;
- ``crash``: anything else (killed by a signal, another exit code, a hang past the time limit).

Beside that it checks that no user file was lost (each case's folder holds ``precious.txt``, and
a previous run's output where ``--out`` is hit) and records the peak RSS of the process tree
(``wait4``'s ``ru_maxrss``). The kill -9 trials kill a real run at random moments and check that
``--out`` is either the previous run's, untouched, or a complete new one; the concurrency trials
start two runs on one ``--out`` at once.

    PYTHONPATH=src:tests python scripts/hostile_sweep.py [--only kill,race,refs,hf] [--kills 10]

(categories: recipes, artifacts, refs, hf, data, out, kill, race; run in the order given)

Prints one line per case, then the counts and the largest peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
LIMIT_S = 120
ROOT_USER = os.geteuid() == 0
"""root writes into read-only folders: there, those cases must succeed."""
OWN = ".netshrink-"
"""Part of the names of netshrink's lock and staging entries beside an output folder."""
GOOD_RECIPE = "version: 1\nstages:\n  - prune.magnitude: {sparsity: 0.5}\n"
TINY = ["--model", "recipe_fakes:untrained_model", "--data", "recipe_fakes:cli_data"]
FAST = ["--runs", "20", "--threads", "1", "--quiet"]
USER_CODE = """
import ctypes, os, signal, sys
import torch
from torch import nn
import recipe_fakes

def returns_int(): return 3
def returns_none(): return None
def recursion(): return recursion()
def huge(): return torch.empty(10**12)
def sys_exit(): sys.exit(0)
def quits(): quit()
def os_exit(): os._exit(0)
def aborts(): os.abort()
def sigterm(): os.kill(os.getpid(), signal.SIGTERM)
def sigkill(): os.kill(os.getpid(), signal.SIGKILL)
def raise_signal(): signal.raise_signal(signal.SIGINT)
def libc_exit(): ctypes.CDLL(None).exit(0)
def segfault(): ctypes.string_at(0)
def data_list(): return [1, 2, 3]
def data_empty(): return {"train": [], "val": [], "calib": []}
def data_missing(): return {"train": recipe_fakes.cli_data()["train"]}
def _with(**kw): return {**recipe_fakes.cli_data(), **kw}
def data_wrong_shape(): return _with(val=[(torch.randn(8, 9), torch.zeros(8, dtype=torch.long))])
def data_labels(): return _with(val=[(torch.randn(8, 4), torch.full((8,), -1))])
def data_float_labels(): return _with(val=[(torch.randn(8, 4), torch.rand(8, 2, 2))])
def data_int_inputs(): return _with(val=[(torch.ones(8, 4, dtype=torch.long), None)])
def data_os_exit(): os._exit(0)
def data_nested(): return _with(train=[((((torch.randn(8, 4),),),), None)])
def metric_str(model, batches): return "high"
def metric_nan(model, batches): return float("nan")
def metric_raises(model, batches): raise ZeroDivisionError("empty")
def metric_os_exit(model, batches): os._exit(0)
def metric_exit(model, batches): sys.exit(0)
def metric_kill(model, batches): os.kill(os.getpid(), signal.SIGTERM)
class Bad(nn.Module):
    def forward(self, x): os._exit(0)
def forward_exits(): return Bad()
not_callable = 3
"""


@dataclass
class Case:
    """One hostile invocation: ``argv`` after ``python -m netshrink``; ``ok`` means success
    is the right answer (the case checks that nothing breaks, not that it is refused)."""

    category: str
    name: str
    argv: list[str]
    ok: bool = False


@dataclass
class Outcome:
    case: Case
    verdict: str
    code: int
    rss_mb: float
    line: str
    leftovers: list[str]


def run(argv: list[str], cwd: Path, timeout: float = LIMIT_S) -> tuple[int, str, float]:
    """Run ``python -m netshrink argv``; return exit code (-signal), stderr, peak RSS in MiB."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{TESTS}{os.pathsep}{cwd}"}
    env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "netshrink", *argv], cwd=cwd, env=env, stdout=out, stderr=err
        )
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                return -999, "hang", usage.ru_maxrss / 1024
            time.sleep(0.05)
        child.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return child.returncode, err.read().decode(errors="replace"), usage.ru_maxrss / 1024


def classify(case: Case, code: int, stderr: str) -> str:
    if code == -999:
        return "crash"
    if "Traceback" in stderr:
        return "traceback"
    if case.ok:
        return "clear" if code == 0 else "crash"
    if code == 0:
        return "silent"
    said = any(line.startswith(("error:", "failed:")) for line in stderr.splitlines())
    return "clear" if code in (1, 2) and said else "crash"


def tree_digest(folder: Path) -> str:
    """sha256 over the names of every entry below ``folder`` and the bytes of its files (size
    and modification time for files over 1 MiB: this process must stay small, since a child's
    peak RSS starts from its parent's)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if OWN in str(path.relative_to(folder)):
            continue  # netshrink's lock and staging folders: counted apart, as leftovers
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file() and not path.is_symlink():
            info = path.stat()
            big = info.st_size > 2**20
            digest.update(
                f"{info.st_size}:{info.st_mtime_ns}".encode() if big else path.read_bytes()
            )
    return digest.hexdigest()


class Fixtures:
    """What every case starts from, made once in a child process (so that this process, whose
    memory a forked child's peak RSS starts from, stays small): a recipe, weights, a finished
    run, tiny hf folders."""

    def __init__(self, base: Path) -> None:
        self.base = base
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{TESTS}"}
        subprocess.run(
            [sys.executable, __file__, "--make-fixtures", str(base)], env=env, check=True
        )
        self.recipe = base / "good.yaml"
        self.weights = base / "w.safetensors"
        self.run = base / "done"
        start = time.monotonic()
        argv = ["compress", str(self.recipe), *TINY, "--out", str(self.run), *FAST]
        code, stderr, _ = run(argv, base)
        assert code == 0, stderr
        self.run_s = time.monotonic() - start  # the kill trials draw their moments from it
        self.artifact = self.run / "model"
        self.hf, self.hf_cls, self.st = base / "bert", base / "bert-cls", base / "st"

    def copy(self, source: Path, folder: Path, name: str) -> Path:
        target = folder / name
        shutil.copytree(source, target, symlinks=True)
        return target


def make_fixtures(base: Path) -> None:
    """Write the files :class:`Fixtures` names into ``base``."""
    import torch
    from safetensors.torch import save_file

    import hf_fixtures
    import recipe_fakes

    (base / "user_code.py").write_text(USER_CODE)
    (base / "good.yaml").write_text(GOOD_RECIPE)
    state = recipe_fakes.untrained_model().state_dict()
    save_file(state, str(base / "w.safetensors"))
    save_file({"0.weight": torch.zeros(3, 3)}, str(base / "shapes.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, str(base / "n.st"))
    hf_fixtures.model_dir(base / "bert", "bert")
    hf_fixtures.model_dir(base / "bert-cls", "bert-cls")
    hf_fixtures.sentence_transformers_dir(base / "st", {"mean_tokens": True}, True)


def _write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _recipes(fx: Fixtures, d: Path) -> list[Case]:
    texts = {
        "empty": "",
        "not-yaml": "version: 1\nstages: [\n",
        "list": "- 1\n- 2\n",
        "laughs": "a: &a [x,x,x,x,x,x,x,x,x]\n"
        + "".join(
            f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n"
            for p, c in zip("abcdefgh", "bcdefghi", strict=True)
        )
        + "version: 1\nstages: *i\n",
        "deep": "version: 1\nstages: " + "[" * 20000 + "]" * 20000 + "\n",
        "dup-key": "version: 1\nversion: 1\nstages:\n  - prune.magnitude: {sparsity: 0.5}\n",
        "dup-stages": GOOD_RECIPE + "stages: []\n",
        "string-number": "version: 1\nstages:\n  - prune.magnitude: {sparsity: '0.5'}\n",
        "bool-int": "version: 1\nstages:\n  - quantize.qat: {epochs: true}\n",
        "unknown-tech": "version: 1\nstages:\n  - prune.nothing: {}\n",
        "unknown-opt": "version: 1\nstages:\n  - prune.magnitude: {sparsity: 0.5, x: 1}\n",
        "range": "version: 1\nstages:\n  - prune.magnitude: {sparsity: 1.5}\n",
        "nan": "version: 1\nstages:\n  - prune.magnitude: {sparsity: .nan}\n",
        "inf-int": "version: 1\nstages:\n  - quantize.qat: {epochs: .inf}\n",
        "bigint": f"version: 1\nstages:\n  - quantize.qat: {{epochs: {10**100}}}\n",
        "python-tag": "version: 1\nstages: !!python/object/apply:os.system ['echo pwned']\n",
        "version": "version: 2\nstages:\n  - prune.magnitude: {sparsity: 0.5}\n",
        "no-version": "stages:\n  - prune.magnitude: {sparsity: 0.5}\n",
        "no-stages": "version: 1\nstages: []\n",
        "stage-str": "version: 1\nstages:\n  - prune.magnitude\n",
        "stage-two-keys": "version: 1\nstages:\n  - {prune.magnitude: {}, prune.random: {}}\n",
        "many-stages": "version: 1\nstages:\n" + "  - prune.magnitude: {sparsity: 0.1}\n" * 20000,
        "long-description": "version: 1\ndescription: " + "x" * 10_000_000 + "\nstages: []\n",
        "binary": "\x00\x01\x02\xff",
        "tabs": "version: 1\nstages:\n\t- prune.magnitude: {}\n",
        "ckpt-in-file": "version: 1\nstages:\n  - quantize.qat: {epochs: 1, checkpoint_dir: "
        f"{fx.recipe}}}\n",
    }
    cases = []
    for name, text in texts.items():
        path = d / f"{name}.yaml"
        _write(path, text.encode("utf-8", errors="surrogateescape"))
        cases.append(Case("recipes", name, ["compress", str(path), *TINY, "--out", str(d / "o")]))
    fifo = d / "fifo.yaml"
    os.mkfifo(fifo)
    for name, ref in [
        ("missing", d / "nope.yaml"),
        ("folder", d),
        ("fifo", fifo),
        ("dev-zero", Path("/dev/zero")),
        ("builtin-typo", Path("defualt")),
    ]:
        cases.append(Case("recipes", name, ["compress", str(ref), *TINY, "--out", str(d / "o")]))
    return cases


def _manifest_edit(folder: Path, change: Callable[[dict], object]) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    result = change(manifest)
    path.write_text(json.dumps(manifest if result is None else result))


def _grow_shapes(node: object) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "shape" and isinstance(value, list) and value:
                node[key] = [10**6] * len(value)
            else:
                _grow_shapes(value)
    elif isinstance(node, list):
        for value in node:
            _grow_shapes(value)


def _artifacts(fx: Fixtures, d: Path) -> list[Case]:
    broken: dict[str, Callable[[Path], None]] = {
        "no-manifest": lambda a: (a / "manifest.json").unlink(),
        "manifest-not-json": lambda a: _write(a / "manifest.json", "{nope"),
        "manifest-list": lambda a: _write(a / "manifest.json", "[1, 2]"),
        "manifest-deep": lambda a: _write(a / "manifest.json", "[" * 200000 + "]" * 200000),
        "manifest-huge": lambda a: _write(a / "manifest.json", " " * 300_000_000 + "{}"),
        "manifest-fifo": lambda a: ((a / "manifest.json").unlink(), os.mkfifo(a / "manifest.json")),
        "manifest-link": lambda a: (
            (a / "manifest.json").unlink(),
            (a / "manifest.json").symlink_to("/etc/passwd"),
        ),
        "version": lambda a: _manifest_edit(a, lambda m: m.update(format_version=999)),
        "shapes": lambda a: _manifest_edit(a, _grow_shapes),
        "inputs-huge": lambda a: _manifest_edit(
            a,
            lambda m: m["extra"]["provenance"].update(
                inputs=[{"shape": [10**5, 10**5, 10**5], "dtype": "float32"}]
            ),
        ),
        "tensors-truncated": lambda a: _write(
            a / "model.safetensors", (a / "model.safetensors").read_bytes()[:100]
        ),
        "tensors-empty": lambda a: _write(a / "model.safetensors", b""),
        "tensors-flip": lambda a: _write(
            a / "model.safetensors", (a / "model.safetensors").read_bytes()[:-1] + b"\x7f"
        ),
        "tensors-link-out": lambda a: (
            shutil.copy(a / "model.safetensors", a.parent / "outside.safetensors"),
            (a / "model.safetensors").unlink(),
            (a / "model.safetensors").symlink_to(a.parent / "outside.safetensors"),
        ),
        "tensors-folder": lambda a: (
            (a / "model.safetensors").unlink(),
            (a / "model.safetensors").mkdir(),
        ),
    }
    cases = [
        Case("artifacts", "missing", ["measure", str(d / "nope")]),
        Case("artifacts", "a-file", ["measure", str(fx.recipe)]),
        Case("artifacts", "empty", ["measure", str(Path(tempfile.mkdtemp(dir=d)))]),
    ]
    for name, damage in broken.items():
        artifact = fx.copy(fx.artifact, d, name)
        damage(artifact)
        cases.append(Case("artifacts", name, ["measure", str(artifact), *TINY[:2]]))
    blocker = _write(d / "a-file", "x")
    ro = d / "read-only"
    ro.mkdir()
    ro.chmod(0o500)
    for name, flag, target in [
        ("onnx-into-folder", "--onnx", d),
        ("onnx-below-file", "--onnx", blocker / "m.onnx"),
        ("onnx-read-only", "--onnx", ro / "m.onnx"),
        ("onnx-proc", "--onnx", Path("/proc/m.onnx")),
        ("openvino-file", "--openvino", blocker),
        ("openvino-below-file", "--openvino", blocker / "ir"),
        ("openvino-read-only", "--openvino", ro / "ir"),
    ]:
        argv = ["export", str(fx.artifact), flag, str(target), *TINY[:2]]
        cases.append(Case("artifacts", name, argv, ok=name.endswith("read-only") and ROOT_USER))
    cases.append(Case("artifacts", "export-nothing", ["export", str(fx.artifact)]))
    return cases


def _user_code(fx: Fixtures, d: Path) -> list[Case]:
    data, model = TINY[2:], TINY[:2]
    out = ["--out", str(d / "o"), *FAST]
    rec = ["compress", str(fx.recipe)]
    factories = [
        "nosuch.module:f",
        "user_code:nosuch",
        "user_code:not_callable",
        "user_code:returns_int",
        "user_code:returns_none",
        "user_code:recursion",
        "user_code:huge",
        "user_code:sys_exit",
        "user_code:quits",
        "user_code:os_exit",
        "user_code:aborts",
        "user_code:sigterm",
        "user_code:sigkill",
        "user_code:raise_signal",
        "user_code:libc_exit",
        "user_code:segfault",
        "user_code:forward_exits",
        "builtins:quit",
        "os:abort",
        "os:_exit",
        "sys:exit",
        "no-colon",
        "zoo:nosuch",
        ":",
    ]
    cases = [Case("refs", f"model {f}", [*rec, "--model", f, *data, *out]) for f in factories]
    datas = [
        "user_code:data_list",
        "user_code:data_empty",
        "user_code:data_missing",
        "user_code:data_wrong_shape",
        "user_code:data_labels",
        "user_code:data_float_labels",
        "user_code:data_int_inputs",
        "user_code:data_os_exit",
        "user_code:data_nested",
        "user_code:sigkill",
        "zoo:digits-cnn",
    ]
    cases += [Case("refs", f"data {r}", [*rec, *model, "--data", r, *out]) for r in datas]
    metrics = [
        "user_code:metric_str",
        "user_code:metric_nan",
        "user_code:metric_raises",
        "user_code:metric_os_exit",
        "user_code:metric_exit",
        "user_code:metric_kill",
        "user_code:returns_int",
    ]
    cases += [Case("refs", f"eval {r}", [*rec, *TINY, "--eval", r, *out]) for r in metrics]
    bad_weights = {
        "missing": d / "nope.safetensors",
        "garbage": _write(d / "garbage.safetensors", os.urandom(4096)),
        "pickle": _write(d / "w.pt", b"\x80\x04\x95cos\nsystem\n"),
        "folder": d,
    }
    fifo = d / "fifo.safetensors"
    os.mkfifo(fifo)
    bad_weights["fifo"] = fifo
    bad_weights["shapes"] = fx.base / "shapes.safetensors"
    bad_weights["nan"] = fx.base / "n.st"
    for name, path in bad_weights.items():
        argv = [*rec, *TINY, "--weights", str(path), *out]
        cases.append(Case("refs", f"weights {name}", argv))
    options = [
        ["--seed", str(2**70)],
        ["--seed", "-3"],
        ["--threads", "100000"],
        ["--threads", "0"],
        ["--runs", "3"],
        ["--runtime", "cuda"],
        ["--task", "embedding"],
    ]
    for extra in options:
        argv = [*rec, *TINY, "--out", str(d / "o"), *extra]
        cases.append(Case("refs", f"option {' '.join(extra)[:30]}", argv))
    return cases


def _hf(fx: Fixtures, d: Path) -> list[Case]:
    def model_case(name: str, folder: Path | str, *extra: str) -> Case:
        argv = ["compress", str(fx.recipe), "--model", f"hf:{folder}", *extra]
        return Case("hf", name, [*argv, "--out", str(d / "o"), *FAST])

    cases = [model_case("missing", d / "nope"), model_case("empty-ref", "")]
    no_config = fx.copy(fx.hf, d, "no-config")
    (no_config / "config.json").unlink()
    cases.append(model_case("no-config", no_config))
    for name, text in [
        ("config-corrupt", "{corrupt"),
        ("config-list", "[]"),
        ("config-type", '{"model_type": "nosuch"}'),
        ("config-shapes", None),
        ("config-huge-vocab", None),
    ]:
        folder = fx.copy(fx.hf, d, name)
        config = json.loads((folder / "config.json").read_text())
        if name == "config-shapes":
            config["hidden_size"] = 64  # the weights are 32 wide
            text = json.dumps(config)
        elif name == "config-huge-vocab":
            config["vocab_size"] = 10**10
            text = json.dumps(config)
        _write(folder / "config.json", text or "")
        cases.append(model_case(name, folder))
    linked = fx.copy(fx.hf, d, "weights-link-out")
    shutil.move(linked / "model.safetensors", d / "outside.safetensors")
    (linked / "model.safetensors").symlink_to(d / "outside.safetensors")
    cases.append(model_case("weights-link-out", linked))
    garbage = fx.copy(fx.hf, d, "weights-garbage")
    _write(garbage / "model.safetensors", os.urandom(2048))
    cases.append(model_case("weights-garbage", garbage))
    for name, pooling in [
        ("pooling-corrupt", "{not json"),
        ("pooling-list", "[1]"),
        ("pooling-none", '{"pooling_mode_mean_tokens": false}'),
        ("pooling-unknown", '{"pooling_mode_weightedmean_tokens": true}'),
    ]:
        folder = fx.copy(fx.st, d, name)
        _write(folder / "1_Pooling" / "config.json", pooling)
        cases.append(model_case(name, folder))
    modules = fx.copy(fx.st, d, "modules-corrupt")
    _write(modules / "modules.json", '{"a": 1}')
    cases.append(model_case("modules-corrupt", modules))
    no_tok = fx.copy(fx.hf, d, "no-tokenizer")
    for f in no_tok.iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            f.unlink()
    cases.append(model_case("no-tokenizer", no_tok))
    bad_tok = fx.copy(fx.hf, d, "tokenizer-corrupt")
    for f in bad_tok.iterdir():
        if f.name.startswith("tokenizer"):
            _write(f, "{broken")
    cases.append(model_case("tokenizer-corrupt", bad_tok))
    for task in ("nosuch", "", "causal-lm", "classification"):
        cases.append(model_case(f"task {task!r}", fx.hf, "--task", task))
    return cases


def _text_case(fx: Fixtures, d: Path, name: str, path: Path) -> Case:
    model = fx.hf_cls if "label" in name else fx.hf
    argv = ["compress", str(fx.recipe), "--model", f"hf:{model}", "--data", f"text:{path}"]
    return Case("data", name, [*argv, "--out", str(d / "o"), *FAST])


def _text(fx: Fixtures, d: Path) -> list[Case]:
    good = "\n".join(f"sentence number {i} of the data" for i in range(40))
    files: dict[str, bytes] = {
        "empty.txt": b"",
        "blank.txt": b"\n\n  \n",
        "binary.txt": os.urandom(65536),
        "nul.txt": good.encode().replace(b"number", b"num\x00ber"),
        "latin1.txt": "café olé\n".encode("latin-1") * 40,
        "few.txt": b"one\ntwo\n",
        "bad.jsonl": b"{not json}\n",
        "types.jsonl": b'{"text": 5}\n' * 40,
        "no-text.jsonl": b'{"label": 1}\n' * 40,
        "label-range.jsonl": "".join(
            json.dumps({"text": f"text {i}", "label": 7}) + "\n" for i in range(40)
        ).encode(),
        "label-negative.jsonl": "".join(
            json.dumps({"text": f"text {i}", "label": -1}) + "\n" for i in range(40)
        ).encode(),
        "label-float.jsonl": "".join(
            json.dumps({"text": f"text {i}", "label": 0.5}) + "\n" for i in range(40)
        ).encode(),
        "label-some.jsonl": "".join(
            json.dumps({"text": f"text {i}"} | ({"label": 1} if i % 2 else {})) + "\n"
            for i in range(40)
        ).encode(),
        "list.jsonl": b"[1, 2]\n" * 40,
        "deep.jsonl": b"[" * 100000 + b"]" * 100000 + b"\n",
    }
    cases = [_text_case(fx, d, name, _write(d / name, data)) for name, data in files.items()]
    long_line = d / "long-line.txt"
    with long_line.open("wb") as f:
        for _ in range(100):
            f.write(b"word " * 200_000)  # one 100 MB line, written a MB at a time
    cases.append(_text_case(fx, d, "long-line", long_line))
    sparse = d / "gigabyte.txt"
    with sparse.open("wb") as f:
        f.truncate(2**30)  # a 1 GiB line of NUL bytes, taking no disk
    fifo = d / "fifo.txt"
    os.mkfifo(fifo)
    for name, path in [
        ("gigabyte-line", sparse),
        ("missing", d / "nope.txt"),
        ("folder", d),
        ("fifo", fifo),
    ]:
        cases.append(_text_case(fx, d, name, path))
    argv = ["compress", str(fx.recipe), *TINY[:2], "--data", f"text:{d / 'few.txt'}"]
    cases.append(Case("data", "text-for-non-hf", [*argv, "--out", str(d / "o")]))
    return cases


def _outdirs(fx: Fixtures, d: Path) -> list[Case]:
    blocker = _write(d / "a-file", "x")
    ro = d / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    user = d / "user-folder"
    user.mkdir()
    _write(user / "thesis.tex", "mine")
    link = d / "link"
    link.symlink_to(user)
    previous = fx.copy(fx.run, d, "previous")
    _write(previous / "notes.txt", "mine too")
    targets = {
        "a-file": blocker,
        "below-a-file": blocker / "out",
        "read-only": ro / "out",
        "user-files": user,
        "symlink": link,
        "dev-null": Path("/dev/null"),
        "proc": Path("/proc/out"),
        "long-name": d / ("n" * 300),
        "previous-plus-user-file": previous,
        "cwd": Path("."),
        "root": Path("/"),
    }
    cases = []
    for name, target in targets.items():
        argv = ["compress", str(fx.recipe), *TINY, "--out", str(target), *FAST]
        cases.append(Case("out", name, argv, ok=name == "read-only" and ROOT_USER))
    return cases


def run_cases(cases: list[Case], work: Path) -> list[Outcome]:
    outcomes = []
    for case in cases:
        digest = tree_digest(work)
        code, stderr, rss = run(case.argv, work)
        verdict = classify(case, code, stderr)
        if tree_digest(work) != digest and not case.ok:
            verdict = "lost-files" if verdict == "clear" else verdict
        lines = [s for s in stderr.splitlines() if s.strip()]
        left = sorted(p.name for p in work.iterdir() if OWN in p.name)
        outcome = Outcome(case, verdict, code, rss, (lines[-1] if lines else "")[:150], left)
        shown = f" [left: {', '.join(left)}]" if left else ""
        print(
            f"{verdict:10} {code:4} {rss:7.0f}MB {case.category}/{case.name}: {outcome.line}{shown}"
        )
        sys.stdout.flush()
        outcomes.append(outcome)
        shutil.rmtree(work / "o", ignore_errors=True)
        for name in left:  # so that the next case starts clean
            if (work / name).is_dir():
                shutil.rmtree(work / name)
            else:
                (work / name).unlink()
    return outcomes


def _complete(out: Path) -> bool:
    marker = out / ".netshrink-run.json"
    if not marker.is_file():
        return False
    files = json.loads(marker.read_text())["files"]
    return set(files) == set(os.listdir(out)) - {marker.name} and (out / "report.json").is_file()


def kill_trials(fx: Fixtures, base: Path, trials: int, seed: int) -> list[str]:
    """kill -9 a run over a previous one at random moments; ``--out`` must be the previous
    run's, untouched, or a complete new one. Returns one verdict per trial."""
    rng = random.Random(seed)
    verdicts = []
    for trial in range(trials):
        out = fx.copy(fx.run, base, f"kill{trial}")
        before = tree_digest(out)
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{TESTS}"}
        argv = ["compress", str(fx.recipe), *TINY, "--out", str(out), *FAST]
        child = subprocess.Popen(
            [sys.executable, "-m", "netshrink", *argv],
            cwd=base,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        moment = rng.uniform(0.5, 1.1 * fx.run_s)  # from start-up to past the swap
        time.sleep(moment)
        child.send_signal(signal.SIGKILL)
        child.wait()
        time.sleep(0.2)
        same = out.is_dir() and tree_digest(out) == before
        verdict = "as-it-was" if same else ("complete" if _complete(out) else "BROKEN")
        code, stderr, _ = run(argv, base)  # the next run must work
        verdict += "" if code == 0 else f" then rerun failed: {stderr.strip()[-200:]}"
        print(f"kill trial {trial} at {moment:.1f} s of {fx.run_s:.1f} s: {verdict}")
        verdicts.append(verdict)
    return verdicts


def concurrency_trials(fx: Fixtures, base: Path, trials: int) -> list[str]:
    """Two runs on one ``--out`` at once: each either finishes or is refused, and ``--out`` ends
    complete."""
    verdicts = []
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{TESTS}"}
    for trial in range(trials):
        out = base / f"both{trial}"
        argv = ["compress", str(fx.recipe), *TINY, "--out", str(out), *FAST]
        children = [
            subprocess.Popen(
                [sys.executable, "-m", "netshrink", *argv],
                cwd=base,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for _ in range(2)
        ]
        results = [
            (c.wait(LIMIT_S), c.stderr.read().decode() if c.stderr else "") for c in children
        ]
        codes = sorted(code for code, _ in results)
        refused = all("in use" in e for code, e in results if code == 2)
        ok = codes in ([0, 0], [0, 2]) and refused and _complete(out)
        verdict = f"{'ok' if ok else 'BROKEN'} exit codes {codes}"
        print(f"concurrency trial {trial}: {verdict}")
        verdicts.append(verdict)
    return verdicts


CATEGORIES: dict[str, Callable[[Fixtures, Path], list[Case]]] = {
    "recipes": _recipes,
    "artifacts": _artifacts,
    "refs": _user_code,
    "hf": _hf,
    "data": _text,
    "out": _outdirs,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated categories (default: all)")
    parser.add_argument("--kills", type=int, default=10, help="kill -9 trials")
    parser.add_argument("--races", type=int, default=3, help="concurrency trials")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--make-fixtures", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_fixtures:
        make_fixtures(args.make_fixtures)
        return
    chosen = [c for c in args.only.split(",") if c] or [*CATEGORIES, "kill", "race"]
    base = Path(tempfile.mkdtemp(prefix="netshrink-sweep-"))
    outcomes: list[Outcome] = []
    kills: list[str] = []
    races: list[str] = []
    try:
        fx = Fixtures(base)
        for name in chosen:  # in the order given
            if name == "kill":
                kills = kill_trials(fx, base, args.kills, args.seed)
            elif name == "race":
                races = concurrency_trials(fx, base, args.races)
            else:
                work = base / name
                work.mkdir()
                shutil.copy(base / "user_code.py", work)
                _write(work / "precious.txt", "a user's file")
                outcomes += run_cases(CATEGORIES[name](fx, work), work)
    finally:
        for path in base.rglob("*"):
            if path.is_dir() and not path.is_symlink():
                path.chmod(path.stat().st_mode | stat.S_IWUSR | stat.S_IXUSR)
        shutil.rmtree(base, ignore_errors=True)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.verdict] = counts.get(o.verdict, 0) + 1
    peak = max((o.rss_mb for o in outcomes), default=0.0)
    print(f"\n{len(outcomes)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"peak RSS while rejecting: {peak:.0f} MiB")
    left = [o for o in outcomes if o.leftovers]
    print(f"cases leaving netshrink's lock or staging entries beside --out: {len(left)}")
    if kills:
        good = sum(not v.startswith("BROKEN") and "rerun failed" not in v for v in kills)
        print(f"kill -9 trials: {good} of {len(kills)} left --out as it was or complete")
    if races:
        print(f"concurrency trials: {sum(v.startswith('ok') for v in races)} of {len(races)} ok")


if __name__ == "__main__":
    main()
