"""Prepare a corpus once: sources → tokenizer → packed uint16/uint32 token shards + meta.json.

Streaming end to end, so memory stays flat from a 1 MB file to a multi-GB corpus:
  documents (files, JSONL records, HF rows) are read in pieces of ~CHUNK_CHARS characters, cut only
  between a non-space and a space character (a pre-token boundary of GPT-2-style byte-level BPE, so
  the ids equal those of the whole document) → tokenised in batches (Rust batch encoder in process,
  or `datasets.map(num_proc=...)`) → `<|endoftext|>` after each document → appended to shard files
  `train_000.bin, train_001.bin, ...` of at most `data.shard_tokens` tokens.
  The val split is the tail `val_fraction` of the token stream: once everything is written, the last
  round(N * val_fraction) tokens move to `val_000.bin ...` and the train shards are truncated.

Everything is written into a temp dir beside the output and renamed at the end, so a dir holding
meta.json is complete. meta.json's `hash` fingerprints the inputs (source files by path, size and
mtime; tokenizer; options); same inputs → the dir is reused, changed inputs → it is rebuilt.
A rebuild replaces only what prepare wrote (meta.json, the shards it lists, tokenizer/, .verified.json):
an output dir holding anything else, a run dir, or a meta.json llmtrain did not write is refused with one
line, force or not, and left as it is.
"""

from __future__ import annotations

import codecs
import contextlib
import glob as globlib
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.data import tokenizers as toks
from llmtrain.errors import ConfigError
from llmtrain.rundir import RUN_FILES
from llmtrain.safeio import atomic_write_text, file_digest

