"""Preparation: token counts equal the tokenizer applied directly, shards, reuse, bad inputs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARED_DATA

from llmtrain.data import encode, sources
from llmtrain.data.prepared import cache_root, prepare
from llmtrain.data.shards import ShardWriter, carve_tail, load_prepared, read_meta
from llmtrain.data.text import TextDataConfig, TextDataModule, TokenBlocks
from llmtrain.data.tokenizers import tokenizer_hash
from llmtrain.errors import ConfigError

GPT2_DIR = SHARED_DATA / "gpt2-tokenizer"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
needs_shared = pytest.mark.skipif(not (GPT2_DIR / "vocab.json").is_file() or not SHAKESPEARE.is_file(),
                                  reason="shared data (gpt2-tokenizer, tinyshakespeare) not present")


def cfg_for(source: Path | str, out: Path | None = None, **kw) -> TextDataConfig:
    return TextDataConfig(source=str(source), out_dir=str(out) if out else None, tokenizer=kw.pop("tokenizer", "byte"),
                          seq_len=kw.pop("seq_len", 16), **kw)


def stream(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) token streams of a prepared dir, shards concatenated."""
    meta = read_meta(out)
    return tuple(np.concatenate([np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in meta["shards"][split]])
                 for split in ("train", "val"))


def write_corpus(d: Path) -> list[str]:
    """Three documents in two text files and one JSONL file (two records); returns them in order."""
    d.mkdir(parents=True, exist_ok=True)
    docs = ["First doc.\n\nIt has  two   paragraphs and   odd spacing.\n" * 40,
            "Second: ünïcödé text — with dashes, 'quotes' and numbers 12345.\n" * 30]
    (d / "a.txt").write_text(docs[0])
    (d / "b.txt").write_text(docs[1])
    recs = ["record one says hello", "record two\nspans lines"]
    (d / "c.jsonl").write_text("\n".join(json.dumps({"text": r, "id": i}) for i, r in enumerate(recs)) + "\n\n")
    return docs + recs


def expected_ids(tok, docs: list[str]) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_token_counts_equal_direct_tokenizer(tmp_path, monkeypatch, tokenizer):
    """Pieces are cut mid-document (tiny CHUNK_CHARS) yet ids equal tok(doc) + EOS per document."""
    monkeypatch.setattr(sources, "CHUNK_CHARS", 97)
    monkeypatch.setattr(encode, "BATCH_CHARS", 500)
    docs = write_corpus(tmp_path / "src")
    out = prepare(cfg_for(tmp_path / "src", tmp_path / "out", tokenizer=tokenizer, vocab_size=300), quiet=True)
    meta, tok = load_prepared(out)
    want = expected_ids(tok, docs)
    train, val = stream(out)
    assert np.array_equal(np.concatenate([train, val]), np.asarray(want))
    assert meta["train_tokens"] + meta["val_tokens"] == len(want) == len(train) + len(val)
    assert meta["val_tokens"] == round(len(want) * 0.05)  # the tail of the stream
    assert meta["documents"] == 4 and meta["vocab_size"] == len(tok) and meta["dtype"] == "uint16"
    assert {"train_tokens", "val_tokens", "vocab_size", "eos_token_id", "dtype", "tokenizer", "sources",
            "hash"} <= set(meta)
    assert meta["tokenizer"]["hash"] == tokenizer_hash(tok)


@needs_shared
def test_gpt2_bpe_on_tinyshakespeare_matches_direct(tmp_path, monkeypatch):
    """GPT-2 BPE from a local vocab.json+merges.txt; 64k-char pieces; 1 MB of real text."""
    from transformers import GPT2TokenizerFast

    monkeypatch.setattr(sources, "CHUNK_CHARS", 1 << 16)
    out = prepare(cfg_for(SHAKESPEARE, tmp_path / "ts", tokenizer=str(GPT2_DIR), val_fraction=0.1), quiet=True)
    tok = GPT2TokenizerFast.from_pretrained(str(GPT2_DIR))
    assert tok("Hello world")["input_ids"] == [15496, 995]
    want = expected_ids(tok, [SHAKESPEARE.read_text()])
    train, val = stream(out)
    assert np.array_equal(np.concatenate([train, val]), np.asarray(want))
    meta = read_meta(out)
    assert meta["vocab_size"] == len(tok) and meta["eos_token_id"] == 50256


