"""DeepSpeed ZeRO 0-3 (optional CPU offload), bf16/fp16 from trainer.precision, sharded checkpoints.

DeepSpeed is imported lazily (it costs seconds to import). The engine owns precision, gradient
reduction and clipping; the trainer's loop stays the same:

* the trainer already divides the loss by the global target count, so ``engine.backward`` runs with
  ``scale_wrt_gas=False`` (no second division by the accumulation steps);
* the accumulation boundary is set explicitly before every micro-step
  (``set_gradient_accumulation_boundary``): ZeRO 0/1 reduce gradients only on the last micro-step,
  ZeRO 2/3 reduce-scatter every micro-step (their gradients live in partitions);
* the learning rate is set by ``llmtrain.optim.Scheduler`` on the torch optimizer's param groups,
  which DeepSpeed's ZeRO wrappers step directly (no DeepSpeed scheduler).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmtrain.distributed.base import (
    OptimizerFactory,
    SetupArgs,
    Strategy,
    apply_activation_checkpointing,
    clean_key,
)
from llmtrain.distributed.env import init_single_process_group
from llmtrain.errors import ConfigError
from llmtrain.precision import Precision

TAG = "deepspeed"  # sub-directory of a llmtrain checkpoint holding DeepSpeed's files


def _import_deepspeed(device: torch.device | None = None) -> Any:
    """Import deepspeed quietly, on the CPU accelerator for a CPU run or when no GPU is visible."""
    if "DS_ACCELERATOR" not in os.environ and (not torch.cuda.is_available()
                                               or (device is not None and device.type == "cpu")):
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError("strategy.name", f"deepspeed is not installed ({e}); pip install 'llmtrain[deepspeed]'"
                          ) from None
    from deepspeed.utils import logger as ds_logger

    if not _verbose():
        ds_logger.setLevel(logging.WARNING)
        # DeepSpeed calls torch collectives that torch deprecates; the user can do nothing about it
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")
    return deepspeed


def _forget_comm() -> None:
    """Drop DeepSpeed's cached communication backend and groups, which outlive the torch process group: a
    second run in this process (an in-process sweep, a test) must not meet the first one's groups."""
    import importlib

    with contextlib.suppress(Exception):
        groups = importlib.import_module("deepspeed.utils.groups")
        if hasattr(groups, "_release_process_group_references"):
            groups._release_process_group_references(group=None)
    with contextlib.suppress(Exception):
        importlib.import_module("deepspeed.comm.comm").cdb = None


