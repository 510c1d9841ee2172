"""Tensor parallelism (`strategy.tp=N`): each block's projections split over N ranks, before data parallelism.

The ranks form a 2-D mesh ("dp", "tp") of shape (world // N, N), rank r at (r // N, r % N): the N ranks of one
"tp" row hold one model between them and read the same batches; the "dp" column is what FSDP shards over
(strategy=fsdp; strategy=ddp replicates over it) — strategy=single runs tensor parallelism alone (N = the
world size).

The model family says what to split (`ModelSpec.tp_plan`: per block, {module path: style}; `tp_root_plan`:
outside the blocks). A colwise projection keeps its output features' shard (Shard(0) of its weight, a DTensor
on the "tp" dim; the model sees a plain tensor of the local heads), a rowwise one its input features' (Shard(1))
and sums the partial outputs over the "tp" ranks. A "norm" in a block hands its output to the colwise
projections as one replicated DTensor, so their partial input gradients are summed once. The embedding's and
the head's rows (the vocabulary) are split too, and the loss is vocabulary-parallel (tp_loss.py).

Sequence parallelism (strategy.sequence_parallel): between the blocks each rank holds T/N of the tokens; a
block's norms run on that shard and their output is gathered whole (one all-gather) for the projections, and
the rowwise projections reduce-scatter back to the shards (all-reduces without it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmtrain.errors import ConfigError

STYLES = ("colwise", "rowwise", "norm", "head_norm", "qkv_colwise")  # inside a block
ROOT_STYLES = ("embedding", "positions", "norm", "head")  # outside the blocks, by path from the root


def check_world(tp: int, world_size: int, strategy: str, quiet: bool = False, dp_replicate: int = 1) -> None:
    """One line when `tp` ranks per model (and `dp_replicate` groups, HSDP) cannot be laid out over this job's
    processes."""
    if dp_replicate > 1 and world_size % (dp_replicate * tp):
        raise ConfigError("strategy.dp_replicate", f"{dp_replicate} groups × strategy.tp={tp} do not divide the "
                                                   f"world size {world_size}; launch a multiple of {dp_replicate * tp} "
                                                   "processes", quiet=quiet)
    if tp <= 1:
        return
    if world_size % tp:
        raise ConfigError("strategy.tp", f"{tp} does not divide the world size {world_size}; launch a multiple of "
                                         f"{tp} processes", quiet=quiet)
    if strategy == "single" and world_size != tp:
        raise ConfigError("strategy.tp", f"strategy=single runs tensor parallelism alone: strategy.tp={tp} must "
                                         f"equal the world size {world_size}; use strategy=fsdp for dp × tp",
                          quiet=quiet)


def make_mesh(device: torch.device, world_size: int, tp: int, dp_replicate: int = 1) -> Any:
    """The ("dp", "tp") mesh of shape (world // tp, tp) over the default process group; with dp_replicate > 1
    (HSDP) the "dp" dim is itself ("dp_replicate", "dp_shard") of shape (dp_replicate, world // (dp_replicate ·
    tp)): consecutive ranks (one node's) shard the model, and the groups of them replicate it. `mesh["dp"]` is
    what FSDP takes either way (1-D: shard; 2-D: replicate × shard)."""
    import logging

    from torch.distributed.device_mesh import init_device_mesh

    # gathering FSDP × TP shards for an export or a sample takes two all-gathers, which torch logs as a warning
    # on every rank; it is the expected cost of a consolidation, not a fault
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

    if dp_replicate <= 1:
        return init_device_mesh(device.type, (world_size // tp, tp), mesh_dim_names=("dp", "tp"))
    shape = (dp_replicate, world_size // (dp_replicate * tp), tp)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    mesh["dp_replicate", "dp_shard"]._flatten("dp")  # the data-parallel ranks as one dim too (unused by FSDP)
    return _Hybrid(mesh)


class _Hybrid:
    """A 3-D mesh whose "dp" is the 2-D (dp_replicate, dp_shard) sub-mesh (what FSDP2 shards over for HSDP)."""

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh

    def __getitem__(self, name: str) -> Any:
        return self.mesh["dp_replicate", "dp_shard"] if name == "dp" else self.mesh[name]


def parallelize_blocks(model: nn.Module, block_classes: tuple[type[nn.Module], ...], plan: dict[str, str],
                       tp_mesh: Any, sequence_parallel: bool = False) -> int:
    """Apply `plan` (module paths inside a block → a style of STYLES) to every block of `model`, in place;
    returns the number of blocks split. The projections' outputs become the local shards (plain tensors)."""
    if not block_classes:
        raise ValueError("tensor parallelism needs the model's block classes")
    bad = sorted(set(plan.values()) - set(STYLES))
    if bad:
        raise ValueError(f"unknown tensor-parallel style(s) {bad}; choose from {list(STYLES)}")
    n = 0
    for m in list(model.modules()):
        if isinstance(m, block_classes):
            for path, style in plan.items():
                for s in _styles(style, sequence_parallel):
                    _apply(m.get_submodule(path), tp_mesh, s)
            n += 1
    if n == 0:
        raise ValueError(f"no block of {[c.__name__ for c in block_classes]} in the model to split")
    return n


def parallelize(model: nn.Module, block_classes: tuple[type[nn.Module], ...], plan: dict[str, str],
                root_plan: dict[str, str] | None, tp_mesh: Any, sequence_parallel: bool = False) -> int:
    """Split `model` over the "tp" mesh dim, in place: `plan` inside every block, `root_plan` (module paths from
    the root → embedding | norm | head) outside them; returns the number of blocks split. Parameters shared by
    several modules (a head tied to the embedding) stay one Parameter."""
    from llmtrain.distributed import comm_stats
    from llmtrain.distributed.tp_loss import vocab_parallel_head

    comm_stats.tp_group(tp_mesh.get_group())  # (LLMTRAIN_COUNT_COMM=1: its collectives counted as tp.*)
    shared = _aliases(model)
    n = parallelize_blocks(model, block_classes, plan, tp_mesh, sequence_parallel)
    for path, style in (root_plan or {}).items():
        if style not in ROOT_STYLES:
            raise ValueError(f"unknown tensor-parallel root style {style!r}; choose from {list(ROOT_STYLES)}")
        module = model.get_submodule(path)
        if style == "head":
            vocab_parallel_head(module, tp_mesh, sequence_parallel, tied=id(module.weight) in shared)
        else:
            for s in _styles(style, sequence_parallel, root=True):
                _apply(module, tp_mesh, s)
            if style == "embedding":
                module.register_forward_hook(_settled)
    _retie(shared)
    return n


def _settled(module: nn.Module, args: Any, out: Any) -> Any:
    """The embedding's output as a plain tensor, its collective waited for: a compiled block that receives the
    asynchronous wrapper instead hands back a wrong gradient for it (the embedding's gradient off by 65%
    relative under fsdp × tp with compiled blocks, torch 2.13; right after this copy)."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return out.clone() if isinstance(out, AsyncCollectiveTensor) else out


def _apply(module: nn.Module, mesh: Any, style: Any) -> None:
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(module, mesh, style)


def _styles(style: str, sp: bool, root: bool = False) -> list[Any]:
    """The torch ParallelStyles for one module of the plan, applied in this order (a norm under sequence
    parallelism: computed on the sequence shard, then gathered whole for the projections that read it)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
    )

    between = Shard(1) if sp else Replicate()  # the residual stream between the split projections
    if style == "colwise":
        return [ColwiseParallel()]
    if style == "qkv_colwise":  # a fused [q; k; v] projection, each rank its heads' rows of all three
        from llmtrain.distributed.tp_fused import FusedColwiseParallel
        return [FusedColwiseParallel(parts=3)]
    if style == "rowwise":
        return [RowwiseParallel(output_layouts=between)]
    if style == "embedding":
        return [RowwiseParallel(input_layouts=Replicate(), output_layouts=between)]
    if style == "positions":  # a position embedding: its output [..., T, C] cut to this rank's tokens
        return [PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(-2))] if sp else []
    if style == "head_norm":  # a norm over each of the local heads (Qwen3's q/k norms): weight replicated
        return [_replicated(), PrepareModuleInput(input_layouts=Shard(2), desired_input_layouts=Shard(2)),
                PrepareModuleOutput(output_layouts=Shard(2), desired_output_layouts=Shard(2))]
    if style == "norm":
        if root:  # the final norm: on the sequence shard, handed to the loss as it is (no split otherwise)
            return [SequenceParallel(use_local_output=True)] if sp else []
        # one gathered input shared by the column-wise projections: one all-gather (sp) and, in the backward,
        # one reduction of their partial gradients
        if sp:
            return [SequenceParallel(), PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate(),
                                                            use_local_output=False)]
        return [PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Replicate(),
                                    use_local_output=False)]
    raise ValueError(f"unknown tensor-parallel style {style!r}; choose from {list(STYLES)}")