def test_shards_round_trip_and_blocks_span_shards(tmp_path):
    """1024-token shards: the stream survives sharding and the val carve; blocks read across files."""
    text = "".join(f"line {i} of a corpus long enough for several shards\n" for i in range(120))
    (tmp_path / "t.txt").write_text(text)
    out = prepare(cfg_for(tmp_path / "t.txt", tmp_path / "out", shard_tokens=1024, val_fraction=0.3), quiet=True)
    meta, tok = load_prepared(out)
    want = np.asarray(expected_ids(tok, [text]))
    train, val = stream(out)
    assert len(meta["shards"]["train"]) >= 4 and len(meta["shards"]["val"]) >= 2
    assert all(s["tokens"] <= 1024 for s in meta["shards"]["train"] + meta["shards"]["val"])
    assert np.array_equal(np.concatenate([train, val]), want)
    T = 100
    blocks = TokenBlocks([out / s["file"] for s in meta["shards"]["train"]], meta["dtype"], T)
    assert len(blocks) == (len(train) - 1) // T
    idx = np.arange(len(blocks))
    rows = blocks.rows(idx)  # [n, T+1]
    assert np.array_equal(rows, np.stack([train[i * T : i * T + T + 1] for i in idx]))
    b = blocks.get(np.array([3, 0]))
    assert b["input_ids"].shape == (2, T) and (b["labels"][:, :-1] == b["input_ids"][:, 1:]).all()


def test_shard_writer_uint32_and_carve(tmp_path):
    """Vocabularies above 65535 ids are written as uint32; carving keeps order across shards."""
    w = ShardWriter(tmp_path, "train", np.dtype(np.uint32), 1024)
    data = np.arange(70_000, 70_000 + 3000, dtype=np.int64)
    w.write(data[:1500])
    w.write(data[1500:])
    val = ShardWriter(tmp_path, "val", np.dtype(np.uint32), 1024)
    kept = carve_tail(tmp_path, w.close(), val, 1100, np.uint32, copy_tokens=300)
    got_train = np.concatenate([np.fromfile(tmp_path / s["file"], dtype=np.uint32) for s in kept])
    got_val = np.concatenate([np.fromfile(tmp_path / s["file"], dtype=np.uint32) for s in val.close()])
    assert np.array_equal(got_train, data[:1900]) and np.array_equal(got_val, data[1900:])
    assert [s["tokens"] for s in kept] == [1024, 876] and not (tmp_path / "train_002.bin").exists()