FORMAT_VERSION = 3  # 3: tokenizer saved by llmtrain's Tokenizer (tokenizer.json + config)
CHUNK_CHARS = 1 << 18  # characters per tokenisation piece (a long document is split into pieces)
BATCH_CHARS = 1 << 20  # characters per in-process encode_batch call (bounds the transient ids)
READ_BYTES = 1 << 20  # file read size
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".jsonl")
_REPLACED = [0]  # undecodable bytes seen by the counting error handler (this process)


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _REPLACED[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("llmtrain.count", _count_and_replace)


def cache_root() -> Path:
    return Path(os.environ.get("LLMTRAIN_CACHE", Path.home() / ".cache" / "llmtrain")).expanduser()


def check_config(cfg: Any) -> None:
    """The data.* keys preparation reads."""
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError("data.val_fraction", f"must be in (0, 1) (got {cfg.val_fraction})")
    if cfg.num_proc < 1:
        raise ConfigError("data.num_proc", f"must be >= 1 (got {cfg.num_proc})")
    if cfg.shard_tokens < 1024:
        raise ConfigError("data.shard_tokens", f"must be >= 1024 (got {cfg.shard_tokens})")


# sources -----------------------------------------------------------------------------------------
@dataclass
class Source:
    """What `data.source` names: local files, a saved HF dataset dir, or a HF hub dataset."""

    kind: str  # files | hf_disk | hf_hub
    spec: str
    files: list[Path] = field(default_factory=list)

    @property
    def total_bytes(self) -> int | None:
        return sum(f.stat().st_size for f in self.files) if self.kind == "files" else None

    def fingerprint(self) -> list[Any]:
        """Cheap identity of the inputs: path, size and mtime of every file (like make)."""
        if self.kind == "hf_hub":
            return [self.spec]
        files = self.files if self.kind == "files" else sorted(p for p in Path(self.spec).rglob("*") if p.is_file())
        out: list[Any] = []
        for f in files:
            st = f.stat()
            out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        return out

    def describe(self) -> list[str]:
        if self.spec == "embedded":
            return ["embedded"]
        return [str(f) for f in self.files] if self.kind == "files" else [f"{self.kind}:{self.spec}"]


def embedded_files(max_bytes: int) -> list[Path]:
    """The embedded corpus: this Python's own standard-library sources, sorted, up to max_bytes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for p in sorted(stdlib.glob("*.py")):
        size = p.stat().st_size
        if total + size > max_bytes:
            break
        out.append(p)
        total += size
    return out


def _is_hf_saved(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_info.json", "state.json",
                                                                 "dataset_dict.json"))


def resolve_source(source: str, max_bytes: int = 4_000_000) -> Source:
    """Local files (embedded | file | glob | dir), a `save_to_disk` dir, or else a hub dataset name."""
    if source == "embedded":
        return Source("files", "embedded", embedded_files(max_bytes))
    path = Path(source).expanduser()
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(str(path), recursive=True))
        files = [f for f in files if f.is_file()]
        if not files:
            raise ConfigError("data.source", f"no files match {source}")
        return Source("files", source, files)
    if _is_hf_saved(path):
        return Source("hf_disk", str(path))
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise ConfigError("data.source", f"{source} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        return Source("files", source, files)
    if path.is_file():
        return Source("files", source, [path])
    if source.startswith((".", "/", "~")) or path.suffix or not source.strip():
        raise ConfigError("data.source", f"file not found: {source}")
    return Source("hf_hub", source)


def _cut(buf: str, limit: int) -> int:
    """Where to end a piece of `buf`: the last non-space→space boundary (no pre-token spans it)."""
    lo = max(1, len(buf) - limit)
    for i in range(len(buf) - 1, lo - 1, -1):
        if buf[i].isspace() and not buf[i - 1].isspace():
            return i
    return len(buf)  # no boundary in reach (a huge run without spaces): cut anyway


def split_text(text: str, chunk: int = CHUNK_CHARS) -> Iterator[str]:
    """`text` in pieces of about `chunk` characters, cut at pre-token boundaries."""
    while len(text) > 2 * chunk:
        i = _cut(text[: 2 * chunk], chunk)
        yield text[:i]
        text = text[i:]
    yield text


def _iter_text_file(path: Path, chunk: int) -> Iterator[tuple[str, bool]]:
    """(piece, ends_document): the whole file is one document, read incrementally."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="llmtrain.count")
    buf = ""
    with open(path, "rb") as fh:
        while block := fh.read(READ_BYTES):
            *done, buf = split_text(buf + dec.decode(block), chunk)  # keep the tail: the document goes on
            for piece in done:
                yield piece, False
    buf += dec.decode(b"", final=True)
    if buf:
        yield buf, True


def _iter_jsonl(path: Path, text_field: str, chunk: int) -> Iterator[tuple[str, bool]]:
    """One document per non-empty line: its `text_field`."""
    with open(path, encoding="utf-8", errors="llmtrain.count") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError("data.source", f"{path}:{n} is not JSON ({e.msg}); fix or drop the line") from None
            if not isinstance(rec, dict) or text_field not in rec:
                raise ConfigError("data.text_field", f"{path}:{n} has no field {text_field!r}; set "
                                                     "data.text_field to the record's text key")
            yield from _pieces(str(rec[text_field]), chunk)


def _pieces(text: str, chunk: int) -> Iterator[tuple[str, bool]]:
    if not text:
        return
    parts = list(split_text(text, chunk))
    for k, p in enumerate(parts):
        yield p, k == len(parts) - 1


def _open_hf(src: Source, split: str) -> Any:
    import datasets

    try:
        if src.kind == "hf_disk":
            ds = datasets.load_from_disk(src.spec)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ConfigError("data.hf_split", f"{src.spec} has splits {sorted(ds)}, not {split!r}")
                ds = ds[split]
            return ds
        from llmtrain.hub import OFFLINE_HINT, prepare_hub_lookup

        if not prepare_hub_lookup():
            raise ConfigError("data.source", f"{src.spec!r} is not a local path, and {OFFLINE_HINT}")
        return datasets.load_dataset(src.spec, split=split, streaming=True)
    except ConfigError:
        raise
    except Exception as e:  # offline, unknown name, bad split: one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError("data.source", f"{src.spec!r} is neither a local path nor a loadable Hugging Face "
                                         f"dataset ({msg}); check the path, or go online for hub names") from None


