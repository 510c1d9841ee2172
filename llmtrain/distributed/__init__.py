"""Strategies: single device, DDP, FSDP2, DeepSpeed. `build_strategy` picks one by name."""

from __future__ import annotations

from dataclasses import replace

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
    if name == StrategyName.ddp and cfg.tp > 1:
        # replicas over the data-parallel ranks, tensor parallelism inside: FSDP2's hybrid mode with shards of
        # one rank (each replica holds its whole tp shard; gradients all-reduced over the replicas, overlapped
        # with the backward pass as DDP's are), so the split parameters stay DTensors for clipping and checkpoints
        from llmtrain.distributed.fsdp import FSDPStrategy

        return FSDPStrategy(replace(cfg, dp_replicate=dist.world_size // cfg.tp, reshard_after_forward=False), dist,
                            device)
    if name == StrategyName.ddp:
        from llmtrain.distributed.ddp import DDPStrategy

        return DDPStrategy(cfg, dist, device)
    if name == StrategyName.fsdp:
        from llmtrain.distributed.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, dist, device)
    from llmtrain.distributed.deepspeed import DeepSpeedStrategy

    return DeepSpeedStrategy(cfg, dist, device)


__all__ = ["Dist", "SetupArgs", "Strategy", "StrategyConfig", "StrategyName", "build_strategy"]
