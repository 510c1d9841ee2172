"""Received data files run no code and prepare deletes nothing it did not write.

CIFAR-10: a crafted `cifar-10-python.tar.gz` (or extracted dir) whose pickle would create a marker file is
refused with one line by the data module and by the training command, and the marker never appears; what
unpickles must be uint8 images and integer labels. Prepare: an output dir holding anything prepare did not
write (a user's file, a foreign dir, a run dir) is refused with one line, force or not, and left as it was; a
crafted meta.json is one line, never a KeyError, an object dtype or a read outside the dir.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import TINY_LM, compose

from llmtrain.data import publish
from llmtrain.data.base import build_data
from llmtrain.data.images import ImageDataConfig
from llmtrain.data.prepared import prepare
from llmtrain.data.shards import VERIFIED, load_prepared, read_meta
from llmtrain.data.text import TextDataConfig, TextDataModule
from llmtrain.errors import ConfigError

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


# --- CIFAR-10 -------------------------------------------------------------------------------------------
class SystemPayload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.marker}",)


class OpenPayload:
    """Unpickling this creates <marker> with open(..., "w")."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol 2 as Python 2 wrote the official archive: bytes are Python 2 strings (BINSTRING)."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj: Any) -> bytes:
    """`obj` pickled like the official CIFAR-10 batches: protocol 2, Python 2 strings, numpy.core names."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct")


def good_batches(n: int = 3) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The six batches and batches.meta (n images each, 2 in test_batch); (blobs, train x, train y)."""
    g = np.random.default_rng(0)
    blobs: dict[str, Any] = {}
    for name in BATCHES:
        k = 2 if name == "test_batch" else n
        blobs[name] = {b"batch_label": name.encode(), b"labels": g.integers(0, 10, size=k).tolist(),
                       b"data": g.integers(0, 256, size=(k, 3072), dtype=np.uint8),
                       b"filenames": [f"{i}.png".encode() for i in range(k)]}
    blobs["batches.meta"] = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    x = np.concatenate([blobs[b][b"data"] for b in BATCHES[:5]])
    y = np.concatenate([blobs[b][b"labels"] for b in BATCHES[:5]])
    return blobs, x, y


