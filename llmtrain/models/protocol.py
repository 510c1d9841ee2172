"""The causal-LM protocol: what generation and evaluation need from a language model, whatever its family.

A causal LM is an `nn.Module` that owns its decoding cache (its layout is the model's: a family with grouped
KV heads sizes it by those) and runs new tokens against it:

    cache = lm.allocate_cache(batch=B, length=L, dtype=torch.bfloat16, device=dev)
    logits = lm.logits(ids, positions, cache, mask, last_only=True)   # prefill: ids [B, T] → [B, 1, V]
    logits = lm.logits(nxt[:, None], pos[:, None], cache, mask)       # one token per row: [B, 1, V]

A cache has `length` slots per row; an eager call writes its T tokens' keys/values at slots
[cache.pos, cache.pos + T) and advances `pos`. `positions` ([B, T]) are the tokens' positions in their own text,
which differ from the slots when rows are left-padded. `mask` ([B, S], S the slots attended) says which slots
hold a real token; each query sees the real slots up to its own slot, and its own slot always (a padding query
attends to itself alone, so no attention row is empty); None: every slot is real.

A static cache (`static=True`) serves a compiled decode step whose shapes never change: `logits(...,
static=True)` writes its one token per row at the slot held by the tensor `cache.slot` ([1], set by the
caller), attends over all `length` slots (`mask` [B, length]) and leaves `pos` to the caller, since
a Python int cannot change inside a compiled graph. Eager calls (the prefill) work on a static cache too.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from llmtrain.datainfo import IGNORE_INDEX


class Cache:
    """The family-independent part of a decoding cache: its slots per row, how many are filled, the static slot.
    A family subclasses it with the tensors it keeps (GPT-2: keys and values of every layer)."""

    def __init__(self, length: int, device: torch.device, static: bool = False) -> None:
        self.length, self.pos, self.static = length, 0, static
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # where a static step writes
        if static and device.type == "cuda":  # written in place inside CUDA graphs
            torch._dynamo.mark_static_address(self.slot)

    def reset(self) -> None:
        """Empty: the next eager call writes from slot 0 (what was written is overwritten, not cleared)."""
        self.pos = 0


@runtime_checkable
class CausalLM(Protocol):
    """A language model generation and evaluation can run (an `nn.Module`: `.to`, `.eval`, `.parameters`)."""

    @property
    def max_positions(self) -> int:
        """The context: positions 0 .. max_positions - 1."""

    @property
    def vocab_size(self) -> int:
        """The real vocabulary: logits have this many columns (a padded embedding's extra rows never appear)."""

    def allocate_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device,
                       static: bool = False) -> Cache:
        """An empty cache of `length` slots for `batch` rows (static: for a compiled decode step)."""

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: Cache | None = None,
               mask: torch.Tensor | None = None, *, static: bool = False, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] of T new tokens per row (input_ids, positions [B, T]); last_only: the last
        position's [B, 1, V] only, so that a prefill never holds [B, T, V]. Without a cache the tokens are a
        whole sequence (positions None: 0 .. T - 1); with one, see the module docstring."""

    def nll(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed negative log-likelihood of `labels` [B, T], number of targets): labels[b, t] is the target
        of position t (the data shifts them); IGNORE_INDEX has none. See `nll_from_logits`."""


def nll_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`CausalLM.nll` from whole logits [B, T, V] (fp32 sum), for a model without a leaner loss."""
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


def attention_mask(mask: torch.Tensor | None, T: int, S: int, device: torch.device,
                   slot: torch.Tensor | None = None) -> tuple[torch.Tensor | None, bool]:
    """The protocol's rule as `scaled_dot_product_attention` arguments: (attn_mask [B | 1, 1, T, S] bool, True:
    may attend; or None) and is_causal. The T queries sit at slots S - T .. S - 1, or at `slot` (static, T = 1).
    Without a mask: SDPA's own causal mask when the queries are the whole cache (T == S), nothing for one query
    at the end (it sees every slot), an explicit one otherwise."""
    if mask is None and slot is None:
        if T == S:
            return None, True
        if T == 1:
            return None, False
    if slot is None and T == 1:  # one query at the last slot: every slot is at or before it, its own is seen
        own = torch.ones(mask.shape[0], 1, dtype=torch.bool, device=device)
        return torch.cat([mask[:, :S - 1], own], 1)[:, None, None, :], False
    keys = torch.arange(S, device=device)  # [S]
    queries = slot if slot is not None else keys[S - T:]  # [T]
    seen = keys[None, :] <= queries[:, None]  # [T, S]: causal over slots
    if mask is not None:
        seen = (mask[:, None, :S] & seen) | (keys[None, :] == queries[:, None])  # [B, T, S]
    return seen.unsqueeze(-3), False
