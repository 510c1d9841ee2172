"""Samples while training (`trainer.sample_every`) and at the end of a run, from the weights being trained.

Every rank calls the sampler: sharded strategies gather the whole model for rank 0 (the strategy's
`sampling_model`), rank 0 generates with the same engine as `llmtrain-generate`, appends one JSON object per
sample to `<run>/samples.jsonl` (step, prompt, text) and shows the samples in the progress output.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtrain import faults
from llmtrain.generation.engine import Completion, GenerationConfig
from llmtrain.jsonl import read_jsonl
from llmtrain.tracking.logger import truncate_after

SAMPLES_FILE = "samples.jsonl"


class TrainingSampler:
    def __init__(self, t: Any, spec: Any, model_cfg: Any, info: Any, strategy: Any, run_dir: Path,
                 write: Callable[[str], None]) -> None:
        self.spec, self.model_cfg, self.info, self.strategy = spec, model_cfg, info, strategy
        self.run_dir, self.write = run_dir, write
        self._repaired = False  # samples.jsonl checked for a torn tail before this run's first append
        self.prompts = list(t.sample_prompts) or [t.sample_prompt]
        self.cfg = GenerationConfig(max_new_tokens=t.sample_tokens, do_sample=t.sample_temperature > 0,
                                    temperature=t.sample_temperature, top_k=t.sample_top_k, seed=t.seed,
                                    overflow="slide", batch_size=len(self.prompts))

    @property
    def enabled(self) -> bool:
        return self.cfg.max_new_tokens > 0 and self.info.task == "lm"

    def __call__(self, step: int) -> list[Completion] | None:
        """Sample from the current weights (a collective); rank 0 returns the completions."""
        s = self.strategy
        model = s.sampling_model(lambda: self.spec.build(self.model_cfg, self.info))
        out = None
        if s.is_main:
            was_training = model.training
            try:
                out = self.spec.generator(model, self.info, s.device)(self.prompts, self.cfg)
            finally:
                model.train(was_training)
            self._append("".join(json.dumps({"step": step, "prompt": c.prompt, "text": c.text}) + "\n"
                                 for c in out))
            for c in out:
                self.write(f"--- sample at step {step} ({c.completion_tokens} tokens) ---\n{c.text}\n---")
        s.barrier()
        return out

    def _append(self, lines: str) -> None:
        """Append to samples.jsonl; the first append of a run drops a torn tail first (see llmtrain.jsonl)."""
        path = self.run_dir / SAMPLES_FILE
        if not self._repaired:
            read_jsonl(path, repair=True)
            self._repaired = True
        with open(path, "a") as f:
            faults.torn_write(f, lines, "samples")


def truncate_samples(run_dir: Path, step: int) -> None:
    """Drop samples of steps after `step` (from a run that died after its last checkpoint)."""
    truncate_after(run_dir / SAMPLES_FILE, step)
