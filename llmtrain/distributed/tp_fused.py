"""Tensor parallelism of a fused column-wise projection: one nn.Linear whose output rows are `parts` equal parts
side by side (GPT-2's `c_attn`: [q; k; v], each [C, C]), split by heads: rank r of the "tp" mesh computes
[q_r | k_r | v_r], its heads' share of every part, and the module returns that local tensor [..., parts·C/tp].

Storage and computation differ. The weight and bias are kept as plain ColwiseParallel keeps them: Shard(0)
DTensors on the "tp" dim, rank r holding the contiguous rows [r·R, (r+1)·R) (R = parts·C/tp) of the unsplit
weight. Their global value is the unsplit weight, and each rank's shard is one box of it, which is what FSDP2
(its "dp" shard of the rows, _StridedShard over "tp"), DCP (one chunk per rank) and resharding between layouts
need. Each forward then trades rows among the "tp" ranks (one all-to-all of the weight's and the bias's rows;
the reverse all-to-all of their gradients in the backward), so that every rank multiplies by its heads' rows
[q_r; k_r; v_r] — a `_StridedShard(0, split_factor=parts)` DTensor, whose linear with the replicated input
runs without communication and yields `_StridedShard(-1, parts)`, the local [q_r | k_r | v_r].

Why not store `_StridedShard(0, parts)` itself (no trade per step): in torch 2.13 DCP takes each rank's shard
for one box of the global tensor (`compute_local_shape_and_global_offset`: overlapping chunks, refused) and
FSDP2 describes its dp shard of such a parameter with a placement that does not match its data (a wrong
`full_tensor()`). The trade costs little next to the activations' all-reduces (B·T·C values each, per layer):
at tp=2 each rank sends C/2 of its 3C/2 rows (C²/2 values) and receives as many.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel
from torch.distributed.tensor.placement_types import _StridedShard


def trade_plan(rows: int, parts: int, tp: int, rank: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """How rank `rank` of `tp` trades rows of a [rows, ...] Shard(0) tensor of `parts` equal parts so that
    every rank ends up with its share of each part: (the local rows to send, in sending order [rows // tp],
    how many go to each rank, how many come from each rank). Received in rank order, the rows arrive in
    global order: part 0's share, then part 1's, ..."""
    per, own = rows // parts, rows // tp  # rows of a part; of a Shard(0) shard
    dest = (torch.arange(rows) % per) // (per // tp)  # [rows]: the rank that computes each global row
    mine = dest[rank * own:(rank + 1) * own]  # [own]: where this rank's rows go
    send = torch.sort(mine, stable=True).indices  # by destination, in row order within each
    holder = torch.arange(rows) // own  # [rows]: the rank that stores each row
    return (send, torch.bincount(mine, minlength=tp).tolist(),
            torch.bincount(holder[dest == rank], minlength=tp).tolist())


class _Trade(torch.autograd.Function):
    """Rows of a Shard(0) shard → this rank's heads' rows (all-to-all); backward: their gradients back to the
    ranks that store them (the reverse all-to-all)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, send: torch.Tensor, send_counts: list[int],
                recv_counts: list[int], group: Any) -> torch.Tensor:
        ctx.save_for_backward(send)
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        out = local.new_empty((sum(recv_counts), *local.shape[1:]))  # [parts·C/tp, ...]
        dist.all_to_all_single(out, local.index_select(0, send), recv_counts, send_counts, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (send,) = ctx.saved_tensors
        send_counts, recv_counts = ctx.counts
        back = grad.new_empty((sum(send_counts), *grad.shape[1:]))  # in the order the rows were sent
        dist.all_to_all_single(back, grad.contiguous(), send_counts, recv_counts, group=ctx.group)
        return torch.empty_like(back).index_copy_(0, send, back), None, None, None, None


# (rows, parts, tp, rank, device) → trade_plan's answer, its rows on the device
_PLANS: dict[tuple[int, int, int, int, torch.device], tuple[torch.Tensor, list[int], list[int]]] = {}


def _trade(local: torch.Tensor, rows: int, parts: int, mesh: Any) -> torch.Tensor:
    """This rank's Shard(0) rows of a [rows, ...] tensor → its share of each part, [q_r; k_r; v_r] locally."""
    key = (rows, parts, mesh.size(), mesh.get_local_rank(), local.device)
    plan = _PLANS.get(key)
    if plan is None:
        send, sc, rc = trade_plan(*key[:4])
        plan = _PLANS[key] = (send.to(local.device), sc, rc)
    return _Trade.apply(local, *plan, mesh.get_group())


def _strided(local: torch.Tensor, like: Any, parts: int) -> Any:
    return DTensor.from_local(local, like.device_mesh, [_StridedShard(0, split_factor=parts)], run_check=False,
                              shape=like.shape, stride=like.stride())


def heads_rows(param: Any, parts: int) -> Any:
    """A Shard(0) DTensor [rows, ...] on a 1-D mesh → the same global tensor as `_StridedShard(0, parts)`:
    locally this rank's share of each part, [q_r; k_r; v_r]. Differentiable."""
    return _strided(_trade(param.to_local(), param.shape[0], parts, param.device_mesh), param, parts)


def _forward(module: nn.Linear, parts: int, x: Any) -> Any:
    """The split module's forward: x a replicated DTensor [..., C] (the style's input hook) → [..., parts·C]
    as `_StridedShard(-1, parts)` (locally [q_r | k_r | v_r]). The bias travels with the weight (one trade)."""
    w, b = module.weight, module.bias
    if b is None:
        return F.linear(x, heads_rows(w, parts))
    local = torch.cat([w.to_local(), b.to_local().to(w.dtype)[:, None]], 1)  # [R, C + 1]
    mine = _trade(local, w.shape[0], parts, w.device_mesh)  # [parts·C/tp, C + 1]
    # (contiguous: a GEMM reads a weight of row stride C + 1 slower, misaligned for the tensor cores)
    w_mine, b_mine = mine[:, :-1].contiguous(), mine[:, -1].to(b.dtype).contiguous()
    return F.linear(x, _strided(w_mine, w, parts), _strided(b_mine, b, parts))


class FusedColwiseParallel(ColwiseParallel):
    """ColwiseParallel for an nn.Linear of `parts` equal fused parts: the weight and bias stored as
    ColwiseParallel's Shard(0), the output the local tensor of this rank's share of every part (module doc).
    Needs a 1-D mesh, and `parts · tp` dividing the output features."""

    def __init__(self, parts: int) -> None:
        super().__init__()
        self.parts = parts

    @staticmethod
    def _prepare_output_fn(output_layouts: Any, use_local_output: bool, mod: nn.Module, outputs: Any,
                           device_mesh: Any) -> Any:
        want = _StridedShard(outputs.ndim - 1, split_factor=mod.tp_parts)
        if outputs.placements != (want,):
            raise RuntimeError(f"fused projection's output is {outputs.placements}, not ({want},)")
        return outputs.to_local() if use_local_output else outputs

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        if type(module) is not nn.Linear:
            raise NotImplementedError(f"FusedColwiseParallel splits an nn.Linear, not {type(module).__name__}")
        if device_mesh.ndim != 1 or module.out_features % (self.parts * device_mesh.size()):
            raise ValueError(f"{module.out_features} output features do not split into {self.parts} parts × "
                             f"{device_mesh.size()} ranks on a 1-D mesh")
        module = super()._apply(module, device_mesh)  # Shard(0) weight and bias, replicated input
        module.tp_parts = self.parts
        module.forward = functools.partial(_forward, module, self.parts)  # the instance's own
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}(parts={self.parts})"
