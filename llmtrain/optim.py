"""Optimizers with weight-decay groups, and warmup schedules as a pure function of the step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn


class OptimName(str, Enum):
    sgd = "sgd"
    momentum = "momentum"
    rmsprop = "rmsprop"
    adam = "adam"
    adamw = "adamw"
    adamw8bit = "adamw8bit"  # bitsandbytes' AdamW with 8-bit state (CUDA only): 2 bytes per parameter, not 8


@dataclass
class OptimConfig:
    """`optim.*`: the update rule and its hyper-parameters."""

    name: OptimName = OptimName.adamw
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.9  # momentum (SGD with momentum) and rmsprop
    nesterov: bool = False
    alpha: float = 0.99  # rmsprop smoothing
    fused: bool | None = None  # Adam/AdamW in one fused kernel per step (also skips a non-finite step on the
    # device, without a host sync); None: where torch has the kernel (CUDA, CPU)


class SchedulerName(str, Enum):
    constant = "constant"
    cosine = "cosine"
    linear = "linear"


@dataclass
class SchedulerConfig:
    """`scheduler.*`: learning-rate multiplier over steps, after a linear warmup."""

    name: SchedulerName = SchedulerName.cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine/linear decay to lr * min_lr_ratio at max_steps


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (dim >= 2); never biases, norms or scalars."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _mixed_meshes(groups: list[dict]) -> bool:
    """Whether the parameters live on more than one kind of tensor (plain, and DTensors by device mesh: tensor
    parallelism mixes them), which the foreach and fused kernels do not take in one call. The optimizer then
    steps parameter by parameter, and its param groups stay those of an unsplit model (so a checkpoint's
    optimizer state maps onto any tensor-parallel degree)."""
    kinds = set()
    for g in groups:
        for p in g["params"]:
            mesh = getattr(p, "device_mesh", None)
            kinds.add(None if mesh is None else (mesh.mesh_dim_names, tuple(mesh.mesh.flatten().tolist())))
    return len(kinds) > 1


def build_optimizer(cfg: OptimConfig, model: nn.Module, fused_default: bool = True) -> torch.optim.Optimizer:
    """The optimizer of `optim.*` over the model's trainable parameters. `fused_default`: whether `optim.fused`
    left unset means fused where torch has the kernel (the caller knows when it does not mix: FSDP's sharded
    fp16 scaler and the fused kernels disagree on the shape of found_inf)."""
    groups = param_groups(model, cfg.weight_decay)
    name = OptimName(cfg.name)
    mixed = _mixed_meshes(groups)
    each = {"foreach": False} if mixed else {}  # one parameter at a time (tensor parallelism)
    if name == OptimName.sgd:
        return torch.optim.SGD(groups, lr=cfg.lr, **each)
    if name == OptimName.momentum:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **each)
    if name == OptimName.rmsprop:
        return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=0.0, **each)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if name == OptimName.adamw8bit:
        return _adamw8bit(groups, cfg, betas)
    fused = cfg.fused if cfg.fused is not None else (
        fused_default and groups[0]["params"][0].device.type in ("cuda", "cpu"))
    fused = fused and not mixed
    if name == OptimName.adam:
        # Classic Adam: L2 penalty added to the gradient (AdamW decouples it).
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused or None, **each)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused or None, **each)


def _adamw8bit(groups: list[dict], cfg: OptimConfig, betas: tuple[float, float]) -> torch.optim.Optimizer:
    from llmtrain.errors import ConfigError

    device = groups[0]["params"][0].device
    if device.type != "cuda":
        raise ConfigError("optim.name", f"adamw8bit keeps its 8-bit state in GPU kernels (bitsandbytes); this run "
                                        f"is on {device.type}: use optim=adamw")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("optim.name", "adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
    return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)


def lr_factor(cfg: SchedulerConfig, step: int, max_steps: int) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    name = SchedulerName(cfg.name)
    if name == SchedulerName.constant:
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if name == SchedulerName.linear:
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


class Scheduler:
    """Sets every param group's lr from the step: stateless but for the step, so resume is exact."""

    def __init__(self, cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, base_lr: float,
                 max_steps: int) -> None:
        self.cfg, self.optimizer, self.base_lr, self.max_steps = cfg, optimizer, base_lr, max_steps
        self.step_count = 0
        self.apply()

    def lr(self) -> float:
        return self.base_lr * lr_factor(self.cfg, self.step_count, self.max_steps)

    def apply(self) -> None:
        lr = self.lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self) -> None:
        self.step_count += 1
        self.apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "base_lr": self.base_lr}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.apply()
