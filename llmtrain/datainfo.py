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
    """What a model needs to know about its data (filled by the data module)."""

    task: str  # "lm" | "regression" | "classification"
    vocab_size: int | None = None  # lm
    eos_token_id: int | None = None  # lm
    in_features: int | None = None  # regression
    out_features: int | None = None  # regression
    num_classes: int | None = None  # classification
    image_shape: tuple[int, int, int] | None = None  # classification (C, H, W)
    tokenizer: Any = None  # lm: a transformers PreTrainedTokenizerFast
    extra: dict[str, Any] = field(default_factory=dict)
