"""The Strategy interface: how a plain model is wrapped, stepped, checkpointed and unwrapped.

The trainer calls only these methods; a backend (single, DDP, FSDP2, DeepSpeed) is one module.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmtrain.distributed.dist import Dist
from llmtrain.precision import Precision

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class StrategyName(str, Enum):
    single = "single"
    ddp = "ddp"
    fsdp = "fsdp"
    deepspeed = "deepspeed"
    auto = "auto"  # the fastest layout that fits, decided at start (distributed/auto.py)


@dataclass
class StrategyConfig:
    """`strategy.*`: how the model is placed on devices."""

    name: StrategyName = StrategyName.single
    backend: str | None = None  # process-group backend; None: nccl on GPU, gloo on CPU
    timeout_s: float = 600.0  # collective timeout: a dead peer fails the job instead of hanging it
    # tensor parallelism: ranks per model; their blocks' projections split (distributed/tp.py); fsdp: dp × tp,
    # single: tp alone (= the world size)
    tp: int = 1
    # tensor parallelism: the residual stream and norms split along the sequence too (activations / tp);
    # None: wherever the model family's plan allows it
    sequence_parallel: bool | None = None
    # FSDP2
    reshard_after_forward: bool = True
    # HSDP: groups the model is replicated over (across nodes), each sharding it over world / (dp_replicate · tp)
    # ranks (within a node); fsdp only
    dp_replicate: int = 1
    # DeepSpeed
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    deepspeed_config: str | None = None  # path to a raw DeepSpeed JSON whose keys override ours
    # DDP
    find_unused_parameters: bool = False
    bucket_cap_mb: int = 25


def sequence_parallel(cfg: StrategyConfig, root_plan: dict[str, str] | None) -> bool:
    """Whether tensor parallelism splits the sequence too: as asked, or (unset) wherever the model's plan splits
    the embedding and head (ModelSpec.tp_root_plan)."""
    if cfg.tp <= 1:
        return False
    return bool(root_plan) if cfg.sequence_parallel is None else cfg.sequence_parallel


@dataclass
class SetupArgs:
    """What a strategy needs besides the model: precision, checkpointing, compile, clip, batch shape."""

    precision: Precision
    gradient_checkpointing: bool
    compile: bool
    block_classes: tuple[type[nn.Module], ...]
    micro_batch_size: int
    grad_accum_steps: int
    grad_clip: float
    trainable_only: bool = False  # checkpoints hold the trainable parameters only (the rest is frozen)
    tp_plan: dict[str, str] | None = None  # strategy.tp > 1: the model's per-block plan (ModelSpec.tp_plan)
    tp_root_plan: dict[str, str] | None = None  # and outside its blocks (ModelSpec.tp_root_plan)
    sequence_parallel: bool = False  # strategy.sequence_parallel, resolved


class Strategy(ABC):
    """Owns the wrapped model and its optimizer; hides the backend from the loop. Collectives that are not the
    backend's own (the run dir, checkpoints' manifests, stop requests, loss sums) belong to `Dist`."""

    def __init__(self, cfg: StrategyConfig, dist: Dist, device: torch.device) -> None:
        self.cfg, self.dist, self.device = cfg, dist, device
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def data_shard(self) -> tuple[int, int]:
        """(this rank's index, number) of the data-parallel replicas: the ranks of one tensor-parallel group
        (strategy.tp) read the same batches."""
        tp = max(1, self.cfg.tp)
        return self.dist.rank // tp, self.dist.world_size // tp

    def num_parameters(self) -> int:
        """Parameters of the whole model (all shards), counting tied tensors once (a 4-bit weight by its shape)."""
        return sum(qs.shape.numel() if (qs := getattr(p, "quant_state", None)) is not None else p.numel()
                   for p in self.unwrap().parameters())

    def close(self) -> None:
        """Release backend state while the process group still exists (not in destructors at exit)."""
        self.model = self.optimizer = None

    # wrapping ---------------------------------------------------------------------------------
    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, args: SetupArgs) -> None:
        """Wrap `model` (checkpointing → compile → backend) and build its optimizer."""

    @abstractmethod
    def unwrap(self) -> nn.Module:
        """The plain model (for sampling on one rank; may hold sharded parameters)."""

    def shard_frozen(self, module: nn.Module) -> nn.Module:
        """`module` (a plain copy of the model, e.g. DPO's reference) placed as the model is, frozen and in eval
        mode, to call for forwards without gradients on every rank; after setup(). Replicas hold it whole."""
        return module.to(self.device).eval().requires_grad_(False)

    # one step ---------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass (mixed precision where the backend leaves it to autocast)."""
        return contextlib.nullcontext()

    def micro_step(self, sync_grads: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's forward and backward; gradients are reduced over ranks only when
        `sync_grads` (the last micro-step of an optimizer step), else they accumulate locally."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor | None:
        """Clip by the global norm (all ranks, all shards); returns the norm before clipping.

        max_norm <= 0 only measures. A backend that clips inside its own step returns None and
        reports the norm through `last_grad_norm()` after `step()`."""

    def last_grad_norm(self) -> float:
        """The pre-clip global norm of the last step, for backends whose clip_grad_norm returns None."""
        raise NotImplementedError

    @abstractmethod
    def step(self, ok: torch.Tensor | None = None) -> bool | torch.Tensor:
        """Optimizer step then zero grads. `ok` (a bool tensor, the same on every rank): False skips the
        update (a non-finite loss or gradient norm). Returns whether the update was applied (a bool, or a
        bool tensor where reading it would wait for the device); False also for an fp16 overflow."""

    def loss_scale(self) -> float | None:
        """Current fp16 loss scale (None without loss scaling); may wait for the device."""
        return None

    @property
    def loss_scaling(self) -> bool:
        """Whether fp16 loss scaling is on (its overflow skips are not errors); never waits for the device."""
        return False

    # checkpoints --------------------------------------------------------------------------------
    layout: str  # the checkpoint format it writes and reads (manifest "layout"): dcp | deepspeed

    @abstractmethod
    def save(self, ckpt_dir: Path) -> None:
        """Write model + optimizer (+scaler) state into ckpt_dir; every rank calls it."""

    @abstractmethod
    def load(self, ckpt_dir: Path) -> None:
        """Inverse of save; on another world size too, unless reshard_refusal() said why not."""

    def reshard_refusal(self, saved_world_size: int, ckpt_dir: Path) -> str | None:
        """Why a checkpoint of this layout written by `saved_world_size` processes cannot load here (None:
        it can)."""
        return None

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Consolidated model state on rank 0 (None elsewhere), for export."""

    def sampling_model(self, build: Callable[[], nn.Module]) -> nn.Module | None:
        """The whole model with the current weights on rank 0, to sample from (None elsewhere); every rank
        calls this. Sharded backends gather into a fresh `build()` on this device."""
        state = self.full_state_dict()
        if not self.dist.is_main:
            return None
        model = build()
        model.load_state_dict(state)
        return model.to(self.device)


class TorchOptimizerStrategy(Strategy):
    """Backends that step a torch optimizer in this process (single, DDP, FSDP2), fp16 via a loss scaler; they
    share one checkpoint format (distributed/dcp.py), so each resumes the others' checkpoints."""

    scaler: Any = None  # GradScaler / ShardedGradScaler for fp16, else None
    layout = "dcp"

    def state_module(self) -> nn.Module:
        """The module whose state dict is the checkpoint's (names as in the plain model)."""
        return self.unwrap()

    def save(self, ckpt_dir: Path) -> None:
        from llmtrain.distributed.dcp import save_state

        save_state(self.state_module(), self.optimizer, ckpt_dir, trainable_only=self.args.trainable_only,
                   scaler=self.scaler, is_main=self.dist.is_main)

    def load(self, ckpt_dir: Path) -> None:
        from llmtrain.distributed.dcp import load_state

        load_state(self.state_module(), self.optimizer, ckpt_dir, trainable_only=self.args.trainable_only,
                   scaler=self.scaler)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global norm over every parameter (sharded DTensor grads reduce their partial norms)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.tp > 1:  # DTensors on the 2-D mesh beside replicated / dp-sharded ones
            from llmtrain.distributed.tp import clip_grads

            return clip_grads(list(self.unwrap().parameters()), max_norm)
        limit = max_norm if max_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.unwrap().parameters(), limit, foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def step(self, ok: torch.Tensor | None = None) -> bool | torch.Tensor:
        stepped: bool | torch.Tensor = True
        if self.scaler is not None:  # the scaler skips non-finite gradients itself (and lowers the scale)
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale  # the scale drops only when the step was skipped
        elif ok is None:
            self.optimizer.step()
        elif _takes_found_inf(self.optimizer):  # fused kernels skip the update on the device: no host sync
            self.optimizer.grad_scale, self.optimizer.found_inf = None, (~ok).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
            stepped = ok
        elif bool(ok):
            self.optimizer.step()
        else:
            stepped = False
        self.optimizer.zero_grad(set_to_none=True)
        return stepped

    def loss_scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    @property
    def loss_scaling(self) -> bool:
        return self.scaler is not None


def _takes_found_inf(opt: torch.optim.Optimizer) -> bool:
    """Fused Adam/AdamW/SGD read `found_inf` and skip their update on the device when it is set."""
    return bool(getattr(opt, "_step_supports_amp_scaling", False)) and any(g.get("fused") for g in opt.param_groups)


# Prefixes that wrappers add to parameter names but not to the plain model's state_dict keys.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_key(name: str) -> str:
    """A parameter name without wrapper prefixes (activation checkpointing, compile, engine)."""
    for prefix in _WRAPPER_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
        name = name.replace("." + prefix, ".")
    return name


def apply_activation_checkpointing(model: nn.Module, block_classes: tuple[type[nn.Module], ...]) -> None:
    """Recompute each block's activations in backward (non-reentrant checkpointing)."""
    if not block_classes:
        raise ValueError("gradient checkpointing needs the model's block classes")
    import functools

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as _apply,
    )

    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    _apply(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, block_classes))