def _iter_hf(src: Source, text_field: str, split: str, chunk: int) -> Iterator[tuple[str, bool]]:
    ds = _open_hf(src, split)
    cols = getattr(ds, "column_names", None)
    if cols is not None and text_field not in cols:
        raise ConfigError("data.text_field", f"{src.spec} has columns {cols}, not {text_field!r}")
    for batch in ds.iter(batch_size=256):
        if text_field not in batch:
            raise ConfigError("data.text_field", f"{src.spec} has columns {sorted(batch)}, not {text_field!r}")
        for text in batch[text_field]:
            yield from _pieces(str(text or ""), chunk)


def iter_pieces(src: Source, text_field: str = "text", split: str = "train", chunk: int = CHUNK_CHARS,
                on_file: Callable[[Path], None] | None = None) -> Iterator[tuple[str, bool]]:
    """Every document of the source as (piece, ends_document), in a fixed order."""
    if src.kind != "files":
        yield from _iter_hf(src, text_field, split, chunk)
        return
    for f in src.files:
        if f.suffix == ".jsonl":
            yield from _iter_jsonl(f, text_field, chunk)
        else:
            yield from _iter_text_file(f, chunk)
        if on_file is not None:
            on_file(f)


# shards ------------------------------------------------------------------------------------------
class ShardWriter:
    """Appends token arrays to `<split>_000.bin, <split>_001.bin, ...` of at most `shard_tokens`."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.cap = out, split, np.dtype(dtype), shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._fh: Any = None
        self.max_id = -1  # largest id written: the model needs rows up to it, not the tokenizer's full size

    def write(self, arr: np.ndarray) -> None:
        arr = np.asarray(arr, dtype=self.dtype)
        if len(arr):
            self.max_id = max(self.max_id, int(arr.max()))
        while len(arr):
            if self._fh is None or self.shards[-1]["tokens"] >= self.cap:
                self._roll()
            room = self.cap - self.shards[-1]["tokens"]
            self._fh.write(arr[:room].tobytes())
            self.shards[-1]["tokens"] += len(arr[:room])
            arr = arr[room:]

    def _roll(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._fh = open(self.out / name, "wb")  # noqa: SIM115  (closed in _roll / close)
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> list[dict[str, Any]]:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        return self.shards

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


def carve_tail(out: Path, train: list[dict[str, Any]], val: ShardWriter, n_val: int, dtype: np.dtype,
               copy_tokens: int = 1 << 24) -> list[dict[str, Any]]:
    """Move the last n_val tokens of the train shards into `val`; returns the truncated train shards."""
    itemsize = np.dtype(dtype).itemsize
    total = sum(s["tokens"] for s in train)
    start, off = total - n_val, 0
    kept: list[dict[str, Any]] = []
    for s in train:
        lo, hi = off, off + s["tokens"]
        off = hi
        if hi <= start:
            kept.append(s)
            continue
        cut = max(start - lo, 0)  # tokens of this shard that stay in train
        mm = np.memmap(out / s["file"], dtype=dtype, mode="r")
        for a in range(cut, s["tokens"], copy_tokens):
            val.write(np.asarray(mm[a : min(a + copy_tokens, s["tokens"])]))
        del mm
        if cut > 0:
            os.truncate(out / s["file"], cut * itemsize)
            kept.append({"file": s["file"], "tokens": cut})
        else:
            (out / s["file"]).unlink()
    return kept


# hashing -----------------------------------------------------------------------------------------
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


# tokenisation ------------------------------------------------------------------------------------
def _encode_in_process(pieces: Iterator[tuple[str, bool]], tok: Any, eos: int,
                       dtype: np.dtype) -> Iterator[tuple[np.ndarray, int, int]]:
    """(ids, characters, documents) per batch of pieces; the Rust encoder parallelises each batch."""
    texts: list[str] = []
    ends: list[bool] = []
    chars = 0
    for text, end in pieces:
        texts.append(text)
        ends.append(end)
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield toks.encode_documents(tok, texts, ends, eos, dtype), chars, sum(ends)
            texts, ends, chars = [], [], 0
    if texts:
        yield toks.encode_documents(tok, texts, ends, eos, dtype), chars, sum(ends)


def _map_encode(batch: dict[str, list], tok: Any, eos: int) -> dict[str, list]:
    ids = toks.encode_batch(tok, batch["text"])
    for row, end in zip(ids, batch["end"], strict=True):
        if end:
            row.append(eos)
    return {"ids": ids, "chars": [len(t) for t in batch["text"]]}


def _gen_pieces(src: Source, text_field: str, split: str) -> Iterator[dict[str, Any]]:
    for text, end in iter_pieces(src, text_field, split):
        yield {"text": text, "end": end}


def _encode_with_datasets(src: Source, cfg: Any, tok: Any, eos: int, dtype: np.dtype, work: Path,
                          digest: str) -> Iterator[tuple[np.ndarray, int, int]]:
    """The same stream through `datasets`: pieces → Arrow (on disk) → map(num_proc) → ids."""
    import datasets

    feats = datasets.Features({"text": datasets.Value("string"), "end": datasets.Value("bool")})
    try:
        ds = datasets.Dataset.from_generator(
            _gen_pieces, features=feats, cache_dir=str(work), fingerprint=f"pieces-{digest}",
            gen_kwargs={"src": src, "text_field": cfg.text_field, "split": cfg.hf_split}, writer_batch_size=64)
    except Exception as e:  # the generator's ConfigError arrives wrapped
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise
    out_feats = datasets.Features({"ids": datasets.Sequence(datasets.Value("int64")),
                                   "chars": datasets.Value("int64")})
    ids = ds.map(_map_encode, batched=True, batch_size=16, num_proc=cfg.num_proc, remove_columns=["text", "end"],
                 fn_kwargs={"tok": tok, "eos": eos}, features=out_feats, writer_batch_size=64,
                 new_fingerprint=f"ids-{digest}", desc=f"tokenize (num_proc={cfg.num_proc})")
    ends = ds.with_format("numpy", columns=["end"])
    for start in range(0, len(ids), 64):
        rows = ids[start : start + 64]
        flat = [np.asarray(r, dtype=dtype) for r in rows["ids"]]
        arr = np.concatenate(flat) if flat else np.zeros(0, dtype=dtype)
        yield arr, int(sum(rows["chars"])), int(ends[start : start + 64]["end"].sum())


# prepare -----------------------------------------------------------------------------------------
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
    _REPLACED[0] = 0  # count once, during tokenisation
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
            stream = _encode_with_datasets(src, cfg, tok, eos, dtype, tmp / ".work", digest)
        else:
            stream = _encode_in_process(iter_pieces(src, cfg.text_field, cfg.hf_split), tok, eos, dtype)
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
                "sources": src.describe(), "documents": docs, "characters": chars,
                "replaced_bytes": _REPLACED[0], "val_fraction": cfg.val_fraction, "shard_tokens": cfg.shard_tokens,
                "shards": {"train": train_shards, "val": val_shards},
                "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, out, digest, replace)
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


def _publish(tmp: Path, out: Path, digest: str, replace: bool = False) -> None:
    """Rename tmp → out; a concurrent builder that won the race with the same inputs wins (unless `replace`:
    the existing one was found damaged or a rebuild was asked for). What is replaced is only what prepare
    wrote (existing_output, remove_prepared): a dir holding anything else is refused, and left as it is."""
    meta = existing_output(out)
    if meta is not None:
        if meta["hash"] == digest and not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        remove_prepared(out, meta)
    elif out.is_dir():
        with contextlib.suppress(OSError):
            out.rmdir()  # empty (existing_output refuses any other dir without meta.json)
    try:
        os.replace(tmp, out)
    except OSError:
        won = existing_output(out)  # another process published first
        if won is not None and won["hash"] == digest:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise ConfigError("data.out_dir", f"{out} was filled by someone else while preparing; nothing of it was "
                                          "changed: prepare again, or choose another dir") from None


def _progress(src: Source, quiet: bool) -> Any:
    from tqdm import tqdm

    # on a terminal only: redirected, a bar is carriage-return updates in one line (the summary line stays)
    return tqdm(total=src.total_bytes, unit="char", unit_scale=True, desc="tokenize",
                disable=quiet or not sys.stderr.isatty(), mininterval=1.0, file=sys.stderr)


# reading -----------------------------------------------------------------------------------------
TOKEN_DTYPES = ("uint16", "uint32")  # what shards hold; nothing else is ever memmapped
VERIFIED = ".verified.json"  # shards whose checksum was checked after their mtime changed (a copy, a touch)
_VERIFIED_TMP = re.compile(r"\.\.verified\.json\.tmp\d+")  # atomic_write's temp file, left by a crash
# what a prepared dir's tokenizer/ holds: llmtrain's Tokenizer writes the first three, transformers (format 1) more
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                             "merges.txt", "added_tokens.json", "chat_template.jinja"})
_MAX_ID, _BIG = (1 << 32) - 1, (1 << 63) - 1  # token ids fit uint32; counts int64
# meta.json's integers: (key, low, high, required)
_INT_FIELDS = (("train_tokens", 0, _BIG, True), ("val_tokens", 0, _BIG, True), ("vocab_size", 1, _MAX_ID + 1, True),
               ("eos_token_id", 0, _MAX_ID, True), ("max_token_id", -1, _MAX_ID, False), ("documents", 0, _BIG, False),
               ("characters", 0, _BIG, False), ("replaced_bytes", 0, _BIG, False))


def _count(value: Any, low: int = 0, high: int = _BIG) -> bool:
    """An int (not a bool, not a float) in [low, high]."""
    return type(value) is int and low <= value <= high


def _plain_name(name: Any) -> bool:
    """A file name directly inside a dir: no separator, not hidden, not '.' or '..'."""
    return (isinstance(name, str) and name != "" and not name.startswith(".")
            and not any(c in name for c in "/\\\0") and Path(name).name == name)


def meta_problem(meta: Any) -> str | None:
    """Why a parsed meta.json is not one llmtrain wrote, in a few words; None when it is (format 1's missing
    "shards" filled in by the caller). Every field a reader uses is checked here: counts are ints, the dtype
    is uint16 or uint32, shard files and the tokenizer dir are plain names inside the dir."""
    if not isinstance(meta, dict):
        return "it is not a JSON object"
    if not _count(meta.get("format"), 1) or not isinstance(meta.get("hash"), str):
        return "it has no 'format' and 'hash'"
    if meta.get("dtype") not in TOKEN_DTYPES:
        return f"its dtype {str(meta.get('dtype'))[:40]!r} is not one of {', '.join(TOKEN_DTYPES)}"
    for key, low, high, required in _INT_FIELDS:
        if (required or key in meta) and not _count(meta.get(key), low, high):
            return f"its {key!r} is not a count"
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict) or not _plain_name(tok.get("dir", "tokenizer")):
        return "its tokenizer 'dir' is not a dir name inside it"
    shards = meta.get("shards")
    if not isinstance(shards, dict) or not all(isinstance(shards.get(s), list) for s in ("train", "val")):
        return "it has no 'shards' with train and val lists"
    seen = {"meta.json", tok.get("dir", "tokenizer")}
    for split in ("train", "val"):
        for shard in shards[split]:
            if not isinstance(shard, dict) or not _count(shard.get("tokens")):
                return f"a {split} shard is not {{file, tokens}}"
            name = shard.get("file")
            if not _plain_name(name) or name in seen:
                return f"its shard file {str(name)[:80]!r} is not a file name of its own inside the dir"
            seen.add(name)
            if not isinstance(shard.get("sha256", ""), str) or type(shard.get("mtime_ns", 0)) is not int:
                return f"shard {name!r} has a malformed sha256 or mtime_ns"
    return None


def parse_meta(prepared: Path) -> dict[str, Any] | str:
    """`prepared`/meta.json, checked (meta_problem); else why not, as words that follow "meta.json"."""
    try:
        meta = json.loads((prepared / "meta.json").read_text())
    except (OSError, ValueError, RecursionError) as e:
        return f"is unreadable ({str(e)[:160]})"
    if isinstance(meta, dict) and "shards" not in meta and meta.get("format") == 1:  # one file per split
        meta["shards"] = {s: [{"file": f"{s}.bin", "tokens": meta.get(f"{s}_tokens")}] for s in ("train", "val")}
    why = meta_problem(meta)
    return f"is not llmtrain's ({why})" if why else meta


def read_meta(prepared: Path) -> dict[str, Any]:
    """The checked meta.json of a prepared dir; one line when it is not one llmtrain wrote."""
    meta = parse_meta(prepared)
    if isinstance(meta, str):
        raise ConfigError("data.source", f"{prepared}/meta.json {meta}; re-prepare the dataset from its source")
    return meta


def existing_output(out: Path) -> dict[str, Any] | None:
    """The meta.json of an output dir prepare wrote; None when `out` is absent or an empty dir. Refused with
    one line: a file, a run dir, a dir whose meta.json is not llmtrain's, any other non-empty dir."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ConfigError("data.out_dir", f"{out} is a file, not a dir; choose a new or empty dir")
    marker = next((name for name in RUN_FILES if (out / name).exists()), None)
    if marker is not None:
        raise ConfigError("data.out_dir", f"{out} is a run dir (it holds {marker}), not a prepared dataset; it is "
                                          "left as it is: choose a new or empty dir")
    if not (out / "meta.json").exists():
        if any(out.iterdir()):
            raise ConfigError("data.out_dir", f"{out} exists and is not a prepared dataset; choose a new or empty dir")
        return None
    meta = parse_meta(out)
    if isinstance(meta, str):
        raise ConfigError("data.out_dir", f"{out}/meta.json {meta}, so {out} is not a dir prepare wrote; it is "
                                          "left as it is: choose a new or empty dir")
    return meta