def _replicated() -> Any:
    """A style making every parameter of the module a replicated DTensor on the "tp" mesh (its gradient,
    computed from a shard of the activations, is then summed over the ranks)."""
    from torch.distributed.tensor import distribute_module
    from torch.distributed.tensor.parallel import ParallelStyle

    class Replicated(ParallelStyle):
        def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
            return distribute_module(module, device_mesh)

    return Replicated()


def _aliases(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """{id(parameter): [(module, attribute), ...]} for the parameters held by more than one module."""
    seen: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            seen.setdefault(id(p), []).append((m, name))
    return {k: v for k, v in seen.items() if len(v) > 1}


def _retie(shared: dict[int, list[tuple[nn.Module, str]]]) -> None:
    """Point every alias of a shared parameter at the one holder's split Parameter (a DTensor) again."""
    for holders in shared.values():
        split = [getattr(m, n) for m, n in holders if hasattr(getattr(m, n), "device_mesh")]
        if split:
            for m, n in holders:
                setattr(m, n, split[0])


def total_grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The global 2-norm of the gradients of `params`, plain tensors and DTensors on any meshes mixed (each
    DTensor's norm is reduced over its own mesh; replicated ones count once)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sq = []
    for g in grads:
        n = torch.linalg.vector_norm(g, 2, dtype=torch.float32)
        if hasattr(n, "full_tensor"):
            n = n.full_tensor()
        sq.append(n.square())
    return torch.stack(sq).sum().sqrt()


def clip_grads(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip every gradient by the global norm (total_grad_norm); returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    norm = total_grad_norm(params)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            g = p.grad
            g.mul_(coef.to(g.device) if not hasattr(g, "to_local") else _like(coef, g))
    return norm


def _like(t: torch.Tensor, dt: Any) -> Any:
    """A replicated DTensor of the scalar `t` on `dt`'s mesh (DTensor arithmetic takes no plain tensors)."""
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(t.to(dt.device), dt.device_mesh, [Replicate()] * dt.device_mesh.ndim, run_check=False)
