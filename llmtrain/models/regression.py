"""Regression models: linear (y = Xw + b) and a two-layer ReLU net."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RegressionModelConfig:
    """`model.*` for family regression."""

    family: str = "regression"
    arch: str = "linear"  # linear | mlp
    hidden: int = 64  # mlp hidden width
