"""Tokenizers, all as transformers fast tokenizers so they save and load the same way.

`byte`: 256 byte symbols + <|endoftext|>; `bpe`: byte-level BPE trained on the corpus; a local dir
(`vocab.json`+`merges.txt` or `tokenizer.json`) or a hub name via transformers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.errors import ConfigError

EOS = "<|endoftext|>"


def _wrap(tok: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, model_max_length=1 << 30)


def byte_tokenizer() -> Any:
    """Every byte is a token (ids 0-255, GPT-2's byte-to-unicode symbols), <|endoftext|> is 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return _wrap(tok)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE trained on `texts` (HF tokenizers), GPT-2's pre-tokenisation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def load_pretrained_tokenizer(name_or_dir: str) -> Any:
    """GPT-2 BPE (or any fast tokenizer) from a local dir or a hub name."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(path))
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tok = GPT2TokenizerFast.from_pretrained(str(path))
        else:
            raise ConfigError("data.tokenizer", f"{path} holds no tokenizer (need tokenizer.json, or vocab.json "
                                                "and merges.txt)")
    elif name_or_dir.startswith((".", "/", "~")) or path.suffix:
        raise ConfigError("data.tokenizer", f"tokenizer dir not found: {name_or_dir}")
    else:
        from llmtrain.hub import OFFLINE_HINT, prepare_hub_lookup

        online = prepare_hub_lookup()
        try:
            tok = AutoTokenizer.from_pretrained(name_or_dir)
        except (OSError, ValueError) as e:
            why = str(e).splitlines()[0] if online else OFFLINE_HINT
            raise ConfigError("data.tokenizer", f"cannot load tokenizer {name_or_dir!r} ({why}); a local dir, "
                                                "bpe or byte work offline") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError("data.tokenizer", f"{name_or_dir!r} has no fast (Rust) tokenizer; give a dir with "
                                            "tokenizer.json or vocab.json+merges.txt")
    if tok.eos_token_id is None:
        raise ConfigError("data.tokenizer", f"tokenizer {name_or_dir!r} has no end-of-text token")
    return tok


def build_tokenizer(spec: str, vocab_size: int, texts: Iterable[str] | None = None) -> Any:
    """`byte` | `bpe` (trained on `texts`) | local dir | hub name."""
    if spec == "byte":
        return byte_tokenizer()
    if spec == "bpe":
        if vocab_size < 257:
            raise ConfigError("data.vocab_size", f"a bpe vocabulary needs > 256 tokens (got {vocab_size})")
        if vocab_size > (1 << 31) - 1:
            raise ConfigError("data.vocab_size", f"{vocab_size} is too large")
        assert texts is not None, "bpe needs the corpus to train on"
        return train_bpe(texts, vocab_size)
    return load_pretrained_tokenizer(spec)


def encode_batch(tok: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens (the Rust batch encoder, parallel over texts)."""
    backend = tok.backend_tokenizer
    enc = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in enc(texts, add_special_tokens=False)]


def encode_documents(tok: Any, texts: list[str], ends: list[bool], eos: int, dtype: np.dtype) -> np.ndarray:
    """One flat array: each text's ids, followed by `eos` where its document ends."""
    parts = []
    for ids, end in zip(encode_batch(tok, texts), ends, strict=True):
        if end:
            ids.append(eos)
        parts.append(np.asarray(ids, dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def vocab_len(tok: Any) -> int:
    """Number of ids the tokenizer can emit (base vocabulary + added tokens)."""
    return len(tok)


def tokenizer_hash(tok: Any) -> str:
    """Content hash of a fast tokenizer (vocabulary, merges, normalisation, special tokens)."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]
