"""Synthetic regression data: y = X w + b + noise, with w and b known."""

from __future__ import annotations

from dataclasses import dataclass


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
