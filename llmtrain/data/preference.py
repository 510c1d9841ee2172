"""Preference pairs for DPO (`data=preference`, with `trainer.objective=dpo`; see llmtrain/preference.py).

Each JSONL line is `{"prompt": ..., "chosen": ..., "rejected": ...}` (field names configurable). Each pair gives
two examples tokenised as the instruct kind's prompt/completion ones (llmtrain/data/instruct.py): prompt +
response + EOS, the response and EOS as targets, the prompt's labels IGNORE_INDEX. A batch of B pairs is 2B rows,
right-padded together: the B chosen rows first, then the B rejected rows in the same order. Chat `messages`
pairs are not read (a first slice).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtrain.data.base import DataModule, register_data
from llmtrain.data.instruct import TOO_LONG, json_objects, rows
from llmtrain.datainfo import IGNORE_INDEX, Batch, DataInfo
from llmtrain.distributed.dist import Dist
from llmtrain.errors import ConfigError


@dataclass
class PreferenceDataConfig:
    """`data.*` for kind preference."""

    kind: str = "preference"
    source: str = ""  # a .jsonl of {"prompt", "chosen", "rejected"} records
    val_source: str | None = None  # a .jsonl for evaluation; None: hold out val_fraction of source
    val_fraction: float = 0.1
    tokenizer: str | None = None  # None: model.pretrained's tokenizer; byte | <local dir> | <hub name>
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    seq_len: int = 512  # longest row: an example's tokens minus one
    too_long: str = "truncate"  # truncate (the prompt from the left, then the end) | skip (the pair)
    prefetch: int | None = None  # batches read ahead on a thread; None: 2 on CUDA, 0 on CPU


Example = tuple[np.ndarray, np.ndarray]  # (input ids, labels)


def read_pairs(path: Path, cfg: PreferenceDataConfig, key: str) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) per line; one-line errors naming the file, line and field."""
    if not path.is_file():
        raise ConfigError(key, f"file not found: {path}")
    out = []
    fields = (("prompt", cfg.prompt_field), ("chosen", cfg.chosen_field), ("rejected", cfg.rejected_field))
    for where, rec in json_objects(path, key):
        for which, name in fields:
            if name not in rec:
                raise ConfigError(key, f"{where}: no {name!r} field (it has: {', '.join(rec) or 'none'}); "
                                       f"set data.{which}_field")
        prompt, chosen, rejected = (str(rec[name]) for _, name in fields)
        for which, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise ConfigError(key, f"{where}: empty {which!r} response")
        out.append((prompt, chosen, rejected))
    if not out:
        raise ConfigError(key, f"{path} holds no preference pairs")
    return out


def encode_pairs(pairs: list[tuple[str, str, str]], tok: Any, seq_len: int, too_long: str
                 ) -> tuple[list[tuple[Example, Example]], int, int]:
    """(chosen, rejected) rows per pair, fitted to seq_len (instruct.rows); the truncated and skipped pair counts."""
    from llmtrain.data.tokenizers import encode_batch

    eos = tok.eos_token_id
    prompts = encode_batch(tok, [p for p, _, _ in pairs])
    out, truncated, skipped = [], 0, 0
    for col in (1, 2):
        responses = encode_batch(tok, [pair[col] for pair in pairs])
        tokens = [p + r + [eos] for p, r in zip(prompts, responses, strict=True)]
        enc = {"tokens": np.concatenate([np.asarray(t, dtype=np.int32) for t in tokens]),
               "offsets": np.cumsum([0] + [len(t) for t in tokens]).astype(np.int64),
               "targets": np.concatenate([np.asarray([0] * len(p) + [1] * (len(r) + 1), dtype=np.uint8)
                                          for p, r in zip(prompts, responses, strict=True)])}
        fitted = [rows(enc, np.array([i]), seq_len, too_long) for i in range(len(pairs))]
        out.append(fitted)
    pairs_out = []
    for (c, tc, _), (r, tr, _) in zip(out[0], out[1], strict=True):
        if not c or not r:  # too_long=skip: the pair goes when either side is too long
            skipped += 1
            continue
        truncated += bool(tc or tr)
        pairs_out.append((c[0], r[0]))
    return pairs_out, truncated, skipped


