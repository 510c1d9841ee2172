"""Language-modelling data: prepared token shards read as fixed seq_len blocks (+1 target token)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtrain.data.base import DataModule, register_data
from llmtrain.datainfo import Batch, DataInfo
from llmtrain.distributed.dist import Dist
from llmtrain.errors import ConfigError


@dataclass
class TextDataConfig:
    """`data.*` for kind text."""

    kind: str = "text"
    source: str = "embedded"  # embedded | text file | glob | dir | .jsonl | HF saved dir or hub name | prepared dir
    tokenizer: str = "bpe"  # byte | bpe | <local dir> | <hub name>
    vocab_size: int = 2048  # for tokenizer=bpe
    seq_len: int = 128  # block size; each block also holds its next-token targets
    val_fraction: float = 0.05  # tail of the token stream held out for eval
    out_dir: str | None = None  # prepared dataset dir; None: a cache dir keyed by the inputs' hash
    text_field: str = "text"  # JSONL / HF datasets column
    hf_split: str = "train"  # split of a HF dataset source
    num_proc: int = 1  # 1: in-process Rust batch encoder; >1: datasets.map(num_proc=...)
    shard_tokens: int = 100_000_000  # tokens per shard file (train_000.bin, ...)
    embedded_max_bytes: int = 4_000_000  # cap on the embedded corpus
    prefetch: int | None = None  # batches read ahead on a thread; None: 2 on CUDA (pinned), 0 on CPU


class TokenBlocks:
    """Block i = stream[i*T : i*T + T + 1] of the concatenated, memmapped shards: inputs and targets.

    Blocks are packed over the whole split, so a block may span two shard files; it is then read
    from both. Every token but the last T of the split starts in exactly one block's inputs.
    """

    def __init__(self, paths: list[Path], dtype: str, seq_len: int) -> None:
        from llmtrain.data.shards import TOKEN_DTYPES

        if dtype not in TOKEN_DTYPES:  # token ids only: never an object (or any other) dtype from a meta.json
            raise ConfigError("data.source", f"token shards of dtype {str(dtype)[:40]!r} are not read; "
                                             f"prepared data holds {' or '.join(TOKEN_DTYPES)}")
        self.seq_len = seq_len
        self.shards = [np.memmap(p, dtype=np.dtype(dtype), mode="r") for p in paths if p.stat().st_size > 0]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # [S+1] global start of each shard
        self.total = int(self.offsets[-1])
        self.n = max(0, (self.total - 1) // seq_len)
        self._span = np.arange(seq_len + 1, dtype=np.int64)  # [T+1]

    def __len__(self) -> int:
        return self.n

    def _read(self, start: int, length: int) -> np.ndarray:
        """stream[start : start+length], across shard boundaries."""
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while length > 0:
            local = start - int(self.offsets[k])
            piece = self.shards[k][local : local + length]
            parts.append(piece)
            start, length, k = start + len(piece), length - len(piece), k + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """int64 [B, T+1] token rows of the blocks at `indices`."""
        T = self.seq_len
        idx = np.asarray(indices, dtype=np.int64)
        if len(self.shards) == 1:  # one gather from the memmap
            return self.shards[0][idx[:, None] * T + self._span].astype(np.int64)
        out = np.empty((len(idx), T + 1), dtype=np.int64)
        for j, i in enumerate(idx):
            out[j] = self._read(int(i) * T, T + 1)
        return out

    def get(self, indices: np.ndarray) -> Batch:
        block = torch.from_numpy(self.rows(indices))  # [B, T+1]
        return {"input_ids": block[:, :-1].contiguous(), "labels": block[:, 1:].contiguous()}


@register_data("text", config=TextDataConfig, task="lm", presets=("text.yaml",))
class TextDataModule(DataModule):
    """Prepares (once, on rank 0) and memmaps a tokenised corpus; a prepared dir is used as is."""

    def __init__(self, cfg: TextDataConfig, *, dist: Dist = Dist(), model_tokenizer: str | None = None) -> None:
        from llmtrain.data.prepared import check_config, prepare
        from llmtrain.data.shards import load_prepared

        self.cfg = cfg
        if cfg.seq_len <= 0:
            raise ConfigError("data.seq_len", f"must be > 0 (got {cfg.seq_len})")
        check_config(cfg)
        out = prepare(cfg, quiet=False) if dist.is_main else None  # rank 0 first, the others find its dir
        dist.barrier()
        out = out or prepare(cfg, quiet=True, only_locate=True)
        self.dir = out
        self.meta, tok = load_prepared(out)
        self.info = DataInfo(task="lm", vocab_size=self.meta["vocab_size"], eos_token_id=self.meta["eos_token_id"],
                             tokenizer=tok, needed_vocab=needed_vocab(self.meta), prepared_dir=str(out))
        self._splits = {s: TokenBlocks([out / sh["file"] for sh in self.meta["shards"][s]], self.meta["dtype"],
                                       cfg.seq_len) for s in ("train", "val")}
        for split, ds in self._splits.items():
            if len(ds) == 0:
                raise ConfigError("data.seq_len", f"{cfg.seq_len} is longer than the {split} split "
                                                  f"({self.meta[f'{split}_tokens']} tokens); lower data.seq_len or "
                                                  "raise data.val_fraction")

    def split(self, name: str) -> TokenBlocks:
        return self._splits[name]


def needed_vocab(meta: dict[str, Any]) -> int:
    """Embedding rows a model needs for this data: up to the largest id present (and the EOS id).

    A tokenizer may list ids that never occur (e.g. a padding entry past GPT-2's 50257 tokens)."""
    top = meta.get("max_token_id", meta["vocab_size"] - 1)
    return max(top, meta["eos_token_id"]) + 1