def _own(entry: Path, meta: dict[str, Any]) -> bool:
    """Whether `entry` (a top-level file of a prepared dir) is one prepare wrote, per its meta."""
    shards = {s["file"] for split in ("train", "val") for s in meta["shards"][split]}
    named = entry.name in shards or entry.name in ("meta.json", VERIFIED) or _VERIFIED_TMP.fullmatch(entry.name)
    return bool(named) and entry.is_file() and not entry.is_symlink()


def foreign_entry(out: Path, meta: dict[str, Any]) -> str | None:
    """The first entry of `out` (by name) that prepare did not write there, per its meta.json; None when there
    is none. Its own: meta.json, the listed shard files, the tokenizer dir's files, .verified.json."""
    tok_dir = meta["tokenizer"].get("dir", "tokenizer")
    for entry in sorted(out.iterdir()):
        if entry.name == tok_dir and entry.is_dir() and not entry.is_symlink():
            for f in sorted(entry.iterdir()):
                if f.name not in TOKENIZER_FILES or f.is_symlink() or not f.is_file():
                    return f"{entry.name}/{f.name}"
        elif not _own(entry, meta):
            return entry.name
    return None


def refuse_foreign(out: Path, meta: dict[str, Any]) -> None:
    """ConfigError naming the first entry of `out` prepare did not write: such a dir is never replaced."""
    if (name := foreign_entry(out, meta)) is not None:
        raise ConfigError("data.out_dir", f"{out} holds {name!r}, which prepare did not write; nothing was replaced "
                                          "(force=true does not change that): move it out, or choose another dir")


