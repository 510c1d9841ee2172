"""Preference pairs for DPO (`data=preference`, with `trainer.objective=dpo`; see llmtrain/preference.py).

Each JSONL line is a text pair `{"prompt": str, "chosen": str, "rejected": str}` (field names configurable) or a
chat pair in one of TRL's two conversational formats: an explicit prompt `{"prompt": [messages], "chosen":
[one assistant message], "rejected": [one assistant message]}`, or an implicit one `{"chosen": [messages],
"rejected": [messages]}`, two conversations that share every message before their last (the assistant's).

A text pair gives two examples tokenised as the instruct kind's prompt/completion ones (llmtrain/data/instruct.py):
prompt + response + EOS, the response and EOS as targets, the prompt's labels IGNORE_INDEX. A chat pair gives two
conversations (prompt messages + one response) rendered as `data=instruct` renders chats (the tokenizer's chat
template, `template=auto`, or llmtrain's plain one, `template=plain`; llmtrain/data/chat.py), but only the final
assistant turn is a target (its answer and the template's end-of-turn token, then EOS unless that is the EOS):
earlier assistant turns in the prompt are context. Each example is fitted to seq_len by instruct.rows (the prompt
truncated from the left, or the pair skipped); pairs are not cached. A batch of B pairs is 2B rows, right-padded
together: the B chosen rows first, then the B rejected rows in the same order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtrain.data import instruct
from llmtrain.data.base import DataModule, register_data
from llmtrain.data.instruct import Chat, json_objects, rows
from llmtrain.datainfo import IGNORE_INDEX, Batch, DataInfo
from llmtrain.distributed.dist import Dist
from llmtrain.errors import ConfigError


@dataclass
class PreferenceDataConfig:
    """`data.*` for kind preference."""

    kind: str = "preference"
    source: str = ""  # a .jsonl of {"prompt", "chosen", "rejected"} records (texts or chat messages)
    val_source: str | None = None  # a .jsonl for evaluation; None: hold out val_fraction of source
    val_fraction: float = 0.1
    tokenizer: str | None = None  # None: model.pretrained's tokenizer; byte | <local dir> | <hub name>
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    template: str = "auto"  # chat pairs: auto (the tokenizer's chat template; refused without one) | plain
    seq_len: int = 512  # longest row: an example's tokens minus one
    too_long: str = "truncate"  # truncate (the prompt from the left, then the end) | skip (the pair)
    prefetch: int | None = None  # batches read ahead on a thread; None: 2 on CUDA, 0 on CPU


Example = tuple[np.ndarray, np.ndarray]  # (input ids, labels)
TextPair = tuple[str, str, str]  # (prompt, chosen, rejected)
ChatPair = tuple[Chat, Chat]  # (chosen, rejected) conversations; each Chat's one span: its last assistant turn
Pair = TextPair | ChatPair
Message = dict[str, Any]


def read_pairs(path: Path, cfg: PreferenceDataConfig, tok: Any, key: str) -> list[Pair]:
    """A text pair or a rendered chat pair per line; one-line errors naming the file, line and field."""
    from llmtrain.data.chat import template_source

    if not path.is_file():
        raise ConfigError(key, f"file not found: {path}")
    out: list[Pair] = []
    source = template_source(tok, cfg.template)
    for where, rec in json_objects(path, key):
        for which, name in (("chosen", cfg.chosen_field), ("rejected", cfg.rejected_field)):
            _require(rec, where, which, name, key)
        chosen, rejected = rec[cfg.chosen_field], rec[cfg.rejected_field]
        if isinstance(chosen, list) or isinstance(rejected, list):
            out.append(_chat_pair(rec, where, cfg, tok, source, key))
            continue
        _require(rec, where, "prompt", cfg.prompt_field, key)
        if isinstance(rec[cfg.prompt_field], list):
            raise ConfigError(key, f"{where}: {cfg.prompt_field!r} is a list of messages but {cfg.chosen_field!r} "
                                   f"and {cfg.rejected_field!r} are not; give them as lists of one assistant "
                                   "message each")
        prompt, chosen, rejected = str(rec[cfg.prompt_field]), str(chosen), str(rejected)
        for which, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise ConfigError(key, f"{where}: empty {which!r} response")
        out.append((prompt, chosen, rejected))
    if not out:
        raise ConfigError(key, f"{path} holds no preference pairs")
    return out


def _require(rec: dict[str, Any], where: str, which: str, name: str, key: str) -> None:
    if name not in rec:
        raise ConfigError(key, f"{where}: no {name!r} field (it has: {', '.join(rec) or 'none'}); "
                               f"set data.{which}_field")


def _messages(value: Any, where: str, name: str, key: str) -> list[Message]:
    """A field's messages, checked: a non-empty list of {role, content} (strings)."""
    if not isinstance(value, list) or not value:
        raise ConfigError(key, f"{where}: {name!r} must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ConfigError(key, f"{where}: {name!r} message {i} must be {{role, content}} (strings); got "
                                   f"{json.dumps(m, ensure_ascii=False)[:80]}")
    return value


