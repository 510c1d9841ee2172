"""`RunContext`: what every part of one training run shares, built once by `train.py` (the composition root).

The loop, the checkpoints, the sampler and the export take this one object instead of a dozen arguments
each; each part reads its own typed section of `cfg` (a `config.Config` of dataclasses, not a DictConfig).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmtrain.distributed.dist import Dist
from llmtrain.precision import Precision

if TYPE_CHECKING:
    from llmtrain.config import Config
    from llmtrain.data.base import DataModule
    from llmtrain.models.base import ModelSpec


@dataclass
class RunContext:
    cfg: Config  # the whole run, typed
    run_dir: Path  # claimed and locked by rank 0, the same on every rank
    dist: Dist
    device: torch.device
    precision: Precision  # resolved (never auto)
    spec: ModelSpec
    data: DataModule
    fingerprint: dict[str, Any]  # what a checkpoint of this run is valid for (rundir.fingerprint)
