"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks.

Setup order: tensor parallelism inside each block (strategy.tp > 1: distributed/tp.py, FSDP then shards over
the "dp" dim of the mesh) → activation checkpointing on the blocks → torch.compile (per block, in place, so state-dict
keys stay plain) → `fully_shard` on every block, then on the root. The root group holds the rest of the
parameters, including tied ones (GPT-2's `lm_head.weight` is `transformer.wte.weight`), so a tie stays a
single sharded parameter. Mixed precision is FSDP's `MixedPrecisionPolicy` (compute in bf16/fp16, reduce
and keep the master weights in fp32), not autocast. Checkpoints are the torch strategies' one format
(distributed/dcp.py): every rank writes its own shard, nothing is gathered.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from llmtrain.distributed.base import (
    OptimizerFactory,
    SetupArgs,
    TorchOptimizerStrategy,
    apply_activation_checkpointing,
)
from llmtrain.distributed.env import init_single_process_group
from llmtrain.precision import Precision, make_grad_scaler


class FSDPStrategy(TorchOptimizerStrategy):
    """Fully sharded data parallel (FSDP2); also runs with one process (a 1-rank mesh)."""

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, args: SetupArgs) -> None:
        self.args = args
        init_single_process_group(self.device, self.cfg.backend)  # fully_shard needs a mesh, even of 1
        model = model.to(self.device)
        blocks_cls = args.block_classes
        dp_mesh = None
        if self.cfg.tp > 1 or self.cfg.dp_replicate > 1:  # tensor parallelism inside each block first, then
            # FSDP over the "dp" ranks (HSDP: replicated over dp_replicate groups, sharded within each)
            from llmtrain.distributed.tp import make_mesh, parallelize

            mesh = make_mesh(self.device, self.dist.world_size, self.cfg.tp, self.cfg.dp_replicate)
            if self.cfg.tp > 1:
                assert args.tp_plan is not None, "strategy.tp > 1 needs the model's tp_plan"
                parallelize(model, blocks_cls, args.tp_plan, args.tp_root_plan, mesh["tp"], args.sequence_parallel)
            dp_mesh = mesh["dp"]
        if args.gradient_checkpointing:
            apply_activation_checkpointing(model, blocks_cls)
        # The modules to shard: each block (under its checkpoint wrapper, if any), outermost first.
        blocks = _outermost(model, blocks_cls)
        if args.compile:
            for m in blocks or [model]:
                m.compile()  # in place: keeps parameter names free of `_orig_mod.`
        mp = None
        if args.precision != Precision.fp32:
            mp = MixedPrecisionPolicy(param_dtype=args.precision.dtype, reduce_dtype=torch.float32)
        kw: dict[str, Any] = {"reshard_after_forward": self.cfg.reshard_after_forward}
        if mp is not None:
            kw["mp_policy"] = mp
        if dp_mesh is not None:
            kw["mesh"] = dp_mesh
        for m in blocks:
            fully_shard(m, **kw)
        fully_shard(model, **kw)
        self._shard_kw = kw
        self.model = model
        self.optimizer = make_optimizer(model)  # after sharding: the optimizer sees DTensor shards
        self.scaler = make_grad_scaler(args.precision, self.device, sharded=True)

    def unwrap(self) -> nn.Module:
        """The module itself (its parameters are DTensor shards; use full_state_dict() for weights)."""
        return self.model

    def shard_frozen(self, module: nn.Module) -> nn.Module:
        """Sharded as the model is (each block, then the root, on its mesh, with its mixed precision), so each rank
        holds 1/N of it; resharded after every forward (there is no backward to keep it gathered for)."""
        module = module.to(self.device).eval().requires_grad_(False)
        kw = {**self._shard_kw, "reshard_after_forward": True}
        for m in _outermost(module, self.args.block_classes):
            fully_shard(m, **kw)
        fully_shard(module, **kw)
        return module

    def state_module(self) -> nn.Module:
        return self.model

    # one step ---------------------------------------------------------------------------------------
    def micro_step(self, sync_grads: bool) -> contextlib.AbstractContextManager:
        """Skip the reduce-scatter on non-final micro-steps (gradients accumulate unsharded)."""
        assert isinstance(self.model, FSDPModule)
        self.model.set_requires_gradient_sync(sync_grads)
        return contextlib.nullcontext()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """All-gather the full weights to CPU on rank 0 (a collective: every rank calls it)."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=opts)
        return state if self.dist.is_main else None


def _outermost(model: nn.Module, classes: tuple[type[nn.Module], ...]) -> list[nn.Module]:
    """Instances of `classes`, each taken with its checkpoint wrapper when it has one, none nested."""
    if not classes:
        return []
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    def is_block(m: nn.Module) -> bool:
        inner = m._checkpoint_wrapped_module if isinstance(m, CheckpointWrapper) else m
        return isinstance(inner, classes)

    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if is_block(child):
                found.append(child)
            else:
                visit(child)

    visit(model)
    return found
