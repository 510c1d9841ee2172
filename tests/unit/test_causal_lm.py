"""The causal-LM protocol (llmtrain/models/protocol.py): the engine and the eval run any model that meets it.

A toy LM defined here (one attention layer; its cache keeps each slot's input vector, a layout unlike
GPT-2's) generates through `Generator` exactly what recomputing its whole text every step gives, left-padded
or not, eager or with the static (compiled) step, sliding past its context; a prefill never asks for the
logits of every position. transformers' GPT-2, seen through `GPT2Spec.causal_lm`, generates what its own
`generate` does. The import graph points one way: models never import generation, generation never export.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO
from torch import nn

from llmtrain.data.tokenizers import byte_tokenizer
from llmtrain.generation import Generator
from llmtrain.models.protocol import Cache, CausalLM, nll_from_logits

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["def main(", "x", "class Foo:", "if x == 1"]


class ToyCache(Cache):
    """Each slot's input vector [B, L, C]: keys and values are recomputed from it at every call."""

    def __init__(self, batch: int, length: int, dim: int, dtype: torch.dtype, device: torch.device,
                 static: bool) -> None:
        super().__init__(length, device, static)
        self.x = torch.zeros(batch, length, dim, dtype=dtype, device=device)


class ToyLM(nn.Module):
    """One attention head over token + position embeddings, a residual and a tanh readout: not GPT-2."""

    def __init__(self, vocab: int, context: int = 24, dim: int = 16) -> None:
        super().__init__()
        self.context, self.vocab, self.dim = context, vocab, dim
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, vocab)
        self.calls: list[tuple[int, bool, bool]] = []  # (T, last_only, static) of every cached call
        with torch.no_grad():  # large weights: greedy text that depends on its context
            for p in self.parameters():
                p.normal_(0, 1.5)

    @property
    def max_positions(self) -> int:
        return self.context

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def allocate_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device,
                       static: bool = False) -> ToyCache:
        return ToyCache(batch, length, self.dim, dtype, torch.device(device), static)

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: Cache | None = None,
               mask: torch.Tensor | None = None, *, static: bool = False, last_only: bool = False) -> torch.Tensor:
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T)
        x = self.emb(input_ids) + self.pos(positions)  # [B, T, C]
        if cache is None:
            keys, S, first = x, T, torch.tensor([0])
        else:
            assert isinstance(cache, ToyCache)
            self.calls.append((T, last_only, static))
            if static:
                cache.x.index_copy_(1, cache.slot, x)
                keys, S, first = cache.x, cache.length, cache.slot
            else:
                cache.x[:, cache.pos:cache.pos + T] = x
                S, first = cache.pos + T, torch.tensor([cache.pos])
                keys, cache.pos = cache.x[:, :S], S
        query_slot = first + torch.arange(T)  # [T]
        slot = torch.arange(S)
        allowed = slot[None, :] <= query_slot[:, None]  # [T, S]
        if mask is not None:
            allowed = allowed & mask[:, None, :S]
        allowed = allowed | (slot[None, :] == query_slot[:, None])  # [B | 1, T, S]
        scores = self.q(x) @ self.k(keys).transpose(1, 2) / math.sqrt(self.dim)  # [B, T, S]
        y = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ self.v(keys)  # [B, T, C]
        h = torch.tanh(x + y)
        return self.out(h[:, -1:] if last_only else h)

    def nll(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return nll_from_logits(self.logits(input_ids), labels)


@pytest.fixture
def toy() -> tuple[ToyLM, object]:
    tok = byte_tokenizer()
    torch.manual_seed(0)
    return ToyLM(len(tok)), tok


def _window_recomputed(lm: ToyLM, ids: list[int], n: int) -> list[int]:
    """overflow=slide without a cache: when the window holds the whole context, the next window is the newest
    half of the text (positions from 0 again)."""
    text, window = list(ids), list(ids)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(lm.logits(torch.tensor([window]))[0, -1].argmax())
            full = len(window) == lm.max_positions
            text.append(nxt)
            window = text[-(lm.max_positions // 2):] if full else [*window, nxt]
    return text[len(ids):]


def test_the_engine_runs_any_causal_lm(toy) -> None:
    """Cached, batched, left-padded greedy decoding of a model that is not GPT-2 ≡ recomputing each row's
    whole text every step; the prefill asks for the last position's logits only."""
    lm, tok = toy
    assert isinstance(lm, CausalLM)
    gen = Generator(lm, tok)
    n = 24 - max(len(tok.encode(p)) for p in PROMPTS)  # the longest prompt reaches the context's end
    out = gen(PROMPTS, max_new_tokens=n, do_sample=False, stop_at_eos=False)
    assert any(len(set(tok.encode(c.completion))) > 3 for c in out)  # varied text, not one token repeated
    for p, c in zip(PROMPTS, out, strict=True):
        assert c.completion == tok.decode(_window_recomputed(lm, tok.encode(p), n)), p
    assert [c.completion for c in gen(PROMPTS, max_new_tokens=n, do_sample=False, stop_at_eos=False,
                                      batch_size=1)] == [c.completion for c in out]
    assert lm.calls and all(last_only for T, last_only, _ in lm.calls if T > 1)


def test_slide_and_the_static_step_on_any_causal_lm(toy, monkeypatch: pytest.MonkeyPatch) -> None:
    """overflow=slide restarts from the newest half of the context, as recomputation does; the static step
    (what compile=true compiles; run eagerly here) gives the eager text."""
    lm, tok = toy
    kw = dict(max_new_tokens=60, do_sample=False, stop_at_eos=False, overflow="slide")  # 60: the context is 24
    one = Generator(lm, tok)(PROMPTS, batch_size=1, **kw)
    for p, c in zip(PROMPTS, one, strict=True):
        assert c.completion == tok.decode(_window_recomputed(lm, tok.encode(p), 60)), p
    eager = Generator(lm, tok)(PROMPTS, **kw)  # a batch slides together, when its padded cache fills
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)
    lm.calls.clear()
    static = Generator(lm, tok, compile=True)
    for size in (1, 4, 4):  # the static cache of a batch size is reused by its next call
        got = static(PROMPTS, batch_size=size, **kw)
        assert [c.completion for c in got] == [c.completion for c in (one if size == 1 else eager)]
    assert any(s for _, _, s in lm.calls) and all(T == 1 for T, _, s in lm.calls if s)


def test_sampling_and_eval_on_any_causal_lm(toy) -> None:
    """Seeded sampling is reproducible across batch sizes; `score` (llmtrain-eval's loop) sums the model's nll."""
    from llmtrain.generation.eval import score
    from llmtrain.precision import Precision

    lm, tok = toy
    gen = Generator(lm, tok)
    kw = dict(max_new_tokens=12, temperature=0.8, top_k=30, repetition_penalty=1.2, seed=2, num_samples=2)
    assert [c.text for c in gen(PROMPTS, **kw)] == [c.text for c in gen(PROMPTS, batch_size=3, **kw)]

    class Blocks:
        def __init__(self, ids: torch.Tensor) -> None:
            self.ids = ids

        def get(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
            block = self.ids[torch.from_numpy(idx)]
            return {"input_ids": block[:, :-1], "labels": block[:, 1:]}

    ids = torch.randint(0, lm.vocab_size, (7, 11), generator=torch.Generator().manual_seed(3))
    mean, count = score(lm, Blocks(ids), 7, 3, Precision.fp32, torch.device("cpu"))
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(lm.logits(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    assert count == 70 and mean == pytest.approx(float(want), rel=1e-6)


def test_transformers_gpt2_through_its_spec_generates_what_transformers_does() -> None:
    """model.impl=hf: GPT2Spec.causal_lm gives the native model on the same tensors (from_hf, the conversion
    load_hf uses); its greedy text over an uneven batch equals transformers' generate."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmtrain.models.gpt2 import GPT2Spec

    tok = byte_tokenizer()
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                    bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(3)
    lm = GPT2Spec().causal_lm(hf)
    assert lm.transformer.wpe.weight.data_ptr() == hf.transformer.wpe.weight.data_ptr()  # no copy
    n = 16
    ours = Generator(lm, tok)(PROMPTS, max_new_tokens=n, do_sample=False, stop_at_eos=False)
    rows = [tok.encode(p) for p in PROMPTS]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.eos_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=tok.eos_token_id)
    assert [c.completion for c in ours] == [tok.decode(o[width:].tolist()) for o in want]
    assert len({c.completion for c in ours}) == len(PROMPTS)


def test_an_hf_run_samples_and_generates_through_its_spec(tmp_path: Path) -> None:
    """model.impl=hf: the training sampler (GPT2Spec.causal_lm over the module being trained), the run's
    final/ (read by load_hf) and its checkpoint without final/ (restore, then causal_lm) give one greedy text."""
    from helpers import TINY_LM, compose

    from llmtrain.train import run

    run_dir = tmp_path / "run"
    run(compose([*TINY_LM, "model.impl=hf", "trainer.max_steps=4", "trainer.ckpt_every=4", "trainer.eval_every=0",
                 "trainer.sample_tokens=8", "trainer.sample_temperature=0", 'trainer.sample_prompts=["def ","x = "]',
                 f"hydra.run.dir={run_dir}"]), run_dir)
    sampled = [json.loads(ln)["text"] for ln in (run_dir / "samples.jsonl").read_text().splitlines()]
    kw = dict(max_new_tokens=8, do_sample=False, stop_at_eos=True)
    assert [c.text for c in Generator.from_pretrained(run_dir / "final", device="cpu")(["def ", "x = "], **kw)] \
        == sampled
    (run_dir / "final").rename(tmp_path / "final")
    assert [c.text for c in Generator.from_pretrained(run_dir, device="cpu")(["def ", "x = "], **kw)] == sampled


def test_attention_mask_follows_the_protocol_rule() -> None:
    """Query i (at slot S - T + i, or at `slot`) sees key j iff j is real and j <= its slot, or j is its slot;
    as SDPA arguments, for prefill, decode and static shapes, with and without a mask."""
    from llmtrain.models.protocol import attention_mask

    g = torch.Generator().manual_seed(0)
    for T, S, slot in ((5, 5, None), (1, 9, None), (3, 9, None), (1, 9, 4), (1, 9, 8)):
        for mask in (None, torch.rand(3, S + 2, generator=g) > 0.4):
            at = [slot] * T if slot is not None else list(range(S - T, S))
            rows = 3 if mask is not None else 1
            want = torch.tensor([[[j == at[i] or (j <= at[i] and (mask is None or bool(mask[b, j])))
                                   for j in range(S)] for i in range(T)] for b in range(rows)])
            attn, causal = attention_mask(mask, T, S, torch.device("cpu"),
                                          None if slot is None else torch.tensor([slot]))
            if attn is None:
                attn = torch.ones(T, S, dtype=torch.bool).tril(S - T) if causal else torch.ones(T, S, dtype=torch.bool)
            assert torch.equal(attn.expand(rows, 1, T, S)[:, 0], want), (T, S, slot, mask is not None)


def _imported(statement: str) -> set[str]:
    """llmtrain modules in sys.modules after `statement` in a fresh interpreter."""
    code = f"import sys; {statement}; print(' '.join(m for m in sys.modules if m.startswith('llmtrain')))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    return set(res.stdout.split())


def test_imports_point_one_way() -> None:
    """models ← restore ← export, and models ← generation: no model module imports generation, generation
    imports neither export nor the other way round."""
    models = sorted(p.stem for p in (REPO / "llmtrain" / "models").glob("*.py") if p.stem != "__init__")
    loaded = _imported("; ".join(f"import llmtrain.models.{m}" for m in models)
                       + "; from llmtrain.models.base import get_model_spec; get_model_spec('gpt2')")
    assert "llmtrain.models.gpt2" in loaded
    assert not {m for m in loaded if m.startswith(("llmtrain.generation", "llmtrain.export"))}
    gen = _imported("import llmtrain.generation.engine, llmtrain.generation.sources, llmtrain.generation.eval, "
                    "llmtrain.generation.training, llmtrain.generation.cli")
    assert "llmtrain.export" not in gen
    assert not {m for m in _imported("import llmtrain.restore") if m.startswith(("llmtrain.generation",
                                                                                   "llmtrain.export"))}
    assert not {m for m in _imported("import llmtrain.export") if m.startswith("llmtrain.generation")}
