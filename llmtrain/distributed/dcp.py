"""The checkpoint format of every strategy that steps a torch optimizer (single, ddp, fsdp):
`torch.distributed.checkpoint` (DCP) over `get_state_dict` / `set_state_dict`.

Model and optimizer state are keyed by parameter name (the plain model's), whatever wraps the model: plain
tensors under single and ddp (DCP writes a replicated tensor once), DTensor shards under fsdp (each rank
writes its own). DCP loads a checkpoint into whatever layout the model has now, so single, ddp and fsdp at
any world size resume each other's checkpoints, optimizer state included. A partly frozen model (LoRA,
model.freeze) saves its trainable parameters only; the frozen ones come back from the same config.

DCP unpickles its metadata and its non-tensor values in full: these are read here through allow-lists
(safeio), and every tensor through `torch.load(weights_only=True)`; a refusal anywhere is one line.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from llmtrain.distributed.base import clean_key
from llmtrain.safeio import UnsafeFile, culprit, find_cause, load_torch, safe_pickle_load, save_torch

DCP_SUBDIR = "dcp"  # <ckpt>/dcp/{.metadata, __<rank>_0.distcp}
SCALER_FILE = "scaler.pt"  # the fp16 loss scale (the same on every rank)


def save_state(module: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path, *, trainable_only: bool,
               scaler: Any = None, is_main: bool = True) -> None:
    """Model + optimizer (+ loss scaler) state into ckpt_dir; every rank calls this."""
    opts = StateDictOptions(ignore_frozen_params=trainable_only)
    model_sd, optim_sd = _state_dicts(module, optimizer, opts)
    out = ckpt_dir / DCP_SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out))
    if scaler is not None and is_main:
        save_torch(scaler.state_dict(), ckpt_dir / SCALER_FILE)


def load_state(module: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path, *, trainable_only: bool,
               scaler: Any = None) -> None:
    """Inverse of save_state, into the model's current layout (any world size, any of the three strategies)."""
    opts = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    model_sd, optim_sd = _state_dicts(module, optimizer, opts)
    state = {"model": model_sd, "optim": optim_sd}
    with refusing_unsafe(ckpt_dir / DCP_SUBDIR), _single_process_quiet():
        dcp.load(state, storage_reader=SafeReader(str(ckpt_dir / DCP_SUBDIR)), planner=SafePlanner())
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=opts)
    for g, own in zip(optimizer.param_groups, kernels, strict=True):  # how this layout steps, not the saved one's
        g.update(own)  # (a run saved where fused kernels could take every parameter, resumed where they cannot)
    if scaler is not None and (ckpt_dir / SCALER_FILE).is_file():
        scaler.load_state_dict(load_torch(ckpt_dir / SCALER_FILE))


def _state_dicts(module: nn.Module, optimizer: torch.optim.Optimizer, opts: StateDictOptions) -> tuple[dict, dict]:
    """get_state_dict, without a frozen parameter under a second name either (a tie: GPT-2's lm_head.weight is
    its token embedding, which LoRA freezes), nor what a frozen 4-bit weight serialises beside it (its
    `.absmax`, `.quant_map`, ...: rebuilt with the weight)."""
    model_sd, optim_sd = get_state_dict(module, optimizer, options=opts)
    if opts.ignore_frozen_params:
        frozen = {clean_key(n) for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}

        def of_frozen(key: str) -> bool:
            parts = key.split(".")
            return any(".".join(parts[:i]) in frozen for i in range(len(parts), 0, -1))

        model_sd = {k: v for k, v in model_sd.items() if not of_frozen(k)}
    return model_sd, optim_sd


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every save and load without a process group (one process): that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


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



def read_dcp(ckpt_dir: Path, keys: tuple[str, ...] = ("model",)) -> dict[str, Any]:
    """`keys` of a DCP checkpoint (model; optim: its state keyed by parameter name) as whole tensors on the
    CPU, in one process without a process group (any of single, ddp, fsdp, any world size)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class Planner(_EmptyStateDictLoadPlanner):
        load_bytes = SafePlanner.load_bytes

    state: dict[str, Any] = {}
    # What format_utils.dcp_to_torch_save does, minus the temporary file.
    with refusing_unsafe(Path(ckpt_dir) / DCP_SUBDIR):
        _load_state_dict(state, storage_reader=SafeReader(str(Path(ckpt_dir) / DCP_SUBDIR)),
                         planner=Planner(keys=set(keys)), no_dist=True)
    return state


def consolidate_dcp(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The plain model state dict of a DCP checkpoint."""
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in read_dcp(ckpt_dir)["model"].items()}
