"""Regression models: linear (y = Xw + b) and a two-layer ReLU net.

Loss: for each sample the squared error is averaged over the outputs, then summed over the batch;
count = number of samples. So the trainer's loss (and eval_loss) is the per-sample MSE, which for
a well-fitted linear target approaches noise_std**2 whatever out_features is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmtrain.errors import ConfigError
from llmtrain.models.base import Batch, DataInfo, register_model
from llmtrain.models.state_io import PlainModuleSpec

ARCHS = ("linear", "mlp")


@dataclass
class RegressionModelConfig:
    """`model.*` for family regression."""

    family: str = "regression"
    arch: str = "linear"  # linear | mlp
    hidden: int = 64  # mlp hidden width


class MLP(nn.Sequential):
    """Linear(in, hidden) - ReLU - Linear(hidden, out)."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


@register_model("regression", config=RegressionModelConfig, task="regression",
                presets=("linear.yaml", "mlp.yaml"))
class RegressionSpec(PlainModuleSpec):
    def build(self, cfg: RegressionModelConfig, info: DataInfo) -> nn.Module:
        if info.in_features is None or info.out_features is None:
            raise ConfigError("data.kind", "regression models need in_features/out_features from the data")
        if cfg.arch == "linear":
            return nn.Linear(info.in_features, info.out_features)
        if cfg.arch == "mlp":
            if cfg.hidden <= 0:
                raise ConfigError("model.hidden", f"must be > 0 (got {cfg.hidden})")
            return MLP(info.in_features, cfg.hidden, info.out_features)
        raise ConfigError("model.arch", f"unknown regression arch {cfg.arch!r}; choose one of {list(ARCHS)}")

    def report(self, cfg: RegressionModelConfig, info: DataInfo, path: Path) -> list[str]:
        """A linear fit: the learnt w and b beside the true ones the data was drawn with."""
        if cfg.arch != "linear" or info.true_w is None or info.true_b is None:
            return []
        model = self.load(cfg, info, path)
        w = model.weight.detach().double().T.numpy()  # [F, out], as y = X w + b
        b = model.bias.detach().double().numpy()  # [out]
        true_w, true_b = np.asarray(info.true_w), np.asarray(info.true_b)
        lines = ["llmtrain: linear fit y = Xw + b, learnt vs true:"]
        for (i, j), v in np.ndenumerate(w):
            name = f"w[{i}]" if w.shape[1] == 1 else f"w[{i},{j}]"
            lines.append(f"  {name:<8} {v:+.4f}  true {true_w[i, j]:+.4f}")
        for j, v in enumerate(b):
            lines.append(f"  {'b' if len(b) == 1 else f'b[{j}]':<8} {v:+.4f}  true {true_b[j]:+.4f}")
        lines.append(f"  max |w - true w| = {np.abs(w - true_w).max():.4f}, max |b - true b| = "
                     f"{np.abs(b - true_b).max():.4f} (noise std {info.noise_std})")
        return lines

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        pred = model(batch["x"])  # [B, out]
        y = batch["y"]  # [B, out]
        per_sample = (pred.float() - y.float()).pow(2).mean(dim=1)  # [B]
        return per_sample.sum(), torch.tensor(y.shape[0], device=y.device)

