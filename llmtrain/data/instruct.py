"""Prompt/completion and chat data for fine-tuning (`data=instruct`): the loss counts the answers' tokens only.

Each JSONL line is `{"prompt": ..., "completion": ...}` (field names configurable; the texts are joined as
they are, then EOS) or `{"messages": [{"role": ..., "content": ...}, ...]}` ending with an assistant message,
rendered by the tokenizer's chat template (`template=auto`; a tokenizer without one is refused) or llmtrain's
plain one (`template=plain`: `### {Role}:\\n{content}\\n\\n`, each answer followed by EOS). A chat trains
on every assistant turn: its answer and the template's end-of-turn token (llmtrain/data/chat.py); system and
user turns and the template's scaffolding are masked. A chat example ends after its last assistant token, then
the tokenizer's EOS unless that token is the EOS.

An example is its tokens and which of them are targets; its training row is inputs tokens[:-1] and targets
tokens[1:], with the ignore label wherever the target is not one. Rows are padded per batch (`packing=false`)
or packed into rows of `seq_len` (`packing=true`) with position ids restarting per example and `doc_ids` that
the model turns into an attention mask keeping each example to itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtrain.data.base import DataModule, register_data
from llmtrain.datainfo import IGNORE_INDEX, Batch, DataInfo
from llmtrain.distributed.dist import Dist
from llmtrain.errors import ConfigError
from llmtrain.safeio import atomic_write, file_digest

FORMAT_VERSION = 2  # 2: a target flag per token (chats train on every assistant turn)
TEMPLATES = ("auto", "plain")
TOO_LONG = ("truncate", "skip")


@dataclass
class InstructDataConfig:
    """`data.*` for kind instruct."""

    kind: str = "instruct"
    source: str = ""  # a .jsonl file of prompt/completion (or messages) records
    val_source: str | None = None  # a .jsonl for evaluation; None: hold out val_fraction of source
    val_fraction: float = 0.1
    tokenizer: str | None = None  # None: model.pretrained's tokenizer; byte | <local dir> | <hub name>
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    template: str = "auto"  # auto (the tokenizer's chat template; chats refused without one) | plain
    seq_len: int = 512  # longest row: an example's tokens minus one
    packing: bool = False  # pack examples into rows of seq_len (attention kept within each example)
    too_long: str = "truncate"  # truncate (what precedes the first target, from the left; then the end) | skip
    prefetch: int | None = None  # batches read ahead on a thread; None: 2 on CUDA, 0 on CPU


# records → text ----------------------------------------------------------------------------------------
@dataclass
class Chat:
    """A rendered chat: where it came from (file:line), its text and the characters of the assistant's turns."""

    where: str
    text: str
    spans: list[tuple[int, int]]


