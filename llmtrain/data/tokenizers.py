"""Tokenizers: a Rust `tokenizers` backend with its end-of-text token, saved in the Hugging Face layout.

`byte`: 256 byte symbols + <|endoftext|>; `bpe`: byte-level BPE trained on the corpus; a local dir
(`tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt`) or a hub name. Loading a saved tokenizer
(`tokenizer.json` + `tokenizer_config.json`) needs only the `tokenizers` library, not transformers (whose
import costs seconds); transformers converts a vocab/merges dir or a hub name when data is prepared, and
`AutoTokenizer.from_pretrained` loads what `Tokenizer.save_pretrained` writes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.errors import ConfigError

EOS = "<|endoftext|>"
MAX_LENGTH = 1 << 30  # the model's context, not the tokenizer, bounds a text


def _content(tok: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or {"content": ...}."""
    return tok.get("content") if isinstance(tok, dict) else tok


class Tokenizer:
    """A fast tokenizer: `backend_tokenizer` (tokenizers.Tokenizer), its EOS, and the rest of its HF config.

    Speaks the part of transformers' tokenizer API llmtrain uses (`tok(text)["input_ids"]`, `decode`,
    `eos_token_id`, `len(tok)`, `save_pretrained`), so a transformers tokenizer works wherever this does.
    """

    def __init__(self, backend: Any, eos_token: str = EOS, config: dict[str, Any] | None = None) -> None:
        self.backend_tokenizer = backend
        self.eos_token = eos_token
        self.eos_token_id = backend.token_to_id(eos_token)
        if self.eos_token_id is None:
            raise ConfigError("data.tokenizer", f"the tokenizer has no {eos_token!r} token")
        self.config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token, "bos_token": eos_token,
                       "unk_token": eos_token, "model_max_length": MAX_LENGTH, "clean_up_tokenization_spaces": False,
                       **(config or {})}
        self.config["eos_token"] = eos_token
        self.chat_template: str | None = self.config.get("chat_template")

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, out: str | Path) -> None:
        """tokenizer.json, tokenizer_config.json and special_tokens_map.json, as transformers writes them."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.backend_tokenizer.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")
        specials = {k: self.config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if self.config.get(k)}
        (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        """A dir with tokenizer.json (+ tokenizer_config.json); else transformers converts what the dir holds."""
        from tokenizers import Tokenizer as Backend

        cfg_path = path / "tokenizer_config.json"
        config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        if (path / "tokenizer.json").is_file():
            config = {k: (_content(v) if k.endswith("_token") else v) for k, v in config.items()
                      if k in CONFIG_KEYS}
            config["chat_template"] = read_chat_template(path, config.get("chat_template"))
            if config["chat_template"] is None:
                del config["chat_template"]
            return cls(Backend.from_file(str(path / "tokenizer.json")), config.get("eos_token") or EOS, config)
        return cls.from_transformers(_transformers_tokenizer(str(path)))

    @classmethod
    def from_transformers(cls, tok: Any) -> Tokenizer:
        """Wrap a transformers fast tokenizer (its backend, special tokens and chat template)."""
        if not getattr(tok, "is_fast", False):
            raise ConfigError("data.tokenizer", f"{tok.name_or_path!r} has no fast (Rust) tokenizer; give a dir with "
                                                "tokenizer.json or vocab.json+merges.txt")
        if tok.eos_token is None:
            raise ConfigError("data.tokenizer", f"tokenizer {tok.name_or_path!r} has no end-of-text token")
        config = {k: getattr(tok, k, None) for k in ("bos_token", "unk_token", "pad_token")}
        config["model_max_length"] = min(int(getattr(tok, "model_max_length", MAX_LENGTH)), MAX_LENGTH)
        if getattr(tok, "chat_template", None):
            config["chat_template"] = tok.chat_template
        return cls(tok.backend_tokenizer, tok.eos_token, {k: v for k, v in config.items() if v is not None})


def read_chat_template(path: Path, configured: Any = None) -> str | None:
    """A tokenizer dir's chat template: tokenizer_config.json's (a string, or the `default` of a named list),
    else the `chat_template.jinja` file newer transformers write beside it."""
    if isinstance(configured, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in configured if isinstance(t, dict)}
        configured = named.get("default")
    if isinstance(configured, str) and configured.strip():
        return configured
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return None


CONFIG_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "model_max_length", "chat_template",
               "clean_up_tokenization_spaces")


def _transformers_tokenizer(name_or_dir: str) -> Any:
    from transformers import AutoTokenizer, GPT2TokenizerFast

    from llmtrain.export import quiet_transformers

    quiet_transformers()
    path = Path(name_or_dir)
    if path.is_dir() and not (path / "tokenizer_config.json").is_file() and (path / "vocab.json").is_file():
        return GPT2TokenizerFast.from_pretrained(name_or_dir)
    return AutoTokenizer.from_pretrained(name_or_dir, trust_remote_code=False)  # never a dir's own code


def _wrap(tok: Any) -> Tokenizer:
    return Tokenizer(tok, EOS, {"pad_token": EOS})


def byte_tokenizer() -> Tokenizer:
    """Every byte is a token (ids 0-255, GPT-2's byte-to-unicode symbols), <|endoftext|> is 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return _wrap(tok)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on `texts` (HF tokenizers), GPT-2's pre-tokenisation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def load_pretrained_tokenizer(name_or_dir: str) -> Tokenizer:
    """GPT-2 BPE (or any fast tokenizer) from a local dir or a hub name."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            raise ConfigError("data.tokenizer", f"{path} holds no tokenizer (need tokenizer.json, or vocab.json "
                                                "and merges.txt)")
        try:
            return Tokenizer.from_dir(path)
        except ConfigError:
            raise
        except Exception as e:  # a garbled tokenizer.json, a dir asking for its own code, an unknown class
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ConfigError("data.tokenizer", f"cannot load the tokenizer in {path}: {why}") from None
    if name_or_dir.startswith((".", "/", "~")) or path.suffix:
        raise ConfigError("data.tokenizer", f"tokenizer dir not found: {name_or_dir}")
    from llmtrain.hub import OFFLINE_HINT, prepare_hub_lookup

    online = prepare_hub_lookup()
    try:
        return Tokenizer.from_transformers(_transformers_tokenizer(name_or_dir))
    except (OSError, ValueError) as e:
        why = str(e).splitlines()[0] if online else OFFLINE_HINT
        raise ConfigError("data.tokenizer", f"cannot load tokenizer {name_or_dir!r} ({why}); a local dir, "
                                            "bpe or byte work offline") from None


def check_bpe_size(vocab_size: int) -> None:
    """The vocabulary size a BPE can be trained to."""
    if vocab_size < 257:
        raise ConfigError("data.vocab_size", f"a bpe vocabulary needs > 256 tokens (got {vocab_size})")
    if vocab_size > (1 << 31) - 1:
        raise ConfigError("data.vocab_size", f"{vocab_size} is too large")


def build_tokenizer(spec: str, vocab_size: int, texts: Iterable[str] | None = None) -> Tokenizer:
    """`byte` | `bpe` (trained on `texts`) | local dir | hub name."""
    if spec == "byte":
        return byte_tokenizer()
    if spec == "bpe":
        check_bpe_size(vocab_size)
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
