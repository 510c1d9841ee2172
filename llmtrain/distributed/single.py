"""One process on one device (CPU or a GPU): the reference every other strategy must match."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from llmtrain.distributed.base import (
    OptimizerFactory,
    SetupArgs,
    TorchOptimizerStrategy,
    apply_activation_checkpointing,
)
from llmtrain.precision import autocast, make_grad_scaler


class SingleStrategy(TorchOptimizerStrategy):
    """Plain module; autocast + GradScaler for mixed precision."""

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, args: SetupArgs) -> None:
        self.args = args
        self._plain = model.to(self.device)
        if self.cfg.tp > 1:  # tensor parallelism alone: the tp ranks are the whole world
            from llmtrain.distributed.tp import make_mesh, parallelize

            assert args.tp_plan is not None, "strategy.tp > 1 needs the model's tp_plan"
            mesh = make_mesh(self.device, self.dist.world_size, self.cfg.tp)
            parallelize(self._plain, args.block_classes, args.tp_plan, args.tp_root_plan, mesh["tp"],
                        args.sequence_parallel)
        if args.gradient_checkpointing:
            apply_activation_checkpointing(self._plain, args.block_classes)
        self.optimizer = make_optimizer(self._plain)
        # (fp16 with split parameters: the ranks must agree on skipping a step: the scaler reduces its inf check)
        self.scaler = make_grad_scaler(args.precision, self.device, sharded=self.cfg.tp > 1)
        self.model = self._wrap(torch.compile(self._plain) if args.compile else self._plain)

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model

    def unwrap(self) -> nn.Module:
        return self._plain

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.args.precision, self.device)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.cfg.tp > 1:  # split projections: gathered (a collective: every rank calls it)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self._plain, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))
            return state if self.dist.is_main else None
        return self._plain.state_dict() if self.dist.is_main else None

    def sampling_model(self, build: Callable[[], nn.Module]) -> nn.Module | None:
        """The trained module itself (no copy): replicas are whole on every rank (split ones are gathered)."""
        if self.cfg.tp > 1:
            return super().sampling_model(build)
        return self._plain if self.dist.is_main else None