def test_reused_when_unchanged_rebuilt_when_changed(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("some words to tokenise\n" * 50)
    cfg = cfg_for(f)
    out = prepare(cfg, quiet=True)
    assert out.parent.parent == cache_root()  # cache dir keyed by the inputs' hash
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert prepare(cfg, quiet=True) == out and (out / "meta.json").stat().st_mtime_ns == stamp  # no-op
    f.write_text("other words entirely\n" * 60)
    out2 = prepare(cfg, quiet=True)
    assert out2 != out and read_meta(out2)["hash"] != read_meta(out)["hash"]
    # a fixed out_dir is rebuilt in place; another option (val_fraction) also invalidates
    fixed = cfg_for(f, tmp_path / "fixed")
    h1 = read_meta(prepare(fixed, quiet=True))["hash"]
    h2 = read_meta(prepare(replace(fixed, val_fraction=0.2), quiet=True))["hash"]
    assert h1 != h2 and read_meta(tmp_path / "fixed")["val_fraction"] == 0.2
    assert not list(tmp_path.glob(".fixed.tmp.*"))


def test_bad_inputs_fail_with_one_line_and_leave_nothing(tmp_path):
    def fails(cfg: TextDataConfig, key: str, words: str) -> None:
        with pytest.raises(ConfigError) as e:
            prepare(cfg, quiet=True)
        assert e.value.key == key and words in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp.*"))

    fails(cfg_for(tmp_path / "missing.txt", tmp_path / "out"), "data.source", "not found")
    (tmp_path / "empty.txt").write_text("")
    fails(cfg_for(tmp_path / "empty.txt", tmp_path / "out"), "data.source", "no text")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    fails(cfg_for(tmp_path / "bad.jsonl", tmp_path / "out"), "data.text_field", "bad.jsonl:2")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\nnot json\n')
    fails(cfg_for(tmp_path / "broken.jsonl", tmp_path / "out"), "data.source", "broken.jsonl:2")
    fails(cfg_for("./nowhere/*.txt", tmp_path / "out"), "data.source", "no files match")
    fails(replace(cfg_for(tmp_path / "bad.jsonl", tmp_path / "out"), val_fraction=1.5), "data.val_fraction", "(0, 1)")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a prepared dataset"):
        prepare(cfg_for(tmp_path / "mine" / "notes.txt", tmp_path / "mine"), quiet=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 10 + b"ok\n")
    out = prepare(cfg_for(tmp_path / "latin1.txt", tmp_path / "out"), quiet=True)
    meta, tok = load_prepared(out)
    assert meta["replaced_bytes"] == 20
    train, val = stream(out)
    assert "\ufffd" in tok.decode(np.concatenate([train, val]).tolist())


def test_datasets_map_num_proc_gives_the_same_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_CHARS", 200)
    write_corpus(tmp_path / "src")
    a = prepare(cfg_for(tmp_path / "src", tmp_path / "a"), quiet=True)
    b = prepare(cfg_for(tmp_path / "src", tmp_path / "b", num_proc=2), quiet=True)
    for x, y in zip(stream(a), stream(b), strict=True):
        assert np.array_equal(x, y)
    assert read_meta(a)["documents"] == read_meta(b)["documents"] == 4
    assert not (b / ".work").exists()


def test_hf_saved_dataset_source(tmp_path):
    import datasets

    docs = ["alpha beta gamma " * 20, "delta epsilon\n" * 15, "zeta"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": docs})}).save_to_disk(str(tmp_path / "hf"))
    out = prepare(cfg_for(tmp_path / "hf", tmp_path / "out", text_field="body"), quiet=True)
    meta, tok = load_prepared(out)
    assert np.array_equal(np.concatenate(stream(out)), np.asarray(expected_ids(tok, docs)))
    with pytest.raises(ConfigError, match="data.hf_split"):
        prepare(cfg_for(tmp_path / "hf", tmp_path / "o2", text_field="body", hf_split="test"), quiet=True)


def test_data_module_uses_prepared_dir_and_checks_seq_len_and_vocab(tmp_path):
    """The data checks its own keys; the vocabulary is checked once, by the model built for the data."""
    from llmtrain.models.base import get_model_spec
    from llmtrain.models.gpt2 import GPT2ModelConfig
    from llmtrain.models.gpt2_native import GPT2, GPT2Dims, save_hf

    (tmp_path / "t.txt").write_text("short corpus for the module checks\n" * 40)
    out = prepare(cfg_for(tmp_path / "t.txt", tmp_path / "prep"), quiet=True)
    dm = TextDataModule(cfg_for(out, tokenizer="bpe"))  # a prepared dir: its tokenizer wins
    assert dm.dir == out and dm.info.vocab_size == 257 and len(dm.split("train")) > 0
    with pytest.raises(ConfigError) as e:
        TextDataModule(cfg_for(out, seq_len=100))  # train 1331 tokens, val 70
    assert e.value.key == "data.seq_len" and "val split" in str(e.value)
    spec, small = get_model_spec("gpt2"), dict(n_layer=1, n_head=1, n_embd=8, n_positions=16)
    with pytest.raises(ConfigError) as e:
        spec.build(GPT2ModelConfig(vocab_size=100, **small), dm.info)
    assert e.value.key == "model.vocab_size" and "257" in str(e.value)
    save_hf(GPT2(GPT2Dims(vocab_size=200, n_positions=16, n_embd=8, n_layer=1, n_head=1)), tmp_path / "pre")
    with pytest.raises(ConfigError, match="data.tokenizer"):
        spec.build(GPT2ModelConfig(pretrained=str(tmp_path / "pre"), **small), dm.info)


def test_preparation_says_what_it_starts_before_it_ends(tmp_path, capsys):
    """BPE training and tokenising take a while: a line says what is coming before the summary line; a
    single file is '1 document'; a reused dir and a tokenizer that cannot load print no start line."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 100)
    capsys.readouterr()
    out = prepare(cfg_for(corpus, tmp_path / "out", tokenizer="bpe", vocab_size=300))
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"llmtrain: preparing {corpus} (4.1 kB): training a 300-token BPE, tokenising ..."
    assert len(err) == 2 and err[1].startswith(f"llmtrain: prepared {out}: ") and " from 1 document, " in err[1]
    prepare(cfg_for(corpus, tmp_path / "out", tokenizer="bpe", vocab_size=300))
    assert capsys.readouterr().err.startswith(f"llmtrain: using prepared {out}")
    write_corpus(tmp_path / "docs")
    prepare(cfg_for(tmp_path / "docs", tmp_path / "out2"))
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"llmtrain: preparing {tmp_path / 'docs'} (3 files, ") and \
        err[0].endswith("kB): tokenising into bytes ...")
    assert " from 4 documents, " in err[1]
    with pytest.raises(ConfigError):
        prepare(cfg_for(corpus, tmp_path / "out3", tokenizer=str(tmp_path / "no_such_tokenizer")))
    assert "preparing" not in capsys.readouterr().err
