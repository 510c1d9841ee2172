"""A model family from outside llmtrain (tests/test_plugins.py): a quadratic regressor, y = (x*x) A + x B + c.

One module and one YAML file (quadratic.yaml, the `model=quadratic` option); found through LLMTRAIN_PLUGINS or
an entry point of the `llmtrain.plugins` group. See docs/extending.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmtrain.datainfo import Batch, DataInfo
from llmtrain.errors import ConfigError, require
from llmtrain.models.base import register_model
from llmtrain.models.state_io import PlainModuleSpec


@dataclass
class QuadraticModelConfig:
    """`model.*` for family quadratic."""

    family: str = "quadratic"
    init_std: float = 0.01  # std of the initial weights
    linear_term: bool = True  # false: y = (x*x) A + c


class Quadratic(nn.Module):
    """x [B, F] -> (x*x) A + x B + c [B, out]."""

    def __init__(self, in_features: int, out_features: int, linear_term: bool, init_std: float) -> None:
        super().__init__()
        self.square = nn.Linear(in_features, out_features)
        self.linear = nn.Linear(in_features, out_features, bias=False) if linear_term else None
        for layer in (self.square, self.linear):
            if layer is not None:
                nn.init.normal_(layer.weight, std=init_std)
        nn.init.zeros_(self.square.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.square(x * x)
        return y if self.linear is None else y + self.linear(x)


@register_model("quadratic", config=QuadraticModelConfig, task="regression", presets=("quadratic.yaml",))
class QuadraticSpec(PlainModuleSpec):
    def build(self, cfg: QuadraticModelConfig, info: DataInfo) -> nn.Module:
        if info.in_features is None or info.out_features is None:
            raise ConfigError("data.kind", "the quadratic model needs in_features/out_features from the data")
        require(cfg.init_std >= 0, "model.init_std", f"must be >= 0 (got {cfg.init_std})")
        return Quadratic(info.in_features, info.out_features, cfg.linear_term, cfg.init_std)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample squared error averaged over the outputs, summed over the batch; count: samples."""
        pred, y = model(batch["x"]), batch["y"]  # [B, out] each
        per_sample = (pred.float() - y.float()).pow(2).mean(dim=1)  # [B]
        return per_sample.sum(), torch.tensor(y.shape[0], device=y.device)