def write_archive(root: Path, blobs: dict[str, Any]) -> Path:
    """cifar-10-python.tar.gz in the official layout; a bytes value is written as is (a crafted pickle)."""
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, obj in blobs.items():
            raw = obj if isinstance(obj, bytes) else py2_pickle(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return archive


def write_extracted(root: Path, blobs: dict[str, Any]) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name, obj in blobs.items():
        (d / name).write_bytes(obj if isinstance(obj, bytes) else py2_pickle(obj))
    return d


def attempt(path: Path) -> ConfigError | None:
    """The ConfigError of building the image data module from `path`; None when it builds."""
    try:
        build_data(ImageDataConfig(path=str(path)))
    except ConfigError as e:
        return e
    return None


def refused(path: Path) -> ConfigError:
    err = attempt(path)
    assert err is not None and err.key == "data.path" and "\n" not in str(err), err
    return err


def test_official_format_archive_and_dir_load(tmp_path: Path) -> None:
    blobs, x, y = good_batches()
    raw = py2_pickle(blobs["data_batch_1"])
    assert b"numpy.core.multiarray\n_reconstruct" in raw and pickle.SHORT_BINSTRING + bytes([4]) + b"data" in raw
    archive = write_archive(tmp_path, blobs)
    extracted = write_extracted(tmp_path / "x", blobs)
    for path in (archive, extracted, extracted.parent):
        dm = build_data(ImageDataConfig(path=str(path)))
        assert (len(dm.split("train")), len(dm.split("val"))) == (15, 2)
        assert dm.info.classes == [f"class{i}" for i in range(10)]
        train = dm.split("train")
        assert np.array_equal(train.x.numpy(), x.reshape(15, 3, 32, 32)) and train.x.numpy().dtype == np.uint8
        assert np.array_equal(train.y.numpy(), y) and train.y.numpy().dtype == np.int64
        assert dm.split("val").y.tolist() == blobs["test_batch"][b"labels"]


@pytest.mark.parametrize("payload", [SystemPayload, OpenPayload])
def test_crafted_archive_runs_no_code(tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "pwned"
    blobs, _, _ = good_batches()
    blobs["data_batch_1"] = {b"data": payload(marker), b"labels": [0]}
    archive = write_archive(tmp_path, blobs)
    err = attempt(archive)
    assert not marker.exists()
    assert err is not None and err.key == "data.path" and "\n" not in str(err), err
    assert "member cifar-10-batches-py/data_batch_1 is refused: its pickle names '" in err.message
    assert "which could run code" in err.message and str(archive) in err.message
    if payload is SystemPayload:
        assert "'posix.system'" in err.message or "'nt.system'" in err.message


def test_crafted_archive_through_the_training_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llmtrain.train import run

    marker = tmp_path / "pwned"
    blobs, _, _ = good_batches()
    blobs["data_batch_3"] = {b"data": SystemPayload(marker), b"labels": [0]}
    archive = write_archive(tmp_path, blobs)
    capsys.readouterr()
    cfg = compose(["experiment=cnn_images", f"data.path={archive}", "logger.progress=false",
                   f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as ex:
        run(cfg, tmp_path / "run")
    assert not marker.exists()
    assert ex.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llmtrain: error: data.path: {archive} member "
                                                   "cifar-10-batches-py/data_batch_3 is refused: "), lines


def test_crafted_extracted_dir_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    blobs, _, _ = good_batches()
    blobs["test_batch"] = py2_pickle({b"data": np.zeros((1, 3072), np.uint8), b"labels": [SystemPayload(marker)]})
    d = write_extracted(tmp_path, blobs)
    err = attempt(d.parent)
    assert not marker.exists()
    assert err is not None and f"{d / 'test_batch'} is refused: its pickle names '" in err.message, err


def test_object_arrays_and_other_contents_are_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    obj = np.empty((2, 3072), dtype=object)
    obj[:] = 7
    cases = {  # what data_batch_2 holds -> words of the refusal
        "objects": ({b"data": obj, b"labels": [1, 2]}, "dtype object"),
        "payload in an object array": ({b"data": np.array([SystemPayload(marker)] * 3072, dtype=object)
                                        .reshape(1, 3072), b"labels": [1]}, "is refused"),
        "float images": ({b"data": np.zeros((2, 3072), np.float32), b"labels": [1, 2]}, "dtype float32"),
        "wrong width": ({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}, "3072 columns"),
        "labels out of range": ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}, "labels"),
        "string labels": ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"a", b"b"]}, "labels"),
        "float labels": ({b"data": np.zeros((2, 3072), np.uint8), b"labels": np.zeros(2)}, "labels"),
        "count mismatch": ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "1 labels for 2 images"),
        "not a dict": ([1, 2, 3], "a list, not a dict"),
    }
    for case, (blob, words) in cases.items():
        blobs, _, _ = good_batches()
        blobs["data_batch_2"] = blob
        err = refused(write_archive(tmp_path, blobs))
        assert not marker.exists() and "data_batch_2" in err.message and words in err.message, (case, err.message)
    blobs, _, _ = good_batches()
    blobs["batches.meta"] = {b"label_names": np.empty(10, dtype=object)}
    err = refused(write_archive(tmp_path, blobs))
    assert "batches.meta" in err.message and "label_names" in err.message
    assert not marker.exists()


# --- prepare --------------------------------------------------------------------------------------------
def corpus(path: Path, text: str) -> Path:
    path.write_text(text * 60)
    return path


def cfg_for(source: Path, out: Path | None, **kw: Any) -> TextDataConfig:
    return TextDataConfig(source=str(source), out_dir=str(out) if out else None, tokenizer="byte", seq_len=8, **kw)


def snapshot(d: Path) -> dict[str, bytes | None]:
    """Every entry under d: relative path -> bytes (None for a dir)."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def cli_error(capsys: pytest.CaptureFixture, *overrides: str) -> str:
    """`llmtrain-prepare <overrides>` in-process: exit 2 with exactly one `llmtrain: error:` line; that line."""
    from llmtrain.prepare import run

    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:
        run(compose(["data.tokenizer=byte", *overrides], "prepare"))
    assert ex.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("llmtrain: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def cli_ok(capsys: pytest.CaptureFixture, *overrides: str) -> dict[str, Any]:
    from llmtrain.prepare import run

    meta = run(compose(["data.tokenizer=byte", *overrides], "prepare"))
    capsys.readouterr()
    return meta


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(a prepared dir, its source, another source)."""
    a = corpus(tmp_path / "a.txt", "the first corpus says this\n")
    b = corpus(tmp_path / "b.txt", "and the second one says something else\n")
    return prepare(cfg_for(a, tmp_path / "prepared"), quiet=True), a, b


