"""Language-modelling data: a prepared token file read as fixed seq_len blocks (+1 target token)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtrain.data.base import DataModule, register_data
from llmtrain.errors import ConfigError
from llmtrain.models.base import Batch, DataInfo


@dataclass
class TextDataConfig:
    """`data.*` for kind text."""

    kind: str = "text"
    source: str = "embedded"  # embedded | text file | glob | dir | .jsonl | HF dataset name or saved dir
    tokenizer: str = "bpe"  # byte | bpe | <local dir> | <hub name>
    vocab_size: int = 2048  # for tokenizer=bpe
    seq_len: int = 128  # block size; each block also holds its next-token targets
    val_fraction: float = 0.05  # tail of the token stream held out for eval
    out_dir: str | None = None  # prepared dataset dir; None: a cache dir keyed by the inputs' hash
    text_field: str = "text"  # JSONL / HF datasets column
    num_proc: int = 1  # tokenisation processes
    embedded_max_bytes: int = 4_000_000  # cap on the embedded corpus


class TokenBlocks:
    """Block i = tokens[i*T : i*T + T + 1] of a memmapped token file: inputs and shifted targets."""

    def __init__(self, path: Path, dtype: str, seq_len: int) -> None:
        self.tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        self.seq_len = seq_len
        self.n = max(0, (len(self.tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.n

    def get(self, indices: np.ndarray) -> Batch:
        T = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * T : i * T + T + 1], dtype=np.int64) for i in indices])
        block = torch.from_numpy(rows)  # [B, T+1]
        return {"input_ids": block[:, :-1].contiguous(), "labels": block[:, 1:].contiguous()}


@register_data("text")
class TextDataModule(DataModule):
    """Prepares (once, on rank 0) and memmaps a tokenised corpus."""

    def __init__(self, cfg: TextDataConfig, *, model_cfg: Any = None, is_main: bool = True, barrier=None) -> None:
        from llmtrain.data.prepare import load_prepared, prepare

        self.cfg = cfg
        if cfg.seq_len <= 0:
            raise ConfigError("data.seq_len", f"must be > 0 (got {cfg.seq_len})")
        if not 0 < cfg.val_fraction < 1:
            raise ConfigError("data.val_fraction", f"must be in (0, 1) (got {cfg.val_fraction})")
        out = prepare(cfg, quiet=not is_main) if is_main else None
        if barrier is not None:
            barrier()
        out = out or prepare(cfg, quiet=True, only_locate=True)
        self.dir = out
        self.meta, tok = load_prepared(out)
        self.info = DataInfo(task="lm", vocab_size=self.meta["vocab_size"], eos_token_id=self.meta["eos_token_id"],
                             tokenizer=tok, extra={"prepared_dir": str(out)})
        self._splits = {s: TokenBlocks(out / f"{s}.bin", self.meta["dtype"], cfg.seq_len) for s in ("train", "val")}
        for split, ds in self._splits.items():
            if len(ds) == 0:
                raise ConfigError("data.seq_len", f"{cfg.seq_len} is longer than the {split} split "
                                                  f"({self.meta[f'{split}_tokens']} tokens); lower data.seq_len or "
                                                  "raise data.val_fraction")
        model_vocab = getattr(model_cfg, "vocab_size", None) if model_cfg is not None else None
        if model_vocab is not None and model_vocab < self.meta["vocab_size"]:
            raise ConfigError("model.vocab_size", f"{model_vocab} is smaller than the tokenizer's "
                                                  f"{self.meta['vocab_size']} tokens; unset it or raise it")

    def split(self, name: str) -> TokenBlocks:
        return self._splits[name]


def read_meta(prepared: Path) -> dict[str, Any]:
    return json.loads((prepared / "meta.json").read_text())