def json_objects(path: Path, key: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """("<file>:<line>", the object) per non-blank line of a JSONL file; a line that is not a JSON object is a
    one-line ConfigError(key) naming the file and line."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{no}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(key, f"{where}: not JSON") from None
            if not isinstance(rec, dict):
                raise ConfigError(key, f"{where}: not a JSON object")
            yield where, rec


def read_records(path: Path, cfg: InstructDataConfig, tok: Any, key: str) -> list[tuple[str, str] | Chat]:
    """(prompt, completion) or a rendered Chat per line of an existing file; one-line errors naming the file and
    line."""
    from llmtrain.data.chat import ChatTemplateError, assistant_spans, template_source

    out: list[tuple[str, str] | Chat] = []
    source = template_source(tok, cfg.template)
    for where, rec in json_objects(path, key):
        if cfg.messages_field in rec:
            msgs = rec[cfg.messages_field]
            ok = isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)
            if not ok:
                raise ConfigError(key, f"{where}: '{cfg.messages_field}' must be a list of {{role, content}} "
                                       "(strings)")
            if msgs[-1]["role"] != "assistant":
                raise ConfigError(key, f"{where}: the last message must be the assistant's (the completion)")
            if not msgs[-1]["content"].strip():
                raise ConfigError(key, f"{where}: empty completion")
            if source is None:
                raise ConfigError("data.template", f"{where}: chat messages are rendered by the tokenizer's chat "
                                                   "template and this tokenizer has none; set "
                                                   "data.template=plain for llmtrain's plain one, or give a "
                                                   "tokenizer with one (data.tokenizer)")
            try:
                text, spans = assistant_spans(source, tok, msgs)
            except ChatTemplateError as e:
                raise ConfigError("data.template", f"{where}: {e}") from None
            out.append(Chat(where, text, spans))
        else:
            for field in (cfg.prompt_field, cfg.completion_field):
                if field not in rec:
                    which = "prompt" if field == cfg.prompt_field else "completion"
                    raise ConfigError(key, f"{where}: no {field!r} field (it has: {', '.join(rec)}); "
                                           f"set data.{which}_field")
            prompt, completion = str(rec[cfg.prompt_field]), str(rec[cfg.completion_field])
            if not completion.strip():
                raise ConfigError(key, f"{where}: empty completion")
            out.append((prompt, completion))
    if not out:
        raise ConfigError(key, f"{path} holds no examples")
    return out


# tokens, cached ----------------------------------------------------------------------------------------
def _digest(path: Path, cfg: InstructDataConfig, tok: Any) -> str:
    from llmtrain.data.chat import PLAIN_TEMPLATE
    from llmtrain.data.tokenizers import tokenizer_hash

    h = hashlib.sha256(file_digest(path).encode())
    meta = [FORMAT_VERSION, tokenizer_hash(tok), cfg.prompt_field, cfg.completion_field, cfg.messages_field,
            cfg.template, getattr(tok, "chat_template", None), PLAIN_TEMPLATE, tok.eos_token_id]
    h.update(json.dumps(meta).encode())
    return h.hexdigest()[:20]


CACHE_KEYS = ("tokens", "offsets", "targets")


def _load_cache(cache: Path) -> tuple[dict[str, np.ndarray] | None, str]:
    """The arrays of a cached encoding (no pickles: allow_pickle=False), or None and why it is unusable (a
    truncated or damaged file, arrays that do not fit together)."""
    import zipfile

    try:
        with np.load(cache, allow_pickle=False) as z:
            if sorted(z.files) != sorted(CACHE_KEYS):
                return None, f"it holds {sorted(z.files)}"
            out = {k: z[k] for k in CACHE_KEYS}  # reading a member checks its CRC
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        return None, (str(e).splitlines() or [type(e).__name__])[0][:120]
    tokens, offsets, targets = out["tokens"], out["offsets"], out["targets"]
    fits = (tokens.ndim == offsets.ndim == targets.ndim == 1 and len(offsets) >= 2 and len(targets) == len(tokens)
            and offsets[0] == 0 and offsets[-1] == len(tokens) and bool((np.diff(offsets) > 0).all()))
    return (out, "") if fits else (None, "its arrays do not fit together")


def encode_records(records: list[tuple[str, str] | Chat], tok: Any, key: str) -> list[tuple[list[int], list[bool]]]:
    """(token ids, target flags) per record: prompt + completion + EOS with the completion and EOS as targets;
    a chat's tokens with its assistant turns as targets (llmtrain.data.chat.example)."""
    from llmtrain.data.chat import ChatTemplateError, example, target_mask
    from llmtrain.data.chat import encode as encode_chats
    from llmtrain.data.tokenizers import encode_batch

    pairs = [r for r in records if not isinstance(r, Chat)]
    prompts = encode_batch(tok, [p for p, _ in pairs])
    completions = encode_batch(tok, [c for _, c in pairs])
    chats = [r for r in records if isinstance(r, Chat)]
    chat_encs = encode_chats(tok, [c.text for c in chats]) if chats else []
    eos = tok.eos_token_id
    it_pairs, it_chats = iter(zip(prompts, completions, strict=True)), iter(zip(chats, chat_encs, strict=True))
    out = []
    for r in records:
        if isinstance(r, Chat):
            chat, enc = next(it_chats)
            try:
                out.append(example(tok, enc.ids, target_mask(enc.offsets, chat.spans)))
            except ChatTemplateError as e:
                raise ConfigError(key, f"{chat.where}: {e}") from None
        else:
            p, c = next(it_pairs)
            out.append((p + c + [eos], [False] * len(p) + [True] * (len(c) + 1)))
    return out


def encode_file(path: Path, cfg: InstructDataConfig, tok: Any, key: str) -> dict[str, np.ndarray]:
    """{"tokens": int32 [N], "offsets": [n+1], "targets": uint8 [N]} per example (EOS included), cached."""
    from llmtrain.data.prepared import cache_root

    if not path.is_file():
        raise ConfigError(key, f"file not found: {path}")
    cache = cache_root() / "instruct" / f"{_digest(path, cfg, tok)}.npz"
    if cache.is_file():
        cached, why = _load_cache(cache)
        if cached is not None:
            return cached
        from llmtrain.jsonl import warn

        warn(cache, f"the cached tokens of {path.name} cannot be read ({why}); encoding them again")
    examples = encode_records(read_records(path, cfg, tok, key), tok, key)
    out = {"tokens": np.concatenate([np.asarray(ids, dtype=np.int32) for ids, _ in examples]),
           "offsets": np.cumsum([0] + [len(ids) for ids, _ in examples]).astype(np.int64),
           "targets": np.concatenate([np.asarray(m, dtype=np.uint8) for _, m in examples])}
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, lambda f: np.savez(f, **out))
    return out


