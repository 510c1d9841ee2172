"""Strategies: single device, DDP, FSDP2, DeepSpeed. `build_strategy` picks one by name."""

from __future__ import annotations

import torch

from llmtrain.distributed.base import SetupArgs, Strategy, StrategyConfig, StrategyName
from llmtrain.distributed.dist import Dist


def build_strategy(cfg: StrategyConfig, dist: Dist, device: torch.device) -> Strategy:
    name = StrategyName(cfg.name)
    if cfg.tp > 1 or cfg.dp_replicate > 1:
        from llmtrain.distributed.tp import check_world

        check_world(cfg.tp, dist.world_size, name.value, quiet=not dist.is_main, dp_replicate=cfg.dp_replicate)
    if name == StrategyName.single:
        from llmtrain.distributed.single import SingleStrategy

        return SingleStrategy(cfg, dist, device)
    if name == StrategyName.ddp:
        from llmtrain.distributed.ddp import DDPStrategy

        return DDPStrategy(cfg, dist, device)
    if name == StrategyName.fsdp:
        from llmtrain.distributed.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, dist, device)
    from llmtrain.distributed.deepspeed import DeepSpeedStrategy

    return DeepSpeedStrategy(cfg, dist, device)


__all__ = ["Dist", "SetupArgs", "Strategy", "StrategyConfig", "StrategyName", "build_strategy"]
