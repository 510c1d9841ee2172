"""One process on one device (CPU or a GPU): the reference every other strategy must match."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from llmtrain.distributed.base import (
    OptimizerFactory,
    SetupArgs,
    TorchOptimizerStrategy,
    apply_activation_checkpointing,
)
from llmtrain.models.adapters import load_trainable_state, trainable_state
from llmtrain.precision import autocast, make_grad_scaler
from llmtrain.safeio import load_torch, save_torch


class SingleStrategy(TorchOptimizerStrategy):
    """Plain module; autocast + GradScaler for mixed precision."""

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, args: SetupArgs) -> None:
        self.args = args
        self._plain = model.to(self.device)
        if args.gradient_checkpointing:
            apply_activation_checkpointing(self._plain, args.block_classes)
        self.optimizer = make_optimizer(self._plain)
        self.scaler = make_grad_scaler(args.precision, self.device)
        self.model = self._wrap(torch.compile(self._plain) if args.compile else self._plain)

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model

    def unwrap(self) -> nn.Module:
        return self._plain

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.args.precision, self.device)

    # checkpoints: rank 0 writes the full state (DDP replicas are identical) ------------------------
    def save(self, ckpt_dir: Path) -> None:
        if self.dist.is_main:
            model = trainable_state(self._plain) if self.args.trainable_only else self._plain.state_dict()
            state = {"model": model, "optimizer": self.optimizer.state_dict()}
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            save_torch(state, ckpt_dir / "model_optim.pt")

    def load(self, ckpt_dir: Path) -> None:
        state = load_torch(ckpt_dir / "model_optim.pt", map_location=self.device)
        if self.args.trainable_only:
            load_trainable_state(self._plain, state["model"])
        else:
            self._plain.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self._plain.state_dict() if self.dist.is_main else None

    def sampling_model(self, build: Callable[[], nn.Module]) -> nn.Module | None:
        """The trained module itself (no copy): replicas are whole on every rank."""
        return self._plain if self.dist.is_main else None
