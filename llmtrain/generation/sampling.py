"""Choosing the next token: logits processors (repetition penalty, temperature, top-k, top-p) and the draw.

Pure tensor functions on logits [B, V], on the logits' device; the order and semantics are those of
Hugging Face's `generate` (repetition penalty first, then temperature, top-k, top-p).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmtrain.errors import require

NEG_INF = float("-inf")


@dataclass
class SamplingConfig:
    """How the next token is chosen. do_sample=false: greedy (the other keys are ignored)."""

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already in the prompt or output

    def check(self, prefix: str = "") -> None:
        require(self.temperature >= 0, f"{prefix}temperature", f"must be >= 0 (got {self.temperature})")
        require(0 < self.top_p <= 1, f"{prefix}top_p", f"must be in (0, 1] (got {self.top_p})")
        require(self.top_k >= 0, f"{prefix}top_k", f"must be >= 0, 0 disables it (got {self.top_k})")
        require(self.repetition_penalty > 0, f"{prefix}repetition_penalty",
                f"must be > 0, 1 disables it (got {self.repetition_penalty})")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Tokens already seen ([B, V] bool): positive logits divided by `penalty`, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th kept too); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one token)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - p)
    drop_sorted[:, -1] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def process(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The logits the next token is drawn from ([B, V] fp32)."""
    logits = logits.float()
    if seen is not None:
        logits = repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits
    logits = logits / cfg.temperature
    return top_p_filter(top_k_filter(logits, cfg.top_k), cfg.top_p)


def draw(logits: torch.Tensor, cfg: SamplingConfig, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Next token per row [B]: argmax when greedy, else one draw per row from that row's own generator
    (so a row's text depends on its seed, not on which rows share its batch)."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