def _verbose() -> bool:
    return os.environ.get("LLMTRAIN_DEEPSPEED_VERBOSE", "0") != "0"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `override` merged in; nested dicts merge, everything else replaces."""
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_ds_config(cfg: Any, args: SetupArgs, world_size: int, pin_memory: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON config for `strategy.*` and the trainer's SetupArgs (before user overrides)."""
    stage = int(cfg.zero_stage)
    if cfg.offload_params and stage != 3:
        raise ConfigError("strategy.offload_params", f"needs strategy.zero_stage=3 (got {stage})")
    if cfg.offload_optimizer and stage == 0:
        raise ConfigError("strategy.offload_optimizer", "needs strategy.zero_stage=1, 2 or 3 (got 0)")
    zero: dict[str, Any] = {"stage": stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    own_clip = stage == 0 and args.precision == Precision.fp32  # plain engine: we clip (and measure) ourselves
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.grad_accum_steps,
        "train_batch_size": args.micro_batch_size * args.grad_accum_steps * world_size,
        "gradient_clipping": 0.0 if own_clip else float(args.grad_clip),
        "zero_optimization": zero,
        # our optimizer comes from llmtrain.optim (any torch optimizer, also under offload)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if args.precision == Precision.bf16:
        ds["bf16"] = {"enabled": True}
    elif args.precision == Precision.fp16:
        # dynamic loss scaling from 2**16, like torch's GradScaler
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    return ds


def load_user_config(path: str | None) -> dict[str, Any]:
    """The raw DeepSpeed JSON of `strategy.deepspeed_config` ({} when unset)."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError("strategy.deepspeed_config", f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("strategy.deepspeed_config", f"{path} must hold a JSON object")
    if "scheduler" in data:
        raise ConfigError("strategy.deepspeed_config", f"{path} has a 'scheduler' block; the learning rate comes "
                                                       "from scheduler=... (remove the block)")
    return data


def _check_batch_keys(ds: dict[str, Any], args: SetupArgs, world_size: int) -> None:
    want = {"train_micro_batch_size_per_gpu": args.micro_batch_size,
            "gradient_accumulation_steps": args.grad_accum_steps,
            "train_batch_size": args.micro_batch_size * args.grad_accum_steps * world_size}
    for key, value in want.items():
        if int(ds.get(key, value)) != value:
            raise ConfigError("strategy.deepspeed_config", f"{key}={ds[key]} disagrees with the trainer ({value}); "
                                                           "set trainer.micro_batch_size / grad_accum_steps instead")


class DeepSpeedStrategy(Strategy):
    """The DeepSpeed engine behind the Strategy interface; checkpoints in DeepSpeed's own format."""

    engine: Any
    layout = "deepspeed"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, args: SetupArgs) -> None:
        deepspeed = _import_deepspeed(self.device)
        from deepspeed.accelerator import get_accelerator

        self.args = args
        self._frozen_engines: list[Any] = []  # shard_frozen's ZeRO-3 engines
        if get_accelerator().device_name() != self.device.type:
            raise ConfigError("trainer.device", f"{self.device.type}, but DeepSpeed runs on its "
                                                f"{get_accelerator().device_name()} accelerator; set DS_ACCELERATOR="
                                                f"{self.device.type} or trainer.device to match")
        if args.precision == Precision.fp16 and not get_accelerator().is_fp16_supported():
            raise ConfigError("trainer.precision", f"DeepSpeed has no fp16 on the {get_accelerator()._name} "
                                                   "accelerator; use bf16 or fp32")
        self._init_comm(deepspeed)
        ds = build_ds_config(self.cfg, args, self.dist.world_size, pin_memory=self.device.type == "cuda")
        ds = deep_merge(ds, load_user_config(self.cfg.deepspeed_config))
        _check_batch_keys(ds, args, self.dist.world_size)
        self.ds_config = ds
        if args.gradient_checkpointing:
            apply_activation_checkpointing(model, args.block_classes)
        self._plain = model
        optimizer = None if "optimizer" in ds else make_optimizer(model)  # a JSON optimizer block wins
        params = None if optimizer is not None else [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                                    config=ds, dist_init_required=False)
        if args.compile:
            self.engine.compile()
        self.model = self.engine
        # The torch optimizer whose param groups DeepSpeed steps: the Scheduler writes lr there.
        self.optimizer = self.engine.basic_optimizer
        self._own_clip = float(ds.get("gradient_clipping", 0.0)) == 0.0 and not self._engine_measures_norm()

    def _init_comm(self, deepspeed: Any) -> None:
        """Reuse the torch process group (gloo on CPU); one process gets a private world of one."""
        init_single_process_group(self.device, self.cfg.backend)  # no-op when the launcher started a group
        os.environ.setdefault("LOCAL_RANK", str(self.dist.local_rank))  # the engine reads it from the environment
        backend = self.cfg.backend or ("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cpu":
            # On CPU the comm backend JIT-builds a shared-memory op that only inference all-reduce uses: a
            # minute of gcc (echoed to the log) on first use, for nothing in training.
            import importlib

            ds_comm_torch = importlib.import_module("deepspeed.comm.torch")  # not the `torch` it re-exports
            if hasattr(ds_comm_torch, "build_shm_op"):
                ds_comm_torch.build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=timedelta(seconds=self.cfg.timeout_s))

    def _engine_measures_norm(self) -> bool:
        """ZeRO and the mixed-precision wrappers compute the global grad norm in their step."""
        e = self.engine
        return e.zero_optimization() or e.bfloat16_enabled() or e.fp16_enabled()

    def unwrap(self) -> nn.Module:
        """The plain module; under ZeRO-3 its parameters are empty placeholders outside forward."""
        return self._plain

    def shard_frozen(self, module: nn.Module) -> nn.Module:
        """ZeRO 0-2 (whole parameters on every rank): the module whole, in the dtypes the engine gave the model's
        parameters and buffers (bf16/fp16). ZeRO-3: an engine of its own without an optimizer (DeepSpeed's ZeRO
        inference, as TRL wraps its reference), partitioned like the model and gathered in each forward."""
        module = module.eval().requires_grad_(False)
        if int(self.ds_config["zero_optimization"].get("stage", 0)) == 3:
            deepspeed = _import_deepspeed(self.device)
            ds = {k: v for k, v in self.ds_config.items() if k not in ("optimizer", "scheduler")}
            ds["zero_optimization"] = {k: v for k, v in ds["zero_optimization"].items() if k != "offload_optimizer"}
            engine, *_ = deepspeed.initialize(model=module, config=ds, dist_init_required=False)
            self._frozen_engines.append(engine)
            engine.eval()  # (returns None)
            return engine
        dtypes = {clean_key(n): t.dtype for n, t in [*self._plain.named_parameters(), *self._plain.named_buffers()]}
        module = module.to(self.device)
        for n, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.is_floating_point() and dtypes.get(n, t.dtype) != t.dtype:
                t.data = t.data.to(dtypes[n])
        return module

    def close(self) -> None:
        """The engines' own teardown (ZeRO-3 hooks and buffers), before the process group goes away."""
        for frozen in getattr(self, "_frozen_engines", []):
            frozen.destroy()
        self._frozen_engines = []
        if getattr(self, "engine", None) is not None:
            self.engine.destroy()
            self.engine = None
            _forget_comm()
        super().close()

    def num_parameters(self) -> int:
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self._plain.parameters())

    # one step ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def micro_step(self, sync_grads: bool) -> Iterator[None]:
        """The engine's accumulation boundary is set before every micro-step (see the module docstring)."""
        self.engine.set_gradient_accumulation_boundary(sync_grads)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already normalised by the global count: no division by gradient_accumulation_steps.
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor | None:
        if not self._own_clip:
            return None  # the engine clips by `gradient_clipping` inside step(); see last_grad_norm()
        limit = max_norm if max_norm > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(self._plain.parameters(), limit, foreach=True)

    def last_grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def step(self, ok: torch.Tensor | None = None) -> bool:
        """ZeRO 1-3 and the mixed-precision wrappers skip a non-finite step themselves; the plain engine
        (ZeRO-0, fp32) steps a torch optimizer, which skips parameters without a gradient."""
        skip = ok is not None and not bool(ok)
        if skip and not self._engine_measures_norm():
            for p in self._plain.parameters():
                p.grad = None
        self.engine.step()
        return bool(self.engine.was_step_applied()) and not skip

    def reshard_refusal(self, saved_world_size: int, ckpt_dir: Path) -> str | None:
        return (f"checkpoint {ckpt_dir} was written by {saved_world_size} DeepSpeed processes and this run has "
                f"{self.dist.world_size}; DeepSpeed resumes only on the world size that wrote its partitions: rerun on "
                f"{saved_world_size} processes, or start a new run from its weights (llmtrain-export {ckpt_dir.parent.parent} "
                f"{ckpt_dir}, then model.pretrained=<run>/final)")

    @property
    def loss_scaling(self) -> bool:
        return bool(self.engine.fp16_enabled())

    def loss_scale(self) -> float | None:
        if not self.engine.fp16_enabled():
            return None
        scale = self.engine._get_optimizer_loss_scale()
        return float(scale) if scale is not None else None

    # checkpoints: every rank writes its own partition ---------------------------------------------------
    def save(self, ckpt_dir: Path) -> None:
        self.engine.save_checkpoint(str(ckpt_dir), tag=TAG, save_latest=False)

    def load(self, ckpt_dir: Path) -> None:
        vet_checkpoint(ckpt_dir)  # DeepSpeed unpickles in full: only known types may reach it
        path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError("trainer.resume", f"{ckpt_dir} holds no DeepSpeed checkpoint ({TAG}/)")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """fp32 master weights gathered on rank 0, keyed like the plain model's state_dict (collective)."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        full: dict[int, torch.Tensor] = {}
        seen: set[int] = set()
        for p in self._plain.parameters():  # same order on every rank: the gathers are collectives
            if id(p) in seen:
                continue
            seen.add(id(p))
            value = safe_get_full_fp32_param(p) if p.requires_grad else None
            if value is None and hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p]):
                    value = p.detach().clone()
            elif value is None:
                value = p.detach()
            if self.dist.is_main:
                full[id(p)] = value.detach().to("cpu", torch.float32).clone()
        if not self.dist.is_main:
            return None
        out: dict[str, torch.Tensor] = {}
        for key, t in self._plain.state_dict(keep_vars=True).items():
            out[clean_key(key)] = full[id(t)] if id(t) in full else t.detach().to("cpu").clone()
        return out


# What DeepSpeed's checkpoint files hold besides tensors and containers (checked by scanning its checkpoints of
# every ZeRO stage, precision and offload setting).
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
)


def vet_checkpoint(ckpt_dir: Path) -> None:
    """Refuse (one line) a DeepSpeed checkpoint whose pickles name anything but tensors and DEEPSPEED_GLOBALS."""
    from llmtrain.safeio import UnsafeFile, check_pickles

    try:
        check_pickles(sorted((Path(ckpt_dir) / TAG).glob("*.pt")), DEEPSPEED_GLOBALS)
    except UnsafeFile as e:
        raise ConfigError("checkpoint", e.message) from None


def consolidate_deepspeed(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from a llmtrain DeepSpeed checkpoint dir, in one process (no process group)."""
    _import_deepspeed()
    ds_dir = Path(ckpt_dir) / TAG
    if not ds_dir.is_dir():
        raise ConfigError("checkpoint", f"{ckpt_dir} holds no DeepSpeed checkpoint ({TAG}/)")
    vet_checkpoint(ckpt_dir)
    if not list(ds_dir.glob("*optim_states.pt")):  # ZeRO-0: the module state is complete on rank 0
        from llmtrain.safeio import load_torch

        state = load_torch(next(ds_dir.glob("mp_rank_*_model_states.pt")))["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=TAG)
    return {clean_key(k): (v.float() if v.is_floating_point() else v) for k, v in state.items()}
