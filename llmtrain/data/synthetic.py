"""Synthetic regression data: y = X w + b + noise, with w and b known.

Everything (w, b, the nonlinearity's directions, X and the noise of both splits) is drawn from one
numpy Generator seeded by `data.seed`, so the data is identical on every rank and every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmtrain.data.base import DataModule, register_data
from llmtrain.datainfo import Batch, DataInfo
from llmtrain.distributed.dist import Dist
from llmtrain.errors import ConfigError, require

TARGETS = ("linear", "nonlinear")


@dataclass
class RegressionDataConfig:
    """`data.*` for kind regression."""

    kind: str = "regression"
    n_train: int = 2048
    n_val: int = 512
    in_features: int = 8
    out_features: int = 1
    noise_std: float = 0.1
    target: str = "linear"  # linear: y = Xw + b + noise; nonlinear: adds a smooth nonlinearity (mlp task)
    seed: int = 0  # the data's own seed (w, b, X, noise)
    nonlinear_scale: float = 1.0  # nonlinear: amplitude of the sin(2 X u) term


class ArrayDataset:
    """Rows of in-memory arrays: {"x": x[indices], "y": y[indices]} (regression: float32 [B, F], [B, out])."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def get(self, indices: np.ndarray) -> Batch:
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return {"x": self.x[idx], "y": self.y[idx]}


@register_data("regression", config=RegressionDataConfig, task="regression", presets=("regression.yaml",))
class RegressionDataModule(DataModule):
    """Draws w [F, out], b [out] and both splits; `true_w` / `true_b` are what a linear fit should recover.

    nonlinear target: y = X w + b + nonlinear_scale * sin(2 X u) + noise, with u [F, out] scaled so
    X u ~ N(0, 1): a smooth bump a linear model cannot fit but a small ReLU net can.
    """

    def __init__(self, cfg: RegressionDataConfig, *, dist: Dist = Dist(), model_tokenizer: str | None = None) -> None:
        self.cfg = cfg
        for key in ("n_train", "n_val", "in_features", "out_features"):
            require(getattr(cfg, key) > 0, f"data.{key}", f"must be > 0 (got {getattr(cfg, key)})")
        require(cfg.noise_std >= 0, "data.noise_std", f"must be >= 0 (got {cfg.noise_std})")
        if cfg.target not in TARGETS:
            raise ConfigError("data.target", f"unknown target {cfg.target!r}; choose one of {list(TARGETS)}")
        n_in, n_out = cfg.in_features, cfg.out_features
        g = np.random.default_rng(cfg.seed)
        self.true_w = g.standard_normal((n_in, n_out))  # [F, out]
        self.true_b = g.standard_normal(n_out)  # [out]
        self.u = g.standard_normal((n_in, n_out)) / np.sqrt(n_in)  # [F, out], nonlinear directions
        self._splits = {name: self._draw(g, n) for name, n in (("train", cfg.n_train), ("val", cfg.n_val))}
        self.info = DataInfo(task="regression", in_features=n_in, out_features=n_out,
                             true_w=self.true_w.tolist(), true_b=self.true_b.tolist(), noise_std=cfg.noise_std)

    def clean_target(self, x: np.ndarray) -> np.ndarray:
        """The noiseless target for inputs x [N, F] -> [N, out]."""
        y = x @ self.true_w + self.true_b
        if self.cfg.target == "nonlinear":
            y = y + self.cfg.nonlinear_scale * np.sin(2.0 * (x @ self.u))
        return y

    def _draw(self, g: np.random.Generator, n: int) -> ArrayDataset:
        x = g.standard_normal((n, self.cfg.in_features))  # [n, F]
        y = self.clean_target(x) + self.cfg.noise_std * g.standard_normal((n, self.cfg.out_features))
        return ArrayDataset(x.astype(np.float32), y.astype(np.float32))

    def split(self, name: str) -> ArrayDataset:
        return self._splits[name]
