"""Prepare a corpus once: sources → tokenizer → uint16/uint32 token files + meta.json.

The prepared dir is written to a temp dir and renamed at the end, so a dir that exists is complete.
Its name (in the cache) or its meta.json hash records the inputs; same inputs → reused as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.data import tokenizers as toks
from llmtrain.errors import ConfigError

FORMAT_VERSION = 1


def cache_root() -> Path:
    return Path(os.environ.get("LLMTRAIN_CACHE", Path.home() / ".cache" / "llmtrain")).expanduser()


# sources ---------------------------------------------------------------------------------------------
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


def resolve_files(source: str, max_bytes: int) -> list[Path]:
    """Local files named by `source` (embedded | file | glob | dir)."""
    if source == "embedded":
        return embedded_files(max_bytes)
    path = Path(source).expanduser()
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in __import__("glob").glob(str(path), recursive=True))
        files = [f for f in files if f.is_file()]
    elif path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in (".txt", ".md", ".jsonl", ".py"))
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError("data.source", f"file not found: {source}")
    if not files:
        raise ConfigError("data.source", f"no files match {source}")
    return files


def iter_documents(files: list[Path], text_field: str) -> Iterator[str]:
    """One document per text file; one per line of a .jsonl file (its `text_field`)."""
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8", errors="replace") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    if text_field not in rec:
                        raise ConfigError("data.text_field", f"{f}:{n} has no field {text_field!r}")
                    yield str(rec[text_field])
        else:
            yield f.read_bytes().decode("utf-8", errors="replace")


def _hash_inputs(files: list[Path], cfg: Any) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": FORMAT_VERSION, "tokenizer": cfg.tokenizer, "vocab": cfg.vocab_size,
                         "val": cfg.val_fraction, "field": cfg.text_field}).encode())
    tok_path = Path(cfg.tokenizer).expanduser()
    for f in ([p for p in sorted(tok_path.iterdir()) if p.is_file()] if tok_path.is_dir() else []) + files:
        h.update(str(f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:20]


def _build_tokenizer(cfg: Any, files: list[Path]) -> Any:
    if cfg.tokenizer == "byte":
        return toks.byte_tokenizer()
    if cfg.tokenizer == "bpe":
        if cfg.vocab_size < 257:
            raise ConfigError("data.vocab_size", f"a bpe vocabulary needs > 256 tokens (got {cfg.vocab_size})")
        return toks.train_bpe(iter_documents(files, cfg.text_field), cfg.vocab_size)
    return toks.load_pretrained_tokenizer(cfg.tokenizer)


# prepare -------------------------------------------------------------------------------------------------
def prepare(cfg: Any, *, quiet: bool = False, only_locate: bool = False) -> Path:
    """Return the prepared dir for cfg, building it unless an up-to-date one exists."""
    files = resolve_files(cfg.source, cfg.embedded_max_bytes)
    digest = _hash_inputs(files, cfg)
    out = Path(cfg.out_dir).expanduser() if cfg.out_dir else cache_root() / "prepared" / digest
    if (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
        if meta.get("hash") == digest:
            return out
        if only_locate:
            raise ConfigError("data.out_dir", f"{out} holds another dataset")
    if only_locate:
        raise ConfigError("data.out_dir", f"{out} was not prepared")
    tok = _build_tokenizer(cfg, files)
    eos = tok.eos_token_id
    ids: list[np.ndarray] = []
    for doc in iter_documents(files, cfg.text_field):
        ids.append(np.asarray(tok(doc, add_special_tokens=False)["input_ids"] + [eos], dtype=np.int64))
    tokens = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    if len(tokens) < 2:
        raise ConfigError("data.source", f"{cfg.source} holds no text")
    vocab = len(tok)
    dtype = np.uint16 if vocab <= 65535 else np.uint32
    n_val = max(1, int(round(len(tokens) * cfg.val_fraction)))
    split = {"train": tokens[:-n_val], "val": tokens[-n_val:]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, arr in split.items():
            arr.astype(dtype).tofile(tmp / f"{name}.bin")
        tok.save_pretrained(tmp / "tokenizer")
        meta = {"format": FORMAT_VERSION, "hash": digest, "train_tokens": int(len(split["train"])),
                "val_tokens": int(len(split["val"])), "vocab_size": vocab, "eos_token_id": eos,
                "dtype": np.dtype(dtype).name, "tokenizer": {"spec": cfg.tokenizer, "hash": toks.tokenizer_hash(tok)},
                "sources": [str(f) for f in files] if cfg.source != "embedded" else ["embedded"],
                "documents": len(ids)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        print(f"prepared {out}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
              f"vocab {vocab}", file=sys.stderr)
    return out


def load_prepared(out: Path) -> tuple[dict[str, Any], Any]:
    from transformers import AutoTokenizer

    meta = json.loads((out / "meta.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    return meta, tok
