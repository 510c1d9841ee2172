"""llmtrain against a raw compiled transformers loop on the same model, shape and batches, in one process (CPU):
`model=hf` over GPT-NeoX and over Llama, GPT-2's `model.impl=hf`, and llmtrain's native Llama family
(`model=llama_tiny model.pretrained=<the same dir>`) against transformers' own LlamaForCausalLM.

The raw loop is what one would write by hand: transformers' model and the fp32 cross-entropy of its logits in one
`torch.compile`d function, bf16 autocast, AdamW (llmtrain's optimizer builder: the same fused kernel), gradient
clipping at 1.0 (`--raw-eager`: the same loop without torch.compile). llmtrain runs a real `run()` with
`trainer.compile=true trainer.precision=bf16`. Random models of 4 layers × 256 with GPT-2's vocabulary of 50,257
are saved by transformers (GPT-NeoX, GPT-2, and a Llama with 4 query / 2 key-value heads, SwiGLU 688, tied); the
data is the embedded corpus in blocks of 128 tokens, 8 a step.

    python bench/hf_loop.py [--steps 40] [--threads 2] [--models hf,gpt2,llama_hf,llama] [--raw-eager]

The two alternate step by step (a raw step timed just before each llmtrain step), so a shared machine's slow
moments fall on both alike. Prints the median milliseconds per optimizer step of each (the first steps, with
the compilations, dropped) and, per model, `ratio_<model>=<llmtrain tok/s ÷ raw tok/s>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmtrain.plan import compose  # noqa: E402  (the training config, checked as llmtrain-train checks it)

LAYERS, WIDTH, HEADS, SEQ, BATCH, VOCAB = 4, 256, 4, 128, 8, 50257
COMMON = ["data.tokenizer=byte", f"data.seq_len={SEQ}", f"trainer.micro_batch_size={BATCH}", "trainer.grad_clip=1.0",
          "optim=adamw", "optim.lr=1e-3", "scheduler=constant", "trainer.eval_every=0", "trainer.ckpt_every=0",
          "trainer.sample_tokens=0", "logger.log_every=10", "logger.progress=false", "logger.tensorboard=false",
          "logger.plots=false", "trainer.max_bad_steps=0", "trainer.compile=true", "trainer.precision=bf16"]
WARMUP = 8


def save_models(root: Path) -> dict[str, list[str]]:
    """The model dirs (random weights, byte tokenizer) and each one's llmtrain overrides."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmtrain.data.tokenizers import byte_tokenizer

    torch.manual_seed(0)
    neox = AutoConfig.for_model("gpt_neox", vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS, intermediate_size=4 * WIDTH, max_position_embeddings=SEQ,
                                bos_token_id=256, eos_token_id=256)
    gpt2 = AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=SEQ,
                                bos_token_id=256, eos_token_id=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    llama = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                 num_attention_heads=HEADS, num_key_value_heads=HEADS // 2, intermediate_size=688,
                                 max_position_embeddings=SEQ, tie_word_embeddings=True, bos_token_id=256,
                                 eos_token_id=256)
    for name, cfg in (("hf", neox), ("gpt2", gpt2), ("llama", llama)):
        AutoModelForCausalLM.from_config(cfg).save_pretrained(root / name)
        byte_tokenizer().save_pretrained(root / name)
    return {"hf": ["model=hf", f"model.pretrained={root / 'hf'}"],
            "gpt2": ["model=gpt2_tiny", "model.impl=hf", f"model.pretrained={root / 'gpt2'}"],
            "llama_hf": ["model=hf", f"model.pretrained={root / 'llama'}"],
            "llama": ["model=llama_tiny", f"model.pretrained={root / 'llama'}"]}


DIRS = {"hf": "hf", "gpt2": "gpt2", "llama_hf": "llama", "llama": "llama"}


def raw_loop(model_dir: Path, overrides: list[str], compiled: bool = True) -> Callable[[], None]:
    """A hand-written loop's step: transformers' model + fp32 cross-entropy compiled together, bf16 autocast,
    AdamW, clipping; the blocks in llmtrain's order."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from llmtrain.data.base import ShardedSampler, build_data
    from llmtrain.optim import build_optimizer

    cfg = compose([*COMMON, *overrides])
    data = build_data(cfg.data)
    blocks = data.split("train")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    opt = build_optimizer(cfg.optim, model)
    sampler = ShardedSampler(len(blocks), BATCH, seed=cfg.trainer.seed, shuffle=True)

    def loss_of(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    if compiled:
        loss_of = torch.compile(loss_of)

    def step() -> None:
        b = blocks.get(sampler.next_indices())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(b["input_ids"], b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def interleaved(run_dir: Path, model_dir: Path, overrides: list[str], steps: int,
                raw_compiled: bool = True) -> tuple[list[float], list[float]]:
    """A real `run()` of llmtrain, one raw step timed before each of its optimizer steps (the whole of the loop's
    step: logging, the stop check, the reads)."""
    from llmtrain.train import run
    from llmtrain.trainer import Trainer

    raw_step, raw, ours = raw_loop(model_dir, overrides, raw_compiled), [], []
    one_step = Trainer._one_step

    def timed(self: Trainer) -> Any:
        t0 = time.perf_counter()
        raw_step()
        t1 = time.perf_counter()
        out = one_step(self)
        ours.append(time.perf_counter() - t1)
        raw.append(t1 - t0)
        return out

    Trainer._one_step = timed  # type: ignore[method-assign]
    try:
        run(compose([*COMMON, *overrides, f"trainer.max_steps={steps}", f"hydra.run.dir={run_dir}"]), run_dir)
    finally:
        Trainer._one_step = one_step  # type: ignore[method-assign]
    return raw[WARMUP:], ours[WARMUP:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--models", default="hf,gpt2,llama_hf,llama",
                    help="hf (GPT-NeoX through model=hf), gpt2 (model.impl=hf), llama_hf (a Llama through model=hf), "
                         "llama (llmtrain's native Llama family)")
    ap.add_argument("--raw-eager", action="store_true", help="the raw loop without torch.compile")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    os.environ.setdefault("LLMTRAIN_CACHE", str(Path(tempfile.gettempdir()) / "llmtrain-bench-cache"))
    tokens = BATCH * SEQ
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = save_models(Path(tmp))
        print(f"{LAYERS} layers × {WIDTH}, vocabulary {VOCAB}, seq {SEQ}, batch {BATCH}, bf16 autocast, llmtrain "
              f"compiled, raw loop {'eager' if a.raw_eager else 'compiled'}, {a.threads} threads, "
              f"{a.steps - WARMUP} step pairs per model (the first {WARMUP} dropped)", flush=True)
        for name in a.models.split(","):
            raw, ours = interleaved(Path(tmp) / f"run_{name}", Path(tmp) / DIRS[name], dirs[name], a.steps,
                                    not a.raw_eager)
            med_raw, med_ours = statistics.median(raw), statistics.median(ours)
            for who, med in ((f"raw {name}", med_raw), (f"llmtrain {name}", med_ours)):
                print(f"{who:<14} {med * 1000:7.1f} ms/step  {tokens / med:8,.0f} tok/s (median)", flush=True)
            ratios[name] = med_raw / med_ours
    for name, r in ratios.items():
        print(f"ratio_{name}={r:.3f}")


if __name__ == "__main__":
    main()