def test_user_file_in_a_prepared_dir_is_never_deleted(dataset: tuple[Path, Path, Path],
                                                     capsys: pytest.CaptureFixture) -> None:
    out, a, b = dataset
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    for overrides in ([f"data.source={b}"], [f"data.source={a}", "force=true"]):
        line = cli_error(capsys, *overrides, f"data.out_dir={out}")
        assert line == (f"llmtrain: error: data.out_dir: {out} holds 'notes.txt', which prepare did not write; "
                        "nothing was replaced (force=true does not change that): move it out, or choose another dir")
        assert snapshot(out) == before
    (out / "notes.txt").unlink()
    (out / "tokenizer" / "mine.json").write_text("{}")
    assert "holds 'tokenizer/mine.json'" in cli_error(capsys, f"data.source={b}", f"data.out_dir={out}")
    assert (out / "tokenizer" / "mine.json").read_text() == "{}"
    # damaged shards are rebuilt only when nothing else is there
    os.truncate(out / "train_000.bin", 10)
    before = snapshot(out)
    assert "holds 'tokenizer/mine.json'" in cli_error(capsys, f"data.source={a}", f"data.out_dir={out}")
    assert snapshot(out) == before


def test_foreign_dir_with_a_meta_json_is_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = corpus(tmp_path / "a.txt", "words\n")
    out = tmp_path / "project"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({"name": "my project", "version": 2}))
    (out / "data.csv").write_text("1,2,3\n")
    (out / "sub").mkdir()
    (out / "sub" / "x.txt").write_text("x")
    before = snapshot(out)
    for extra in ([], ["force=true"]):
        line = cli_error(capsys, f"data.source={src}", f"data.out_dir={out}", *extra)
        assert line.startswith(f"llmtrain: error: data.out_dir: {out}/meta.json is not llmtrain's (")
        assert "it is left as it is: choose a new or empty dir" in line
        assert snapshot(out) == before
    assert not list(tmp_path.glob(".project.tmp.*"))


def test_meta_without_shards_is_one_line(dataset: tuple[Path, Path, Path], capsys: pytest.CaptureFixture) -> None:
    out, a, _ = dataset
    meta = json.loads((out / "meta.json").read_text())
    del meta["shards"]
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError) as e:
        load_prepared(out)
    assert e.value.key == "data.source" and "it has no 'shards'" in e.value.message
    line = cli_error(capsys, f"data.source={out}")
    assert line.startswith(f"llmtrain: error: data.source: {out}/meta.json is not llmtrain's (it has no 'shards'")
    before = snapshot(out)
    line = cli_error(capsys, f"data.source={a}", f"data.out_dir={out}", "force=true")
    assert line.startswith(f"llmtrain: error: data.out_dir: {out}/meta.json is not llmtrain's (it has no 'shards'")
    assert snapshot(out) == before


@pytest.mark.parametrize("field,value,words", [
    ("dtype", "object", "dtype 'object'"), ("dtype", "O", "dtype 'O'"), ("dtype", "|O", "dtype '|O'"),
    ("file", "../outside.bin", "shard file '../outside.bin'"), ("file", "/abs", "is not a file name of its own"),
    ("file", "..", "shard file '..'"), ("file", "meta.json", "shard file 'meta.json'"),
    ("tokenizer", "../tok", "tokenizer 'dir'"),
    ("train_tokens", "5", "'train_tokens' is not a count"),
])
def test_crafted_meta_is_one_line(dataset: tuple[Path, Path, Path], field: str, value: str, words: str) -> None:
    out, _, _ = dataset
    meta = json.loads((out / "meta.json").read_text())
    shard = meta["shards"]["train"][0]
    outside = out.parent / "outside.bin"
    if field == "dtype":  # sized so the shard check passes: 8-byte objects, all zero (None pointers)
        meta["dtype"] = value
        for s in (shard, meta["shards"]["val"][0]):
            (out / s["file"]).write_bytes(bytes(8 * s["tokens"]))
            s.pop("sha256")
    elif field == "file":  # a real file there, of the size meta.json says
        outside.write_bytes((out / shard["file"]).read_bytes())
        shard["file"] = str(outside) if value == "/abs" else value
    elif field == "tokenizer":
        meta["tokenizer"]["dir"] = value
    else:
        meta[field] = value
    (out / "meta.json").write_text(json.dumps(meta))
    for read in (load_prepared, lambda d: TextDataModule(cfg_for(d, None))):
        with pytest.raises(ConfigError) as e:
            read(out)
        assert e.value.key == "data.source" and words in e.value.message and "\n" not in str(e.value), e.value


