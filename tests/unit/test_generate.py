"""KV-cache sampling: greedy equals HF `generate`, seeded sampling is reproducible, long outputs slide the context."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from llmtrain.data.tokenizers import byte_tokenizer, vocab_len
from llmtrain.generate import sample


def _model(n_positions: int = 64) -> tuple[GPT2LMHeadModel, object]:
    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab_len(tok), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(cfg).eval(), tok


def test_greedy_matches_hf_generate() -> None:
    model, tok = _model()
    prompt = "def main():"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=tok.eos_token_id)
    ours = sample(model, tok, prompt, 40, temperature=0.0)
    assert ours == prompt + tok.decode(ref[0, len(ids):].tolist(), skip_special_tokens=False)


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    model, tok = _model()
    a, b = (sample(model, tok, "x = ", 50, temperature=1.0, top_k=20, seed=3) for _ in range(2))
    c = sample(model, tok, "x = ", 50, temperature=1.0, top_k=20, seed=4)
    assert a == b and a != c


def test_generation_beyond_the_context_window() -> None:
    """More tokens than n_positions: the cache restarts on the most recent context instead of failing."""
    model, tok = _model(n_positions=16)
    fill = 16 - 3  # new tokens that fit beside the 3-token prompt: here we must equal HF generate exactly
    ids = tok("abc", add_special_tokens=False)["input_ids"]
    ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, 3, dtype=torch.long), max_new_tokens=fill,
                         min_new_tokens=fill, do_sample=False, pad_token_id=tok.eos_token_id)
    long = sample(model, tok, "abc", 40, temperature=0.0)
    assert long.startswith("abc" + tok.decode(ref[0, 3:].tolist(), skip_special_tokens=False))
    assert len(long.encode()) > len("abc") + fill
