"""`strategy=auto`: the layout llmtrain-plan estimates fastest among those that fit, for this run's model and
batch on the devices this job has (GPUs per node from the launcher, the GPU model from CUDA), decided before
anything is built and said in one line at start with the runner-up beside it.

On a CPU there is no device to estimate: one process runs `single`, several run `fsdp` (the model, its gradients
and optimizer state sharded: the layout that fits whatever the others fit).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import torch

from llmtrain.distributed.base import StrategyConfig, StrategyName
from llmtrain.errors import ConfigError


def resolve(conf: Any, world_size: int, device: torch.device) -> tuple[Any, str]:
    """(conf with its strategy section replaced by the chosen layout, the line saying which and why)."""
    if device.type != "cuda":
        name = "single" if world_size == 1 else "fsdp"
        why = "one process" if world_size == 1 else f"{world_size} processes: the model, gradients and optimizer " \
                                                     "state sharded"
        return with_layout(conf, {"strategy.name": name}), f"strategy auto: {name} (on {device.type}, no device " \
                                                           f"to estimate; {why})"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    gpu = gpu_key(torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).total_memory)
    from llmtrain.plan import Cluster

    return resolve_for(conf, Cluster(nodes=max(1, world_size // local), gpus_per_node=local, gpu=gpu))


def resolve_for(conf: Any, cluster: Any) -> tuple[Any, str]:
    """resolve() for a given cluster shape (llmtrain.plan.Cluster)."""
    from llmtrain import plan

    best, _, why = plan.choose(plan.shape_of(conf), cluster, allow=_available)
    return with_layout(conf, plan.overrides_of(best)), f"strategy auto: {best.strategy} on {cluster.world} × " \
                                                       f"{cluster.gpu} ({why})"


def _available(row: Any) -> bool:
    """DeepSpeed's rows only where DeepSpeed is installed."""
    return row.layout is None or row.layout.strategy != "deepspeed" or importlib.util.find_spec("deepspeed") is not None


def with_layout(conf: Any, overrides: dict[str, Any]) -> Any:
    """conf with a fresh strategy section (the user's backend and timeout kept) set to `overrides`
    ({"strategy.name": ..., "strategy.tp": ..., ...})."""
    old: StrategyConfig = conf.strategy
    fields = {k.removeprefix("strategy."): v for k, v in overrides.items()}
    fields["name"] = StrategyName(fields["name"])
    new = StrategyConfig(backend=old.backend, timeout_s=old.timeout_s, **fields)
    return dataclasses.replace(conf, strategy=new)


def gpu_key(name: str, total_memory: int) -> str:
    """llmtrain-plan's name (GPUS) for a CUDA device: the entry whose device name it contains, the nearest in
    memory; a GPU the planner has no figures for is one line."""
    from llmtrain.plan import GPUS

    gib = total_memory / 2**30
    found = [(abs(mem - gib), key) for key, (dev, mem, *_rest) in GPUS.items() if dev.lower() in name.lower()]
    if not found:
        raise ConfigError("strategy", f"auto has no figures for {name} ({gib:.0f} GiB); choose a strategy "
                                      f"(llmtrain-plan --gpu <the nearest of {', '.join(GPUS)}> compares them)")
    return min(found)[1]
