"""The vocabulary-parallel head and loss of tensor parallelism (strategy.tp): the output projection's rows (the
vocabulary) split over the "tp" ranks, the cross-entropy computed from each rank's slice of the logits, so no
rank ever holds the logits over the whole vocabulary (Megatron's vocab-parallel cross-entropy).

Per chunk of token rows, each rank computes its [n, V/tp] fp32 logits and three all-reduces of n values (the
row maxima, the sums of exponentials, the targets' logits) give every rank the same loss; the gradient of the
logits (softmax minus one-hot) is formed in the same pass, as in the one-process loss
(models/gpt2_native._LinearCrossEntropy). The hidden states' gradient is summed over the ranks: a
reduce-scatter back to the sequence shards under sequence parallelism, an all-reduce otherwise.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llmtrain.datainfo import IGNORE_INDEX
from llmtrain.models.gpt2_native import precomputed_grads

CHUNK_ELEMENTS = 1 << 28  # fp32 logits of one chunk on one rank, at most (~1 GiB)
# one tensor in, one out (torch 2.13's names; the older ones before)
_ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def vocab_parallel_head(head: nn.Module, mesh: Any, sequence_parallel: bool, tied: bool) -> None:
    """Split `head` (forward(h [B, T, C], labels [B, T] | None) → (loss sum, target count) | logits [B, T, V];
    `weight` [Vp, C], optional `vocab_size` ≤ Vp: the rows past it are padding) over the vocabulary, in place.
    A weight tied to the embedding is left to the embedding's split (the same Shard(0) rows)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    if not tied:
        head.weight = nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(0)]),
                                   requires_grad=head.weight.requires_grad)
    vocab = int(getattr(head, "vocab_size", 0) or head.weight.shape[0])
    head.forward = functools.partial(_forward, head, mesh, vocab, sequence_parallel)  # the instance's own


def _forward(head: nn.Module, mesh: Any, vocab: int, sp: bool, h: torch.Tensor,
             labels: torch.Tensor | None = None) -> Any:
    """h: this rank's sequence shard [B, T/tp, C] (sequence parallel) or the whole [B, T, C]."""
    from torch.distributed.tensor import DTensor, Shard

    w = head.weight
    w_local = w.to_local() if isinstance(w, DTensor) else w  # [Vp/tp, C]
    rank, n = mesh.get_local_rank(), mesh.size()
    start = min(rank * -(-w.shape[0] // n), w.shape[0])  # torch.chunk's rows: ceil(Vp / n) per rank
    group = mesh.get_group()
    if labels is None:  # logits for whoever asks (generation gathers the model instead): gathered whole
        h_all = _gather_rows(h, n, group) if sp else h
        if sp:
            h_all = h_all.view(n, *h.shape).permute(1, 0, 2, 3).reshape(h.shape[0], -1, h.shape[-1])
        local = torch.nn.functional.linear(h_all, w_local)  # [B, T, Vp/tp]
        return DTensor.from_local(local, mesh, [Shard(-1)], run_check=False).full_tensor()[..., :vocab]
    count = (labels != IGNORE_INDEX).sum()
    if sp:  # the gathered rows come rank by rank: [tp, B, T/tp] — the labels in that order
        B, T = labels.shape
        labels = labels.view(B, n, T // n).transpose(0, 1)
    loss = _VocabParallelCE.apply(h, w_local, labels.reshape(-1), start, vocab, group, sp)
    return loss, count


def _gather_rows(h: torch.Tensor, n: int, group: Any) -> torch.Tensor:
    """[n·B, T/n, C]: every rank's h [B, T/n, C], rank by rank."""
    out = torch.empty((n * h.shape[0], *h.shape[1:]), dtype=h.dtype, device=h.device)
    _ALL_GATHER(out, h.contiguous(), group=group)
    return out


class _VocabParallelCE(torch.autograd.Function):
    """Sum over rows of CE(h · wᵀ, labels) with w's rows (the vocabulary) split over `group`; see the module
    docstring. Every rank returns the same sum."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, start: int, vocab: int,
                group: Any, sp: bool) -> torch.Tensor:
        dev = h.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_ranks = dist.get_world_size(group)
        with torch.autocast(dev, enabled=False):
            hc_all = (_gather_rows(h.to(dtype), n_ranks, group) if sp else h.to(dtype)).flatten(0, -2)  # [N, C]
            wc = w.to(dtype)  # [Vl, C]
            grad_h = torch.empty_like(hc_all) if want_h else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            vl = w.shape[0]
            rows = max(1, CHUNK_ELEMENTS // max(1, vl))
            for s in range(0, hc_all.shape[0], rows):
                hc, lab = hc_all[s:s + rows], labels[s:s + rows]
                logits = (hc @ wc.T).float()  # [n, Vl]
                if start + vl > vocab:  # padding rows of the vocabulary never win
                    logits[:, max(0, vocab - start):] = float("-inf")
                valid = lab != IGNORE_INDEX
                local = valid & (lab >= start) & (lab < start + vl)  # targets in this rank's rows
                idx = (lab - start).clamp(0, vl - 1)
                tgt = logits.gather(1, idx[:, None]).squeeze(1) * local  # [n]
                m = logits.max(dim=-1).values
                dist.all_reduce(m, dist.ReduceOp.MAX, group=group)
                e = logits.sub_(m[:, None]).exp_()  # in place: exp(logits - max)
                z = e.sum(dim=-1)
                dist.all_reduce(z, group=group)
                dist.all_reduce(tgt, group=group)
                total += ((m + z.log() - tgt) * valid).sum()
                if want_h or want_w:
                    g = e.div_(z[:, None])  # softmax, minus 1 at the targets this rank holds
                    g.scatter_add_(1, idx[:, None], -local[:, None].to(g.dtype))
                    g = (g * valid[:, None]).to(dtype)  # [n, Vl]: d(loss)/d(logits)
                    if want_h:
                        grad_h[s:s + rows] = g @ wc
                    if want_w:
                        grad_w += (g.T @ hc).float()
            if want_h:  # this rank's part of every row's gradient: summed over the ranks
                if sp:
                    part = torch.empty_like(h, dtype=dtype)
                    _REDUCE_SCATTER(part, grad_h.view(n_ranks * h.shape[0], *h.shape[1:]), group=group)
                    grad_h = part
                else:
                    dist.all_reduce(grad_h, group=group)
                    grad_h = grad_h.view(h.shape)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, w.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        return *precomputed_grads(ctx, grad_out), None, None, None, None, None
