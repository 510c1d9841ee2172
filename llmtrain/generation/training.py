"""Samples while training (`trainer.sample_every`) and at the end of a run, from the weights being trained.

Every rank calls the sampler: sharded strategies gather the whole model for rank 0 (the strategy's
`sampling_model`), rank 0 generates with the same engine as `llmtrain-generate` over the family's view of the
model as a causal LM (`ModelSpec.causal_lm`), appends one JSON object per sample to `<run>/samples.jsonl`
(step, prompt, text) and shows the samples in the progress output.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from llmtrain import faults
from llmtrain.generation.engine import Completion, GenerationConfig, Generator
from llmtrain.tracking.logger import truncate_after

if TYPE_CHECKING:
    from llmtrain.context import RunContext
    from llmtrain.distributed.base import Strategy

SAMPLES_FILE = "samples.jsonl"


class TrainingSampler:
    def __init__(self, ctx: RunContext, strategy: Strategy, write: Callable[[str], None]) -> None:
        self.ctx, self.strategy, self.write = ctx, strategy, write
        t = ctx.cfg.trainer
        self.prompts = list(t.sample_prompts) or [t.sample_prompt]
        self.cfg = GenerationConfig(max_new_tokens=t.sample_tokens, do_sample=t.sample_temperature > 0,
                                    temperature=t.sample_temperature, top_k=t.sample_top_k, seed=t.seed,
                                    overflow="slide", batch_size=len(self.prompts))

    @property
    def enabled(self) -> bool:
        return self.cfg.max_new_tokens > 0 and self.ctx.data.info.task == "lm"

    def __call__(self, step: int) -> list[Completion] | None:
        """Sample from the current weights (a collective); rank 0 returns the completions."""
        ctx = self.ctx
        info = ctx.data.info
        model = self.strategy.sampling_model(lambda: ctx.spec.build(ctx.cfg.model, info))
        out = None
        if ctx.dist.is_main:
            was_training = model.training
            try:
                lm = ctx.spec.causal_lm(model)  # the weights being trained, seen through the protocol
                gen = Generator(lm, info.tokenizer, ctx.device, dtype=next(lm.parameters()).dtype)
                out = gen(self.prompts, self.cfg)
            finally:
                model.train(was_training)
            with open(ctx.run_dir / SAMPLES_FILE, "a") as f:  # its torn tail was dropped at start (truncate_samples)
                faults.torn_write(f, "".join(json.dumps({"step": step, "prompt": c.prompt, "text": c.text}) + "\n"
                                             for c in out), "samples")
            for c in out:
                self.write(f"--- sample at step {step} ({c.completion_tokens} tokens) ---\n{c.text}\n---")
        ctx.dist.barrier()
        return out


def truncate_samples(run_dir: Path, step: int) -> None:
    """Drop samples of steps after `step` (from a run that died after its last checkpoint; a fresh start: all)
    and a torn last line, so that the run's appends start on a line of their own."""
    truncate_after(run_dir / SAMPLES_FILE, step)