def test_shard_linked_outside_is_not_read(dataset: tuple[Path, Path, Path]) -> None:
    out, _, _ = dataset
    outside = out.parent / "secret.bin"
    outside.write_bytes((out / "train_000.bin").read_bytes())
    (out / "train_000.bin").unlink()
    (out / "train_000.bin").symlink_to(outside)
    with pytest.raises(ConfigError) as e:
        load_prepared(out)
    assert "train_000.bin is a link to a file outside" in e.value.message


def test_run_dir_is_refused_as_out_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = corpus(tmp_path / "a.txt", "words\n")
    run_dir = tmp_path / "runs" / "r1"
    (run_dir / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model: {}\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "meta.json").write_text("{}")
    before = snapshot(run_dir)
    line = cli_error(capsys, f"data.source={src}", f"data.out_dir={run_dir}", "force=true")
    assert line.startswith(f"llmtrain: error: data.out_dir: {run_dir} is a run dir (it holds config.yaml)")
    assert snapshot(run_dir) == before
    # a received run's config.yaml naming a dir of the user as data.out_dir: training refuses it too
    (run_dir / "meta.json").unlink()
    before = snapshot(run_dir)
    for out in (run_dir, tmp_path / "runs"):
        cfg = compose([*TINY_LM, f"data.source={src}", f"data.out_dir={out}"])
        with pytest.raises(ConfigError) as e:
            build_data(cfg.data)
        assert e.value.key == "data.out_dir" and "\n" not in str(e.value)
    assert snapshot(run_dir) == before


def test_own_prepared_dir_of_another_hash_is_replaced(dataset: tuple[Path, Path, Path],
                                                     capsys: pytest.CaptureFixture) -> None:
    out, a, b = dataset
    old = read_meta(out)
    os.utime(out / "train_000.bin", ns=(1, 1))  # its checksum is checked once, then recorded in .verified.json
    load_prepared(out)
    (out / "..verified.json.tmp999").write_text("{}")  # a crashed write of it
    assert (out / VERIFIED).is_file()
    meta = cli_ok(capsys, f"data.source={b}", f"data.out_dir={out}")
    assert meta["hash"] != old["hash"] and read_meta(out)["hash"] == meta["hash"]
    names = {s["file"] for split in ("train", "val") for s in meta["shards"][split]}
    assert {p.name for p in out.iterdir()} == {"meta.json", "tokenizer", *names}
    _, tok = load_prepared(out)
    text = tok.decode(np.fromfile(out / "train_000.bin", dtype=meta["dtype"])[:20].tolist())
    assert text.startswith("and the second one")
    again = cli_ok(capsys, f"data.source={b}", f"data.out_dir={out}", "force=true")  # rebuilt: its own files only
    assert again["hash"] == meta["hash"] and load_prepared(out)[0]["train_tokens"] == meta["train_tokens"]
    assert not list(out.parent.glob(".prepared.*"))


def test_publish_keeps_the_race_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes preparing the same inputs: the second's copy is dropped, also when the first published
    between the second's check and its rename."""
    src = corpus(tmp_path / "a.txt", "words\n")
    out = prepare(cfg_for(src, tmp_path / "out"), quiet=True)
    digest = read_meta(out)["hash"]
    before = snapshot(out)

    def twin() -> Path:
        tmp = tmp_path / f".out.tmp.{len(list(tmp_path.iterdir()))}"
        tmp.mkdir()
        (tmp / "meta.json").write_text((out / "meta.json").read_text())
        return tmp

    tmp = twin()
    publish.publish(tmp, out, digest)
    assert not tmp.exists() and snapshot(out) == before
    real, calls = publish.existing_output, []

    def late(path: Path) -> dict[str, Any] | None:  # the winner was not there yet at the first look
        calls.append(path)
        return None if len(calls) == 1 else real(path)

    monkeypatch.setattr(publish, "existing_output", late)
    tmp = twin()
    publish.publish(tmp, out, digest)
    assert not tmp.exists() and snapshot(out) == before and len(calls) == 2


def test_token_blocks_read_token_dtypes_only(tmp_path: Path) -> None:
    from llmtrain.data.text import TokenBlocks

    (tmp_path / "s.bin").write_bytes(bytes(64))
    assert len(TokenBlocks([tmp_path / "s.bin"], "uint16", 4)) == 7
    for dtype in ("object", "O", "float64", "V8"):
        with pytest.raises(ConfigError) as e:
            TokenBlocks([tmp_path / "s.bin"], dtype, 4)
        assert e.value.key == "data.source" and repr(dtype) in e.value.message