def remove_prepared(out: Path, meta: dict[str, Any]) -> None:
    """Delete what prepare wrote in `out` (meta.json last, so a crash leaves a dir that is found damaged), then
    `out` itself; refused (refuse_foreign) when it holds anything else, and then nothing is deleted."""
    refuse_foreign(out, meta)
    tok_dir = out / meta["tokenizer"].get("dir", "tokenizer")
    for entry in sorted(out.iterdir()):
        if entry == tok_dir and entry.is_dir() and not entry.is_symlink():
            for f in entry.iterdir():
                if f.name in TOKENIZER_FILES and f.is_file() and not f.is_symlink():
                    f.unlink(missing_ok=True)
            with contextlib.suppress(FileNotFoundError):
                entry.rmdir()
        elif entry.name != "meta.json" and _own(entry, meta):
            entry.unlink(missing_ok=True)
    left = sorted(e.name for e in out.iterdir() if e.name != "meta.json") if out.exists() else []
    if left:  # arrived since the check: kept, with the meta.json that describes the rest
        raise ConfigError("data.out_dir", f"{out} holds {left[0]!r}, which prepare did not write; it was kept: "
                                          "move it out, or choose another dir")
    (out / "meta.json").unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        out.rmdir()


def shard_problem(out: Path, meta: dict[str, Any]) -> str | None:
    """What is wrong with the shard files (a few words), or None. Sizes are always checked; checksums when a
    file's mtime is not the one recorded at preparation (and not already checked at its current mtime)."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    try:
        verified = json.loads((out / VERIFIED).read_text())
    except (OSError, ValueError, RecursionError):
        verified = {}
    verified = verified if isinstance(verified, dict) else {}
    checked = {}
    root = out.resolve()
    for split in ("train", "val"):
        for shard in meta["shards"][split]:
            path = out / shard["file"]
            try:
                st = path.stat()
            except OSError:
                return f"{shard['file']} is missing"
            if path.resolve().parent != root:  # a link out of the dir: never read
                return f"{shard['file']} is a link to a file outside {out}"
            want = shard["tokens"] * itemsize
            if st.st_size != want:
                return f"{shard['file']} has {st.st_size:,} bytes, meta.json says {want:,} (truncated or edited)"
            stamp = [st.st_size, st.st_mtime_ns]
            if "sha256" not in shard or st.st_mtime_ns == shard.get("mtime_ns") or verified.get(shard["file"]) == stamp:
                continue
            if file_digest(path) != shard["sha256"]:
                return f"{shard['file']} does not match its checksum in meta.json (edited after preparing)"
            checked[shard["file"]] = stamp
    if checked:
        with contextlib.suppress(OSError):  # a read-only dataset is checked again next time
            atomic_write_text(out / VERIFIED, json.dumps({**verified, **checked}))
    return None


def load_prepared(out: Path) -> tuple[dict[str, Any], toks.Tokenizer]:
    """meta.json and the dataset's own tokenizer (checked against the recorded hash); the shard files are
    checked against meta.json (sizes, and checksums where they may have changed)."""
    meta = read_meta(out)
    if (why := shard_problem(out, meta)) is not None:
        raise ConfigError("data.source", f"the prepared data in {out} is damaged: {why}; prepare it again (delete "
                                         "the dir, or give the raw source)")
    tok = toks.Tokenizer.from_dir(out / meta["tokenizer"].get("dir", "tokenizer"))
    recorded = meta["tokenizer"].get("hash")
    if recorded and toks.tokenizer_hash(tok) != recorded:
        raise ConfigError("data.source", f"{out}/tokenizer differs from the one the data was tokenised with "
                                         f"(hash {recorded}); re-prepare the dataset")
    return meta, tok
