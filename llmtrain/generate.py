"""Sampling from a causal LM with a KV cache (temperature, top-k); greedy when temperature == 0."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


@torch.no_grad()
def sample(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, *, temperature: float = 0.8,
           top_k: int = 50, seed: int = 0, device: torch.device | str = "cpu") -> str:
    """Continue `prompt` (empty: start from end-of-text) and return prompt + continuation as text."""
    model.eval()
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    ids = ids or [tokenizer.eos_token_id]
    ctx = int(getattr(model.config, "n_positions", 1 << 30))
    x = torch.tensor([ids[-ctx:]], device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[int] = []
    past = None
    for _ in range(max_new_tokens):
        if past is not None and past.get_seq_length() >= ctx:  # context full: restart the cache
            x, past = torch.tensor([(ids + out)[-ctx + 1 :]], device=device), None
        res = model(input_ids=x, past_key_values=past, use_cache=True)
        past = res.past_key_values
        logits = res.logits[0, -1].float().cpu()  # [V]
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits[logits < kth] = -float("inf")
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        out.append(nxt)
        x = torch.tensor([[nxt]], device=device)
    return prompt + tokenizer.decode(out, skip_special_tokens=False)
