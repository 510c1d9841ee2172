"""Tensor parallelism (`strategy.tp=N`): each block's projections split over N ranks, before data parallelism.

The ranks form a 2-D mesh ("dp", "tp") of shape (world // N, N), rank r at (r // N, r % N): the N ranks of one
"tp" row hold one model between them and read the same batches; the "dp" column is what FSDP shards over
(strategy=fsdp) — strategy=single runs tensor parallelism alone (N = the world size).

The model family says what to split (`ModelSpec.tp_plan`: per block, {module path: "colwise" | "rowwise"}); a
colwise projection keeps its output features' shard (Shard(0) of its weight, a DTensor on the "tp" dim, and
the model sees a plain tensor of the local heads), a rowwise one its input features' (Shard(1)) and sums the
partial outputs over the "tp" ranks. Everything else (embedding, norms, head, hence the loss) stays replicated:
each "tp" rank computes the same whole loss, and their gradients of replicated weights agree.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmtrain.errors import ConfigError

STYLES = ("colwise", "rowwise")


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
                       tp_mesh: Any) -> int:
    """Apply `plan` (module paths inside a block → colwise | rowwise) to every block of `model`, in place;
    returns the number of blocks split. The plan's module outputs become the local shards (plain tensors)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if not block_classes:
        raise ValueError("tensor parallelism needs the model's block classes")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    bad = sorted(set(plan.values()) - set(styles))
    if bad:
        raise ValueError(f"unknown tensor-parallel style(s) {bad}; choose from {list(STYLES)}")
    n = 0
    for m in list(model.modules()):
        if isinstance(m, block_classes):
            parallelize_module(m, tp_mesh, {path: styles[style]() for path, style in plan.items()})
            n += 1
    if n == 0:
        raise ValueError(f"no block of {[c.__name__ for c in block_classes]} in the model to split")
    return n


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