def _chat_pair(rec: dict[str, Any], where: str, cfg: PreferenceDataConfig, tok: Any, source: str | None,
               key: str) -> ChatPair:
    """The (chosen, rejected) conversations of a chat pair (explicit or implicit prompt), rendered; only the last
    assistant turn of each is a target."""
    from llmtrain.data.chat import ChatTemplateError, assistant_spans

    c_name, r_name, p_name = cfg.chosen_field, cfg.rejected_field, cfg.prompt_field
    kinds = [type(rec[n]).__name__ for n in (c_name, r_name)]
    if kinds != ["list", "list"]:
        raise ConfigError(key, f"{where}: {c_name!r} and {r_name!r} must both be lists of messages or both "
                               f"strings (got a {kinds[0]} and a {kinds[1]})")
    chosen, rejected = (_messages(rec[n], where, n, key) for n in (c_name, r_name))
    if p_name in rec:  # explicit prompt: the prompt's messages, then one assistant message per side
        if not isinstance(rec[p_name], list):
            raise ConfigError(key, f"{where}: {p_name!r} is a {type(rec[p_name]).__name__} but {c_name!r} and "
                                   f"{r_name!r} are lists of messages; give the prompt as a list of messages, or "
                                   "leave it out (the implicit-prompt format: whole conversations)")
        prompt = _messages(rec[p_name], where, p_name, key)
        for name, msgs in ((c_name, chosen), (r_name, rejected)):
            if len(msgs) != 1:
                raise ConfigError(key, f"{where}: {name!r} must be one assistant message after a list-of-messages "
                                       f"{p_name!r} (got {len(msgs)})")
        convs = (prompt + chosen, prompt + rejected)
    else:  # implicit prompt: whole conversations sharing all but their last message
        convs = (chosen, rejected)
    for name, conv in zip((c_name, r_name), convs, strict=True):
        if conv[-1]["role"] != "assistant":
            raise ConfigError(key, f"{where}: the last {name!r} message must be the assistant's (the response), "
                                   f"not {conv[-1]['role']!r}")
        if not conv[-1]["content"].strip():
            raise ConfigError(key, f"{where}: empty {name!r} response")
    if convs[0][:-1] != convs[1][:-1]:
        at = next((i for i, (a, b) in enumerate(zip(convs[0][:-1], convs[1][:-1], strict=False)) if a != b),
                  min(len(convs[0]), len(convs[1])) - 1)
        raise ConfigError(key, f"{where}: {c_name!r} and {r_name!r} must share every message before their last "
                               f"(the prompt); they differ at message {at}")
    if source is None:
        raise ConfigError("data.template", f"{where}: chat messages are rendered by the tokenizer's chat template "
                                           "and this tokenizer has none; set data.template=plain for llmtrain's "
                                           "plain one, or give a tokenizer with one (data.tokenizer)")
    out = []
    for conv in convs:
        try:
            text, spans = assistant_spans(source, tok, conv)
        except ChatTemplateError as e:
            raise ConfigError("data.template", f"{where}: {e}") from None
        out.append(Chat(where, text, spans[-1:]))  # the response only: earlier assistant turns are context
    return out[0], out[1]