def rows(enc: dict[str, np.ndarray], idx: np.ndarray, seq_len: int, too_long: str
         ) -> tuple[list[tuple[np.ndarray, np.ndarray]], int, int]:
    """(input ids, labels) of the examples at `idx`, fitted to seq_len; and the truncated, skipped counts."""
    out, truncated, skipped = [], 0, 0
    for i in idx:
        a, b = int(enc["offsets"][i]), int(enc["offsets"][i + 1])
        toks, tgt = enc["tokens"][a:b].astype(np.int64), enc["targets"][a:b].astype(bool)
        if len(toks) - 1 > seq_len:
            if too_long == "skip":
                skipped += 1
                continue
            truncated += 1
            cut = len(toks) - 1 - seq_len  # tokens before the first target dropped from the left; then the end
            drop = min(cut, int(np.argmax(tgt)) if tgt.any() else len(toks))
            toks, tgt = toks[drop:][: seq_len + 1], tgt[drop:][: seq_len + 1]
        labels = toks[1:].copy()
        labels[~tgt[1:]] = IGNORE_INDEX  # target j is token j+1
        out.append((toks[:-1], labels))
    return out, truncated, skipped


class PaddedExamples:
    """One example per row; a batch is right-padded to its longest row (EOS inputs, ignored labels)."""

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> None:
        self.examples, self.pad_id = examples, pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def get(self, indices: np.ndarray) -> Batch:
        picked = [self.examples[int(i)] for i in indices]
        T = max(len(x) for x, _ in picked)
        ids = np.full((len(picked), T), self.pad_id, dtype=np.int64)  # [B, T]
        labels = np.full((len(picked), T), IGNORE_INDEX, dtype=np.int64)
        for r, (x, y) in enumerate(picked):
            ids[r, : len(x)], labels[r, : len(y)] = x, y
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}


class PackedExamples:
    """Examples packed in order into rows of seq_len; position ids restart and doc_ids number each example."""

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int) -> None:
        bins: list[list[int]] = [[]]
        used = 0
        for i, (x, _) in enumerate(examples):
            if used + len(x) > seq_len:
                bins.append([])
                used = 0
            bins[-1].append(i)
            used += len(x)
        self.arrays = {k: np.zeros((len(bins), seq_len), dtype=np.int64) for k in ("position_ids", "doc_ids")}
        self.arrays["input_ids"] = np.full((len(bins), seq_len), pad_id, dtype=np.int64)
        self.arrays["labels"] = np.full((len(bins), seq_len), IGNORE_INDEX, dtype=np.int64)
        for r, members in enumerate(bins):
            at = 0
            for d, i in enumerate(members, 1):
                x, y = examples[i]
                n = len(x)
                self.arrays["input_ids"][r, at : at + n] = x
                self.arrays["labels"][r, at : at + n] = y
                self.arrays["position_ids"][r, at : at + n] = np.arange(n)
                self.arrays["doc_ids"][r, at : at + n] = d
                at += n

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])

    def get(self, indices: np.ndarray) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        return {k: torch.from_numpy(v[idx]) for k, v in self.arrays.items()}  # each [B, seq_len]


