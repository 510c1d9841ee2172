"""Prepare a corpus once: sources → tokenizer → packed uint16/uint32 token shards + meta.json.

Streaming end to end, so memory stays flat from a 1 MB file to a multi-GB corpus: documents are read in
pieces cut at pre-token boundaries (`sources`) → tokenised in batches, in process or through
`datasets.map(num_proc=...)` (`encode`) → `<|endoftext|>` after each document → appended to shard files
of at most `data.shard_tokens` tokens, the tail `val_fraction` of the stream moved to the val shards
(`shards`) → written into a temp dir beside the output and renamed at the end (`publish`).

meta.json's `hash` fingerprints the inputs (source files by path, size and mtime; tokenizer; options):
same inputs → the dir is reused, changed inputs → it is rebuilt. Without `data.out_dir` the dir is
`$LLMTRAIN_CACHE/prepared/<hash>`; a prepared dir given as `data.source` is used as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.data import tokenizers as toks
from llmtrain.data.encode import encode_in_process, encode_with_datasets
from llmtrain.data.publish import existing_output, publish, refuse_foreign
from llmtrain.data.shards import FORMAT_VERSION, ShardWriter, carve_tail, shard_problem
from llmtrain.data.sources import Source, iter_pieces, replaced_bytes, reset_replaced, resolve_source
from llmtrain.errors import ConfigError
from llmtrain.safeio import file_digest


def cache_root() -> Path:
    """Where derived data is cached (prepared datasets, instruct tokens); $LLMTRAIN_CACHE sets it."""
    return Path(os.environ.get("LLMTRAIN_CACHE", Path.home() / ".cache" / "llmtrain")).expanduser()


def check_config(cfg: Any) -> None:
    """The data.* keys preparation reads."""
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError("data.val_fraction", f"must be in (0, 1) (got {cfg.val_fraction})")
    if cfg.num_proc < 1:
        raise ConfigError("data.num_proc", f"must be >= 1 (got {cfg.num_proc})")
    if cfg.shard_tokens < 1024:
        raise ConfigError("data.shard_tokens", f"must be >= 1024 (got {cfg.shard_tokens})")


def _hash_inputs(src: Source, cfg: Any) -> str:
    h = hashlib.sha256()
    opts = {"v": FORMAT_VERSION, "tokenizer": cfg.tokenizer, "val": cfg.val_fraction, "field": cfg.text_field,
            "shard": cfg.shard_tokens, "split": cfg.hf_split,
            "vocab": cfg.vocab_size if cfg.tokenizer == "bpe" else None}
    h.update(json.dumps(opts, sort_keys=True).encode())
    h.update(json.dumps(src.fingerprint()).encode())
    tok_path = Path(cfg.tokenizer).expanduser()
    if cfg.tokenizer not in ("bpe", "byte") and tok_path.is_dir():
        for f in sorted(p for p in tok_path.iterdir() if p.is_file()):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:20]


def is_prepared_dir(path: Path) -> bool:
    return (path / "meta.json").is_file()


def locate(cfg: Any) -> tuple[Path, str | None, Source | None]:
    """(output dir, inputs hash, source); a prepared dir given as data.source is its own output."""
    src_path = Path(cfg.source).expanduser()
    if cfg.source != "embedded" and is_prepared_dir(src_path):
        return src_path, None, None
    src = resolve_source(cfg.source, cfg.embedded_max_bytes)
    digest = _hash_inputs(src, cfg)
    out = Path(cfg.out_dir).expanduser() if cfg.out_dir else cache_root() / "prepared" / digest
    return out, digest, src


def prepare(cfg: Any, *, quiet: bool = False, only_locate: bool = False, force: bool = False) -> Path:
    """Return the prepared dir for cfg, building it unless an up-to-date one exists.

    An existing output dir is replaced (another dataset's, force, damaged shards) only when everything in it
    is what prepare wrote there (its meta.json's files); anything else is refused with one line, force or not."""
    check_config(cfg)
    out, digest, src = locate(cfg)
    if digest is None:  # data.source is a prepared dir
        return out
    meta = existing_output(out)
    if meta is not None and not force:
        if meta["hash"] == digest and (why := shard_problem(out, meta)) is not None:
            print(f"llmtrain: warning: the prepared data in {out} is damaged ({why}); preparing it again",
                  file=sys.stderr, flush=True)
            force = True
        elif meta["hash"] == digest:
            if not quiet:
                print(f"llmtrain: using prepared {out} ({meta['train_tokens']:,} train / "
                      f"{meta['val_tokens']:,} val tokens)", file=sys.stderr)
            return out
        if only_locate:
            raise ConfigError("data.out_dir", f"{out} holds another dataset")
    if only_locate:
        raise ConfigError("data.out_dir", f"{out} was not prepared")
    if meta is not None:
        refuse_foreign(out, meta)  # before the work, not only when publishing it
    assert src is not None
    return _build(cfg, src, digest, out, quiet, replace=force)


def _plan(cfg: Any, src: Source) -> str:
    """What preparing `src` is about to do, for the line printed before it starts (BPE training and
    tokenising a large corpus take a while)."""
    what = "the embedded corpus" if cfg.source == "embedded" else str(cfg.source)
    if src.kind == "files":
        n, size = len(src.files), _size(src.total_bytes or 0)
        what += f" ({size})" if n == 1 and cfg.source != "embedded" else f" ({n:,} file{'s' if n != 1 else ''}, {size})"
    if cfg.tokenizer == "bpe":
        steps = f"training a {cfg.vocab_size}-token BPE, tokenising"
    elif cfg.tokenizer == "byte":
        steps = "tokenising into bytes"
    else:
        steps = f"tokenising with {cfg.tokenizer}"
    return f"preparing {what}: {steps} ..."


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _build(cfg: Any, src: Source, digest: str, out: Path, quiet: bool, replace: bool = False) -> Path:
    t0 = time.perf_counter()
    # a named tokenizer loads (or fails, with its one line) before the start line; a BPE trains after it
    tok = None if cfg.tokenizer == "bpe" else toks.build_tokenizer(cfg.tokenizer, cfg.vocab_size)
    if tok is None:
        toks.check_bpe_size(cfg.vocab_size)
    if not quiet:
        print(f"llmtrain: {_plan(cfg, src)}", file=sys.stderr, flush=True)
    if tok is None:
        tok = toks.build_tokenizer(cfg.tokenizer, cfg.vocab_size,
                                   (p for p, _ in iter_pieces(src, cfg.text_field, cfg.hf_split)))
    eos, vocab = int(tok.eos_token_id), toks.vocab_len(tok)
    dtype = np.dtype(np.uint16 if vocab <= 65536 else np.uint32)
    reset_replaced()  # count once, during tokenisation
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        train = ShardWriter(tmp, "train", dtype, cfg.shard_tokens)
        chars = docs = 0
        bar = _progress(src, quiet)
        if cfg.num_proc > 1:
            stream = encode_with_datasets(src, cfg, tok, eos, dtype, tmp / ".work", digest)
        else:
            stream = encode_in_process(iter_pieces(src, cfg.text_field, cfg.hf_split), tok, eos, dtype)
        try:
            for ids, n_chars, n_docs in stream:
                train.write(ids)
                chars, docs = chars + n_chars, docs + n_docs
                bar.update(n_chars)
        finally:
            bar.close()
            train.close()
        shutil.rmtree(tmp / ".work", ignore_errors=True)
        total = train.tokens
        if total < 2:
            raise ConfigError("data.source", f"{cfg.source} holds no text (empty files?)")
        n_val = max(1, int(round(total * cfg.val_fraction)))
        val = ShardWriter(tmp, "val", dtype, cfg.shard_tokens)
        train_shards = carve_tail(tmp, train.close(), val, n_val, dtype)
        val_shards = val.close()
        tok.save_pretrained(str(tmp / "tokenizer"))
        for shard in (*train_shards, *val_shards):  # what a later start checks the files against
            path = tmp / shard["file"]
            shard.update(sha256=file_digest(path), mtime_ns=path.stat().st_mtime_ns)
        meta = {"format": FORMAT_VERSION, "hash": digest, "train_tokens": total - n_val, "val_tokens": n_val,
                "vocab_size": vocab, "max_token_id": train.max_id, "eos_token_id": eos, "dtype": dtype.name,
                "tokenizer": {"spec": cfg.tokenizer, "hash": toks.tokenizer_hash(tok), "dir": "tokenizer"},
                "sources": src.describe(), "documents": docs, "characters": chars, "replaced_bytes": replaced_bytes(),
                "val_fraction": cfg.val_fraction, "shard_tokens": cfg.shard_tokens,
                "shards": {"train": train_shards, "val": val_shards},
                "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        publish(tmp, out, digest, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        size = src.total_bytes
        rate = f", {size / 1e6 / meta['seconds']:.2f} MB/s" if size and meta["seconds"] > 0 else ""
        print(f"llmtrain: prepared {out}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
              f"from {docs:,} document{'s' if docs != 1 else ''}, vocab {vocab} ({dtype.name}), {meta['seconds']:.1f}s{rate}",
              file=sys.stderr)
    if meta["replaced_bytes"] and not quiet:
        print(f"llmtrain: warning: {meta['replaced_bytes']:,} bytes were not valid UTF-8 and were replaced "
              "by U+FFFD", file=sys.stderr)
    return out


def _progress(src: Source, quiet: bool) -> Any:
    from tqdm import tqdm

    # on a terminal only: redirected, a bar is carriage-return updates in one line (the summary line stays)
    return tqdm(total=src.total_bytes, unit="char", unit_scale=True, desc="tokenize",
                disable=quiet or not sys.stderr.isatty(), mininterval=1.0, file=sys.stderr)