class PairedExamples:
    """One pair per item; a batch of B pairs is [chosen × B; rejected × B] rows, right-padded to the longest
    (EOS inputs, ignored labels)."""

    def __init__(self, pairs: list[tuple[Example, Example]], pad_id: int) -> None:
        self.pairs, self.pad_id = pairs, pad_id

    def __len__(self) -> int:
        return len(self.pairs)

    def get(self, indices: np.ndarray) -> Batch:
        picked = [self.pairs[int(i)] for i in indices]
        seqs = [c for c, _ in picked] + [r for _, r in picked]
        T = max(len(x) for x, _ in seqs)
        ids = np.full((len(seqs), T), self.pad_id, dtype=np.int64)  # [2B, T]
        labels = np.full((len(seqs), T), IGNORE_INDEX, dtype=np.int64)
        for row, (x, y) in enumerate(seqs):
            ids[row, : len(x)], labels[row, : len(y)] = x, y
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}


@register_data("preference", config=PreferenceDataConfig, task="lm", presets=("preference.yaml",))
class PreferenceDataModule(DataModule):
    """Tokenises and serves (chosen, rejected) pairs for trainer.objective=dpo."""

    def __init__(self, cfg: PreferenceDataConfig, *, dist: Dist = Dist(), model_tokenizer: str | None = None) -> None:
        from llmtrain.data.instruct import _tokenizer

        self.cfg = cfg
        check_config(cfg)
        tok = _tokenizer(cfg, model_tokenizer)  # type: ignore[arg-type]  (reads .tokenizer only)
        pairs = read_pairs(Path(cfg.source).expanduser(), cfg, "data.source")
        if cfg.val_source:
            val = read_pairs(Path(cfg.val_source).expanduser(), cfg, "data.val_source")
        else:
            n = len(pairs)
            n_val = max(1, int(round(n * cfg.val_fraction)))
            if n_val >= n:
                raise ConfigError("data.val_fraction", f"holds out {n_val} of {n} pairs, leaving none to train on; "
                                                       "lower it or give data.val_source")
            order = np.random.default_rng(0).permutation(n)
            val = [pairs[i] for i in np.sort(order[:n_val])]
            pairs = [pairs[i] for i in np.sort(order[n_val:])]
        self._splits, notes, top = {}, [0, 0], tok.eos_token_id
        for split, recs in (("train", pairs), ("val", val)):
            enc, trunc, skip = encode_pairs(recs, tok, cfg.seq_len, cfg.too_long)
            if not enc:
                raise ConfigError("data.seq_len", f"every {split} pair is longer than {cfg.seq_len} tokens and "
                                                  "data.too_long=skip; raise data.seq_len or use truncate")
            self._splits[split] = PairedExamples(enc, tok.eos_token_id)
            notes = [notes[0] + trunc, notes[1] + skip]
            top = max(top, *(int(x.max()) for pair in enc for x, _ in pair))
        self.info = DataInfo(task="lm", vocab_size=len(tok), eos_token_id=tok.eos_token_id, tokenizer=tok,
                             needed_vocab=top + 1, extra={"preference": True})
        if dist.is_main:
            extra = ", ".join(f"{a} {w}" for a, w in zip(notes, ("truncated", "skipped"), strict=True) if a)
            print(f"llmtrain: preference data: {len(self._splits['train']):,} train / {len(self._splits['val']):,} "
                  f"val pairs" + (f" ({extra})" if extra else "") + ", padded per batch", flush=True)

    def split(self, name: str) -> PairedExamples:
        return self._splits[name]


def check_config(cfg: PreferenceDataConfig) -> None:
    if not cfg.source:
        raise ConfigError("data.source", "set it to a .jsonl of {\"prompt\", \"chosen\", \"rejected\"} records "
                                         "(see docs/preference.md)")
    if cfg.seq_len <= 0:
        raise ConfigError("data.seq_len", f"must be > 0 (got {cfg.seq_len})")
    if cfg.too_long not in TOO_LONG:
        raise ConfigError("data.too_long", f"must be one of {', '.join(TOO_LONG)} (got {cfg.too_long!r})")
    if cfg.val_source is None and not 0 < cfg.val_fraction < 1:
        raise ConfigError("data.val_fraction", f"must be in (0, 1) (got {cfg.val_fraction})")
