"""GPT-2 (transformers' GPT2LMHeadModel, the Hugging Face weight format), tiny to XL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.errors import ConfigError
from llmtrain.models.base import Batch, DataInfo, ModelSpec, register_model

IGNORE_INDEX = -100


@dataclass
class GPT2ModelConfig:
    """`model.*` for family gpt2. Sizes: tiny, small (124M), medium, large, xl."""

    family: str = "gpt2"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 256
    vocab_size: int | None = None  # None: the tokenizer's size
    dropout: float = 0.0
    pretrained: str | None = None  # local dir or hub name to start from (its sizes win)


def _hf_config(cfg: GPT2ModelConfig, info: DataInfo):
    from transformers import GPT2Config

    vocab = cfg.vocab_size or info.vocab_size
    if vocab is None:
        raise ConfigError("model.vocab_size", "unknown: set model.vocab_size or use a data module with a tokenizer")
    eos = info.eos_token_id if info.eos_token_id is not None else vocab - 1
    # No pad_token_id, as in the released GPT-2: packed blocks have no padding, and with one set HF checks
    # every forward's input for it (a device sync) and warns about the EOS separators.
    return GPT2Config(vocab_size=vocab, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                      attn_pdrop=cfg.dropout, bos_token_id=eos, eos_token_id=eos,
                      tie_word_embeddings=True)


class GPT2Spec(ModelSpec):
    name = "gpt2"
    task = "lm"

    def build(self, cfg: GPT2ModelConfig, info: DataInfo) -> nn.Module:
        from transformers import GPT2LMHeadModel

        if cfg.pretrained:
            model = _from_pretrained(cfg.pretrained)
            needed = info.extra.get("needed_vocab", info.vocab_size)
            if needed is not None and needed > model.config.vocab_size:
                raise ConfigError("data.tokenizer", f"the data's token ids reach {needed - 1} but the pretrained model "
                                                    f"has {model.config.vocab_size} embeddings; use the model's tokenizer")
            return model
        if cfg.n_embd % cfg.n_head:
            raise ConfigError("model.n_head", f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        return GPT2LMHeadModel(_hf_config(cfg, info))

    def block_classes(self, model: nn.Module) -> tuple[type[nn.Module], ...]:
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        return (GPT2Block,)

    def context_length(self, cfg: GPT2ModelConfig) -> int | None:
        if cfg.pretrained:
            return None  # known once loaded; checked against the model in build()
        return cfg.n_positions

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # [B, T, V]
        labels = batch["labels"]  # [B, T], IGNORE_INDEX where there is no target
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        return loss_sum, (labels != IGNORE_INDEX).sum()

    def count(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def export(self, model: nn.Module, cfg: GPT2ModelConfig, info: DataInfo, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        if info.tokenizer is not None:
            info.tokenizer.save_pretrained(out_dir)

    def load(self, cfg: GPT2ModelConfig, info: DataInfo, path: Path) -> nn.Module:
        return _from_pretrained(str(path))


def _from_pretrained(name_or_dir: str) -> nn.Module:
    from transformers import GPT2LMHeadModel

    path = Path(name_or_dir).expanduser()
    looks_local = path.exists() or name_or_dir.startswith((".", "/", "~"))
    if looks_local and not (path / "config.json").is_file():
        raise ConfigError("model.pretrained", f"{name_or_dir} is not a Hugging Face model dir (no config.json)")
    online = True
    if not looks_local:
        from llmtrain.hub import prepare_hub_lookup

        online = prepare_hub_lookup()
    try:
        return GPT2LMHeadModel.from_pretrained(str(path) if looks_local else name_or_dir)
    except OSError as e:
        from llmtrain.hub import OFFLINE_HINT

        why = str(e).splitlines()[0] if online else OFFLINE_HINT
        raise ConfigError("model.pretrained", f"cannot load {name_or_dir!r}: {why}") from None


register_model(GPT2Spec())