def encode_pairs(pairs: list[Pair], tok: Any, seq_len: int, too_long: str, key: str = "data.source"
                 ) -> tuple[list[tuple[Example, Example]], int, int]:
    """(chosen, rejected) rows per pair, tokenised as data=instruct's examples (instruct.encode_records) and fitted
    to seq_len (instruct.rows); the truncated and skipped pair counts."""
    from llmtrain.data.instruct import encode_records

    out = []
    for side in (0, 1):  # chosen, rejected
        records = [p[side] if isinstance(p[0], Chat) else (p[0], p[1 + side]) for p in pairs]
        examples = encode_records(records, tok, key)  # type: ignore[arg-type]  (ids, target flags) per pair
        enc = {"tokens": np.concatenate([np.asarray(ids, dtype=np.int32) for ids, _ in examples]),
               "offsets": np.cumsum([0] + [len(ids) for ids, _ in examples]).astype(np.int64),
               "targets": np.concatenate([np.asarray(m, dtype=np.uint8) for _, m in examples])}
        out.append([rows(enc, np.array([i]), seq_len, too_long) for i in range(len(pairs))])
    pairs_out, truncated, skipped = [], 0, 0
    for (c, tc, _), (r, tr, _) in zip(out[0], out[1], strict=True):
        if not c or not r:  # too_long=skip: the pair goes when either side is too long
            skipped += 1
            continue
        truncated += bool(tc or tr)
        pairs_out.append((c[0], r[0]))
    return pairs_out, truncated, skipped


class PairedExamples:
    """One pair per item; a batch of B pairs is [chosen × B; rejected × B] rows, right-padded to the longest
    (EOS inputs, ignored labels), and each pair's number among all pairs (`pair_index` [B]: `offset` + its index
    in this split; trainer.dpo_reference=precomputed looks the reference's log-probs up by it)."""

    def __init__(self, pairs: list[tuple[Example, Example]], pad_id: int, offset: int = 0) -> None:
        self.pairs, self.pad_id, self.offset = pairs, pad_id, offset

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
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "pair_index": torch.as_tensor(np.asarray(indices, dtype=np.int64) + self.offset)}


@register_data("preference", config=PreferenceDataConfig, task="lm", presets=("preference.yaml",))
class PreferenceDataModule(DataModule):
    """Tokenises and serves (chosen, rejected) pairs for trainer.objective=dpo."""

    def __init__(self, cfg: PreferenceDataConfig, *, dist: Dist = Dist(), model_tokenizer: str | None = None) -> None:
        from llmtrain.data.instruct import _tokenizer

        self.cfg = cfg
        check_config(cfg)
        tok = _tokenizer(cfg, model_tokenizer)  # type: ignore[arg-type]  (reads .tokenizer only)
        pairs = read_pairs(Path(cfg.source).expanduser(), cfg, tok, "data.source")
        if cfg.val_source:
            val = read_pairs(Path(cfg.val_source).expanduser(), cfg, tok, "data.val_source")
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
        val_key = "data.val_source" if cfg.val_source else "data.source"
        for split, recs, key in (("train", pairs, "data.source"), ("val", val, val_key)):
            enc, trunc, skip = encode_pairs(recs, tok, cfg.seq_len, cfg.too_long, key)
            if not enc:
                raise ConfigError("data.seq_len", f"every {split} pair is longer than {cfg.seq_len} tokens and "
                                                  "data.too_long=skip; raise data.seq_len or use truncate")
            self._splits[split] = PairedExamples(enc, tok.eos_token_id, offset=len(self._splits.get("train", ())))
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
    instruct.check_config(cfg, '{"prompt", "chosen", "rejected"} records (texts or chat messages; see '
                               "docs/preference.md)")
