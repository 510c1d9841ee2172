"""A data kind from outside llmtrain (tests/test_plugins.py): points on a noisy paraboloid,
y = curvature * mean(x*x) + x w + noise, with w drawn from `seed`.

One module and one YAML file (parabola.yaml, the `data=parabola` option); found through LLMTRAIN_PLUGINS or
an entry point of the `llmtrain.plugins` group. See docs/extending.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmtrain.data.base import DataModule, register_data
from llmtrain.data.synthetic import ArrayDataset
from llmtrain.datainfo import DataInfo
from llmtrain.distributed.dist import Dist
from llmtrain.errors import require


@dataclass
class ParabolaDataConfig:
    """`data.*` for kind parabola."""

    kind: str = "parabola"
    n_train: int = 1024
    n_val: int = 256
    in_features: int = 3
    curvature: float = 1.0  # the weight of mean(x*x)
    noise_std: float = 0.05
    seed: int = 0


@register_data("parabola", config=ParabolaDataConfig, task="regression", presets=("parabola.yaml",))
class ParabolaDataModule(DataModule):
    """Both splits drawn from one numpy Generator seeded by data.seed; one output."""

    def __init__(self, cfg: ParabolaDataConfig, *, dist: Dist = Dist(), model_tokenizer: str | None = None) -> None:
        self.cfg = cfg
        for key in ("n_train", "n_val", "in_features"):
            require(getattr(cfg, key) > 0, f"data.{key}", f"must be > 0 (got {getattr(cfg, key)})")
        require(cfg.noise_std >= 0, "data.noise_std", f"must be >= 0 (got {cfg.noise_std})")
        g = np.random.default_rng(cfg.seed)
        w = g.standard_normal((cfg.in_features, 1))  # [F, 1]
        self._splits = {}
        for name, n in (("train", cfg.n_train), ("val", cfg.n_val)):
            x = g.standard_normal((n, cfg.in_features))  # [n, F]
            y = cfg.curvature * (x * x).mean(axis=1, keepdims=True) + x @ w + cfg.noise_std * g.standard_normal((n, 1))
            self._splits[name] = ArrayDataset(x.astype(np.float32), y.astype(np.float32))
        self.info = DataInfo(task="regression", in_features=cfg.in_features, out_features=1,
                             extra={"noise_std": cfg.noise_std})

    def split(self, name: str) -> ArrayDataset:
        return self._splits[name]
