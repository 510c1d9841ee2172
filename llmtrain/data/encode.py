"""Tokenisation of a source's pieces into a stream of (ids, characters, documents) batches.

In process (`encode_in_process`): pieces are gathered to ~BATCH_CHARS characters and encoded by the Rust
batch encoder, which parallelises each batch. Through `datasets` (`encode_with_datasets`, data.num_proc > 1):
pieces → Arrow on disk → `map(num_proc=...)` → ids. Either way `<|endoftext|>` follows each document, and
the ids are those of tokenising every document whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.data import tokenizers as toks
from llmtrain.data.sources import Source, iter_pieces
from llmtrain.errors import ConfigError

BATCH_CHARS = 1 << 20  # characters per in-process encode_batch call (bounds the transient ids)


def encode_in_process(pieces: Iterator[tuple[str, bool]], tok: Any, eos: int,
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


def encode_with_datasets(src: Source, cfg: Any, tok: Any, eos: int, dtype: np.dtype, work: Path,
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
