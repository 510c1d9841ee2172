"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks.

Setup order: activation checkpointing on the blocks → torch.compile (per block, in place, so state-dict
keys stay plain) → `fully_shard` on every block, then on the root. The root group holds the rest of the
parameters, including tied ones (GPT-2's `lm_head.weight` is `transformer.wte.weight`), so a tie stays a
single sharded parameter. Mixed precision is FSDP's `MixedPrecisionPolicy` (compute in bf16/fp16, reduce
and keep the master weights in fp32), not autocast. Checkpoints are `torch.distributed.checkpoint`
(DCP) directories: every rank writes its own shard, nothing is gathered.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from llmtrain.distributed.base import (
    OptimizerFactory,
    SetupArgs,
    TorchOptimizerStrategy,
    apply_activation_checkpointing,
)
from llmtrain.distributed.env import init_single_process_group
from llmtrain.precision import Precision, make_grad_scaler
from llmtrain.safeio import UnsafeFile, culprit, find_cause, load_torch, safe_pickle_load, save_torch

DCP_SUBDIR = "dcp"  # <ckpt>/dcp/{.metadata, __<rank>_0.distcp}
SCALER_FILE = "scaler.pt"


class FSDPStrategy(TorchOptimizerStrategy):
    """Fully sharded data parallel (FSDP2); also runs with one process (a 1-rank mesh)."""

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, args: SetupArgs) -> None:
        self.args = args
        init_single_process_group(self.device, self.cfg.backend)  # fully_shard needs a mesh, even of 1
        model = model.to(self.device)
        blocks_cls = args.block_classes
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
        for m in blocks:
            fully_shard(m, **kw)
        fully_shard(model, **kw)
        self.model = model
        self.optimizer = make_optimizer(model)  # after sharding: the optimizer sees DTensor shards
        self.scaler = make_grad_scaler(args.precision, self.device, sharded=True)

    def unwrap(self) -> nn.Module:
        """The module itself (its parameters are DTensor shards; use full_state_dict() for weights)."""
        return self.model

    # one step ---------------------------------------------------------------------------------------
    def micro_step(self, sync_grads: bool) -> contextlib.AbstractContextManager:
        """Skip the reduce-scatter on non-final micro-steps (gradients accumulate unsharded)."""
        assert isinstance(self.model, FSDPModule)
        self.model.set_requires_gradient_sync(sync_grads)
        return contextlib.nullcontext()

    # checkpoints: DCP, one shard file per rank ----------------------------------------------------------
    def save(self, ckpt_dir: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        out = ckpt_dir / DCP_SUBDIR
        out.mkdir(parents=True, exist_ok=True)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out))
        if self.scaler is not None and self.dist.is_main:  # the scale is the same on every rank
            save_torch(self.scaler.state_dict(), ckpt_dir / SCALER_FILE)

    def load(self, ckpt_dir: Path) -> None:
        """DCP reshards: a checkpoint of any world size loads onto this one."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with refusing_unsafe(ckpt_dir / DCP_SUBDIR):
            dcp.load(state, storage_reader=SafeReader(str(ckpt_dir / DCP_SUBDIR)), planner=SafePlanner())
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        if self.scaler is not None and (ckpt_dir / SCALER_FILE).is_file():
            self.scaler.load_state_dict(load_torch(ckpt_dir / SCALER_FILE))

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """All-gather the full weights to CPU on rank 0 (a collective: every rank calls it)."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=opts)
        return state if self.dist.is_main else None


# safe DCP loading: DCP unpickles its metadata and non-tensor values in full; these load only known types --------
_DCP_META = "torch.distributed.checkpoint.metadata."
DCP_METADATA_GLOBALS = {
    *(_DCP_META + n for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                             "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    "torch.distributed.checkpoint.filesystem._StorageInfo", "torch.Size", "torch.serialization._get_layout",
    "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath", "collections.OrderedDict",
    *(f"torch.{d}" for d in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
                             "bool", "complex64", "float8_e4m3fn", "float8_e5m2")),
}


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is unpickled with an allow-list (safeio.SafeUnpickler)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = safe_pickle_load(Path(self._get_metadata_path(kwargs.get("rank"))), DCP_METADATA_GLOBALS)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


@contextlib.contextmanager
def refusing_unsafe(dcp_dir: Path) -> Iterator[None]:
    """A DCP load whose reads refused a pickle (weights_only: a tensor or value of a crafted checkpoint; DCP
    wraps it in its own exception on every rank) ends in UnsafeFile: one line."""
    safe_pickle_load(dcp_dir / ".metadata", DCP_METADATA_GLOBALS)  # first: DCP turns a refusal here into text
    try:
        yield
    except UnsafeFile:
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        refused = find_cause(e, (pickle.UnpicklingError, UnsafeFile))
        if refused is None:
            raise
        if isinstance(refused, UnsafeFile):
            raise UnsafeFile(refused.message) from None
        raise UnsafeFile(f"{dcp_dir} is refused: an item of it names {culprit(refused)}, which could run code when "
                         "loaded (only tensors, containers and numbers are loaded)") from None


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that loads non-tensor values with weights_only=True."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        obj = torch.load(value, weights_only=True)
        if getattr(self, "flatten_state_dict", False) and hasattr(self, "mappings"):
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


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


def consolidate_fsdp(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The plain model state dict from an FSDP (DCP) checkpoint, in one process without a process group."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class Planner(_EmptyStateDictLoadPlanner):
        load_bytes = SafePlanner.load_bytes

    state: dict[str, Any] = {}
    # What format_utils.dcp_to_torch_save does, minus the optimizer state and the temporary file.
    with refusing_unsafe(Path(ckpt_dir) / DCP_SUBDIR):
        _load_state_dict(state, storage_reader=SafeReader(str(Path(ckpt_dir) / DCP_SUBDIR)),
                         planner=Planner(keys={"model"}), no_dist=True)
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state["model"].items()}
