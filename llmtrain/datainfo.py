"""The contract between data and models: what a batch is and what a model must know of its data.

A neutral module both sides import (data modules fill DataInfo, model specs read it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE_INDEX = -100  # the label of a position without a target (padding, prompt tokens)

Batch = dict[str, torch.Tensor]


@dataclass
class DataInfo:
    """What a model needs to know about its data (filled by the data module). Data never reads the model's
    config: the model checks what it needs against these fields when it is built."""

    task: str  # "lm" | "regression" | "classification" (a plugin's own task names are fine)
    # lm
    vocab_size: int | None = None  # the tokenizer's ids
    eos_token_id: int | None = None
    tokenizer: Any = None  # llmtrain's Tokenizer, or a transformers fast tokenizer
    needed_vocab: int | None = None  # embedding rows the data needs: its largest token id + 1
    packed: bool = False  # rows hold several examples (position_ids, doc_ids): attention stays within each
    prepared_dir: str | None = None  # text: the prepared dataset (its tokenizer/ is the data's)
    # regression
    in_features: int | None = None
    out_features: int | None = None
    true_w: list[list[float]] | None = None  # synthetic: the weights [F, out] the data was drawn with
    true_b: list[float] | None = None
    noise_std: float | None = None
    # classification
    num_classes: int | None = None
    image_shape: tuple[int, int, int] | None = None  # (C, H, W)
    classes: list[str] | None = None  # class names
    extra: dict[str, Any] = field(default_factory=dict)  # what a plugin's data kind tells its own model family
