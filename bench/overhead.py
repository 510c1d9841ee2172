"""llmtrain's training loop against a bare PyTorch loop on the same tiny GPT-2 and the same batches, in one
process (CPU). The recipe is nanoGPT's small character-level one: 4 layers, 4 heads, 128 wide, block 64,
batch 12, AdamW, grad clip 1.0, byte vocabulary.

    python bench/overhead.py [--steps 200] [--repeat 3] [--threads 2]

Prints milliseconds per optimizer step of each: the 10th percentile of a run's steps (the first dropped as
warm-up; on a shared machine the low percentile is the code's cost, the median also the neighbours'), best of
--repeat runs taken in turns, with the medians beside; and, as its last line,
`overhead_ratio=<llmtrain tok/s ÷ raw tok/s>` from the 10th percentiles.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPE = ["experiment=gpt2_tiny", "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.n_positions=64",
          "data.seq_len=64", "data.tokenizer=byte", "trainer.micro_batch_size=12", "trainer.grad_clip=1.0",
          "optim=adamw", "optim.lr=1e-3", "scheduler=constant", "trainer.eval_every=0", "trainer.ckpt_every=0",
          "trainer.sample_tokens=0", "logger.log_every=10", "logger.progress=false", "logger.tensorboard=false",
          "logger.plots=false", "trainer.max_bad_steps=0"]
WARMUP = 10


def compose(overrides: list[str]):
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from llmtrain.config import conf_dir, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return _compose("config", overrides=overrides)


def llmtrain_steps(run_dir: Path, steps: int) -> list[float]:
    """Seconds per optimizer step of a real `run()`, from its metrics (rates exclude eval and checkpoints)."""
    from llmtrain.train import run

    cfg = compose([*RECIPE, f"trainer.max_steps={steps}", "logger.log_every=1", f"hydra.run.dir={run_dir}"])
    run(cfg, run_dir)
    import json

    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in recs if "step_time_s" in r][WARMUP:]


def raw_steps(steps: int) -> list[float]:
    """A bare loop: the same native GPT-2 class, data blocks and optimizer, nothing else."""
    import torch

    from llmtrain.data.base import ShardedSampler, build_data
    from llmtrain.models.gpt2 import GPT2ModelConfig, GPT2Spec
    from llmtrain.optim import OptimConfig, build_optimizer

    cfg = compose(RECIPE)
    data = build_data(cfg.data, model_cfg=cfg.model)
    blocks = data.split("train")
    torch.manual_seed(cfg.trainer.seed)
    model = GPT2Spec().build(GPT2ModelConfig(n_layer=4, n_head=4, n_embd=128, n_positions=64), data.info)
    opt = build_optimizer(OptimConfig(lr=1e-3, weight_decay=0.1), model)
    sampler = ShardedSampler(len(blocks), 12, seed=cfg.trainer.seed, shuffle=True)  # llmtrain's batches
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        b = blocks.get(sampler.next_indices())
        loss_sum, n = model(input_ids=b["input_ids"], labels=b["labels"])
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(time.perf_counter() - t0)
    return out[WARMUP:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    os.environ.setdefault("LLMTRAIN_CACHE", str(Path(tempfile.gettempdir()) / "llmtrain-bench-cache"))
    ours, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeat):  # taking turns, so both see the same machine load
            raw.append(raw_steps(a.steps))
            ours.append(llmtrain_steps(Path(tmp) / f"run{i}", a.steps))
    p10 = lambda xs: statistics.quantiles(xs, n=10)[0]  # noqa: E731
    t_raw, t_ours = min(map(p10, raw)), min(map(p10, ours))
    tokens = 12 * 64
    print(f"tiny GPT-2 (4x128, block 64, batch 12), {a.threads} threads, {a.steps - WARMUP} steps per run, "
          f"{a.repeat} runs each")
    for name, t, runs in (("raw loop", t_raw, raw), ("llmtrain", t_ours, ours)):
        medians = ", ".join(f"{statistics.median(r) * 1000:.1f}" for r in runs)
        print(f"{name:<10} {t * 1000:7.1f} ms/step  {tokens / t:9,.0f} tok/s   (10th percentile, best run; "
              f"run medians {medians})")
    print(f"overhead_ratio={t_raw / t_ours:.3f}")


if __name__ == "__main__":
    main()