@register_data("instruct", config=InstructDataConfig, task="lm", presets=("instruct.yaml",))
class InstructDataModule(DataModule):
    """Tokenises (once, cached; rank 0 first) and serves prompt/completion examples."""

    def __init__(self, cfg: InstructDataConfig, *, dist: Dist = Dist(), model_tokenizer: str | None = None) -> None:
        self.cfg = cfg
        check_config(cfg)
        tok = _tokenizer(cfg, model_tokenizer)
        src = Path(cfg.source).expanduser()
        val_src = Path(cfg.val_source).expanduser() if cfg.val_source else None
        encoded: dict[str, dict[str, np.ndarray]] = {}
        if dist.is_main:  # rank 0 writes the caches, the others read them
            encoded["train"] = encode_file(src, cfg, tok, "data.source")
            if val_src is not None:
                encoded["val"] = encode_file(val_src, cfg, tok, "data.val_source")
        dist.barrier()
        enc = encoded.get("train") or encode_file(src, cfg, tok, "data.source")
        n = len(enc["offsets"]) - 1
        if val_src is not None:
            val_enc = encoded.get("val") or encode_file(val_src, cfg, tok, "data.val_source")
            train_idx, val_idx = np.arange(n), None
        else:
            n_val = max(1, int(round(n * cfg.val_fraction)))
            if n_val >= n:
                raise ConfigError("data.val_fraction", f"holds out {n_val} of {n} examples, leaving none to train "
                                                       "on; lower it or give data.val_source")
            order = np.random.default_rng(0).permutation(n)
            val_enc, train_idx, val_idx = enc, np.sort(order[n_val:]), np.sort(order[:n_val])
        if val_idx is None:
            val_idx = np.arange(len(val_enc["offsets"]) - 1)
        splits, counts = {}, {}
        for split, e, idx in (("train", enc, train_idx), ("val", val_enc, val_idx)):
            ex, trunc, skip = rows(e, idx, cfg.seq_len, cfg.too_long)
            if not ex:
                raise ConfigError("data.seq_len", f"every {split} example is longer than {cfg.seq_len} tokens and "
                                                  "data.too_long=skip; raise data.seq_len or use truncate")
            splits[split] = PackedExamples(ex, cfg.seq_len, tok.eos_token_id) if cfg.packing \
                else PaddedExamples(ex, tok.eos_token_id)
            counts[split] = (len(ex), trunc, skip, sum(int((y != IGNORE_INDEX).sum()) for _, y in ex))
        self._splits = splits
        top = int(max(enc["tokens"].max(), val_enc["tokens"].max(), tok.eos_token_id))
        self.info = DataInfo(task="lm", vocab_size=len(tok), eos_token_id=tok.eos_token_id, tokenizer=tok,
                             packed=cfg.packing, needed_vocab=top + 1)
        if dist.is_main:
            print(self.describe(counts), flush=True)

    def describe(self, counts: dict[str, tuple[int, int, int, int]]) -> str:
        (n, tr, sk, targets), (nv, trv, skv, _) = counts["train"], counts["val"]
        notes = [f"{a} {what}" for a, what in ((tr + trv, "truncated"), (sk + skv, "skipped")) if a]
        layout = f"packed into {len(self._splits['train'])} rows of {self.cfg.seq_len}" if self.cfg.packing \
            else "padded per batch"
        return (f"llmtrain: instruct data: {n:,} train / {nv:,} val examples"
                + (f" ({', '.join(notes)})" if notes else "") + f", {targets:,} completion tokens, {layout}")

    def split(self, name: str) -> PaddedExamples | PackedExamples:
        return self._splits[name]


def check_config(cfg: Any, records: str = "prompt/completion (or messages) records") -> None:
    """The keys data=instruct and data=preference share (source, seq_len, template, too_long, val_fraction);
    `records`: what data.source holds, for its error."""
    if not cfg.source:
        raise ConfigError("data.source", f"set it to a .jsonl of {records}")
    if cfg.seq_len <= 0:
        raise ConfigError("data.seq_len", f"must be > 0 (got {cfg.seq_len})")
    if cfg.template not in TEMPLATES:
        raise ConfigError("data.template", f"must be one of {', '.join(TEMPLATES)} (got {cfg.template!r})")
    if cfg.too_long not in TOO_LONG:
        raise ConfigError("data.too_long", f"must be one of {', '.join(TOO_LONG)} (got {cfg.too_long!r})")
    if cfg.val_source is None and not 0 < cfg.val_fraction < 1:
        raise ConfigError("data.val_fraction", f"must be in (0, 1) (got {cfg.val_fraction})")


def _tokenizer(cfg: InstructDataConfig, model_tokenizer: str | None) -> Any:
    """data.tokenizer, else the tokenizer the model brings (its pretrained dir, handed in by the run)."""
    from llmtrain.data.tokenizers import build_tokenizer, load_pretrained_tokenizer

    spec = cfg.tokenizer
    if spec is None:
        if not model_tokenizer:
            raise ConfigError("data.tokenizer", "set data.tokenizer, or model.pretrained (its tokenizer is used)")
        return load_pretrained_tokenizer(model_tokenizer)
    if spec == "bpe":
        raise ConfigError("data.tokenizer", "bpe trains a new vocabulary; fine-tuning needs the model's own "
                                            "tokenizer (leave data.tokenizer unset to use model.pretrained's)")
    return build_tokenizer(spec, 0)
