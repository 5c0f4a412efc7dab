"""Hostile hf: folders and text: files: each is one clear error, decided without reading a
whole oversized file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hf_fixtures import model_dir
from netshrink.errors import DataError, ModelReferenceError
from netshrink.hf import load_model, load_tokenizer, read_texts
from netshrink.hf.text import MAX_LINE_BYTES


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_dir(tmp_path_factory.mktemp("bert"), "bert")


def copy_of(folder: Path, target: Path) -> Path:
    target.mkdir()
    for f in folder.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("nul.txt", b"one\ntw\x00o\n", "line 2 holds a NUL byte"),
        ("latin.txt", "ok\ncaf\u00e9\n".encode("latin-1"), "line 2 is not UTF-8 text"),
        ("bom.txt", b"\xef\xbb\xbfone\n", None),
        ("neg.jsonl", b'{"text": "a", "label": -1}\n', "label -1 is not an integer class"),
        ("big.jsonl", b'{"text": "a", "label": 1e40}\n', "is not an integer class"),
        ("huge.jsonl", b'{"text": "a", "label": 99999999999999999999}\n', "not an integer"),
        ("deep.jsonl", b"[" * 100000 + b"]" * 100000 + b"\n", "line 1 is not JSON"),
        ("list.jsonl", b"[1, 2]\n", 'line 1 has no "text"'),
    ],
)
def test_malformed_text_files(tmp_path: Path, name: str, content: bytes, message: str | None):
    (tmp_path / name).write_bytes(content)
    if message is None:
        assert read_texts(tmp_path / name) == (["one"], None)  # a byte-order mark is no text
        return
    with pytest.raises(DataError, match=message):
        read_texts(tmp_path / name)


def test_an_endless_line_is_refused_after_one_mebibyte(tmp_path: Path) -> None:
    sparse = tmp_path / "gigabyte.txt"
    with sparse.open("wb") as f:
        f.truncate(2**30)  # 1 GiB of NUL bytes, no disk used: reading it whole would take 1 GiB
    with pytest.raises(DataError, match="holds 1024 MiB; netshrink reads at most 256 MiB"):
        read_texts(sparse)
    with sparse.open("wb") as f:
        f.truncate(200 * 2**20)  # under the file cap: the line cap stops the reading
    with pytest.raises(DataError, match="line 1 is longer than 1 MiB"):
        read_texts(sparse)
    (tmp_path / "long.txt").write_bytes(b"w" * (MAX_LINE_BYTES + 1))
    with pytest.raises(DataError, match="line 1 is longer than 1 MiB"):
        read_texts(tmp_path / "long.txt")


def test_folders_and_fifos_are_not_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.txt")
    for path in (tmp_path, tmp_path / "fifo.txt"):
        with pytest.raises(DataError, match="is not a regular file"):
            read_texts(path)


def test_a_weights_link_out_of_the_folder_is_refused(tmp_path: Path, bert_dir: Path) -> None:
    folder = copy_of(bert_dir, tmp_path / "linked")
    (folder / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (folder / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ModelReferenceError, match="outside the model folder"):
        load_model(f"hf:{folder}")


def test_a_hub_cache_snapshot_keeps_its_links(tmp_path: Path, bert_dir: Path) -> None:
    repo = tmp_path / "models--org--bert"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for f in bert_dir.iterdir():
        (repo / "blobs" / f.name).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    assert load_model(f"hf:{snapshot}").task == "embedding"


def test_weights_of_other_shapes_and_missing_heads_are_refused(
    tmp_path: Path, bert_dir: Path
) -> None:
    wide = copy_of(bert_dir, tmp_path / "wide")
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ModelReferenceError, match="cannot load its weights"):
        load_model(f"hf:{wide}")
    (wide / "model.safetensors").write_bytes(b"\x08" + b"\0" * 200)
    with pytest.raises(ModelReferenceError, match="cannot load its weights"):
        load_model(f"hf:{wide}")
    with pytest.raises(ModelReferenceError, match=r"weights lack \d+ tensors of the causal-lm"):
        load_model(f"hf:{bert_dir}", task="causal-lm")


def test_a_folder_without_tokenizer_files_is_refused(tmp_path: Path, bert_dir: Path) -> None:
    folder = copy_of(bert_dir, tmp_path / "notok")
    for f in folder.iterdir():
        if f.name.startswith("tokenizer") or f.name == "vocab.txt":
            f.unlink()
    with pytest.raises(ModelReferenceError, match="its tokenizer knows no words"):
        load_tokenizer(f"hf:{folder}")


def test_a_config_too_large_for_memory_is_refused_before_allocating(
    tmp_path: Path, bert_dir: Path
) -> None:
    from netshrink.hf import fresh_model

    folder = copy_of(bert_dir, tmp_path / "huge")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 10**10}))
    with pytest.raises(ModelReferenceError, match=r"describes a model of \d+\.\d GiB"):
        fresh_model(f"hf:{folder}")
    assert fresh_model(f"hf:{bert_dir}").task == "embedding"
