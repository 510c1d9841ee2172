"""A causal-LM family from outside llmtrain (tests/test_plugins.py): a bigram model, the next token's logits a row
of a table [V, V] indexed by the current token. One module and one YAML file (bigram.yaml, `model=bigram`).

It meets the causal-LM protocol (llmtrain/models/protocol.py): its context is one token, so its cache holds
nothing but the slots the protocol counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.datainfo import IGNORE_INDEX, Batch, DataInfo
from llmtrain.errors import ConfigError
from llmtrain.models.base import register_model
from llmtrain.models.protocol import Cache, nll_from_logits
from llmtrain.models.state_io import PlainModuleSpec


@dataclass
class BigramModelConfig:
    """`model.*` for family bigram."""

    family: str = "bigram"
    init_std: float = 0.02


class Bigram(nn.Module):
    """input_ids [B, T] -> logits [B, T, V] of each position's next token, from that position's token alone."""

    def __init__(self, vocab: int, init_std: float) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        nn.init.normal_(self.table.weight, std=init_std)

    @property
    def max_positions(self) -> int:
        return 1 << 20  # any length: a token's logits never look back further than itself

    @property
    def vocab_size(self) -> int:
        return self.table.num_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids)

    def allocate_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device,
                       static: bool = False) -> Cache:
        return Cache(length, device, static)

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: Cache | None = None,
               mask: torch.Tensor | None = None, *, static: bool = False, last_only: bool = False) -> torch.Tensor:
        if cache is not None and not static:
            cache.pos += input_ids.shape[1]
        return self.table(input_ids[:, -1:] if last_only else input_ids)

    def nll(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return nll_from_logits(self.table(input_ids), labels)


@register_model("bigram", config=BigramModelConfig, task="lm", presets=("bigram.yaml",))
class BigramSpec(PlainModuleSpec):
    def build(self, cfg: BigramModelConfig, info: DataInfo) -> nn.Module:
        if info.vocab_size is None:
            raise ConfigError("data.kind", "the bigram model needs the data's vocabulary")
        return Bigram(max(info.vocab_size, info.needed_vocab or 0), cfg.init_std)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]  # [B, T]
        loss = F.cross_entropy(model(batch["input_ids"]).float().flatten(0, 1), labels.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, (labels != IGNORE_INDEX).sum()

    def count(self, batch: Batch) -> int:
        return int(np.count_nonzero(batch["labels"].numpy() != IGNORE_INDEX))

    def causal_lm(self, model: nn.Module) -> Bigram:
        return model
