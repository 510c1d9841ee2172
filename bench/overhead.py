"""llmtrain's training loop against a bare PyTorch loop on the same tiny GPT-2 and the same batches, in one
process (CPU). The recipe is nanoGPT's small character-level one: 4 layers, 4 heads, 128 wide, block 64,
batch 12, AdamW, grad clip 1.0, byte vocabulary.

    python bench/overhead.py [--steps 300] [--repeat 2] [--threads 2]

The two alternate step by step in one process (a bare-loop step, then one of llmtrain's, inside a real
llmtrain run), so a shared machine's slow moments fall on both alike. Prints the median milliseconds per
optimizer step of each (the first steps dropped as warm-up) and, as its last line,
`overhead_ratio=<llmtrain tok/s ÷ raw tok/s>`.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmtrain.plan import compose  # noqa: E402  (the training config, checked as llmtrain-train checks it)

RECIPE = ["experiment=gpt2_tiny", "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.n_positions=64",
          "data.seq_len=64", "data.tokenizer=byte", "trainer.micro_batch_size=12", "trainer.grad_clip=1.0",
          "optim=adamw", "optim.lr=1e-3", "scheduler=constant", "trainer.eval_every=0", "trainer.ckpt_every=0",
          "trainer.sample_tokens=0", "logger.log_every=10", "logger.progress=false", "logger.tensorboard=false",
          "logger.plots=false", "trainer.max_bad_steps=0", "trainer.precision=fp32"]  # as the bare loop
WARMUP = 10


def raw_loop() -> Callable[[], None]:
    """A bare loop's step: the same native GPT-2 class, data blocks (in llmtrain's order) and optimizer,
    nothing else."""
    import torch

    from llmtrain.data.base import ShardedSampler, build_data
    from llmtrain.models.gpt2 import GPT2ModelConfig, GPT2Spec
    from llmtrain.optim import OptimConfig, build_optimizer

    cfg = compose(RECIPE)
    data = build_data(cfg.data)
    blocks = data.split("train")
    torch.manual_seed(cfg.trainer.seed)
    model = GPT2Spec().build(GPT2ModelConfig(n_layer=4, n_head=4, n_embd=128, n_positions=64), data.info)
    opt = build_optimizer(OptimConfig(lr=1e-3, weight_decay=0.1), model)
    sampler = ShardedSampler(len(blocks), 12, seed=cfg.trainer.seed, shuffle=True)

    def step() -> None:
        b = blocks.get(sampler.next_indices())
        loss_sum, n = model(input_ids=b["input_ids"], labels=b["labels"])
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def interleaved(run_dir: Path, steps: int) -> tuple[list[float], list[float]]:
    """A real `run()` of llmtrain, with one bare-loop step timed before each of its optimizer steps (the whole
    of the loop's step: logging, the stop check, the reads): both see the same moment of a shared machine."""
    from llmtrain.train import run
    from llmtrain.trainer import Trainer

    raw_step, raw, ours = raw_loop(), [], []
    one_step = Trainer._one_step

    def timed(self: Trainer) -> object:
        t0 = time.perf_counter()
        raw_step()
        t1 = time.perf_counter()
        out = one_step(self)
        ours.append(time.perf_counter() - t1)
        raw.append(t1 - t0)
        return out

    Trainer._one_step = timed  # type: ignore[method-assign]
    try:
        run(compose([*RECIPE, f"trainer.max_steps={steps}", f"hydra.run.dir={run_dir}"]), run_dir)
    finally:
        Trainer._one_step = one_step  # type: ignore[method-assign]
    return raw[WARMUP:], ours[WARMUP:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    os.environ.setdefault("LLMTRAIN_CACHE", str(Path(tempfile.gettempdir()) / "llmtrain-bench-cache"))
    raw, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeat):
            r, o = interleaved(Path(tmp) / f"run{i}", a.steps)
            raw += r
            ours += o
    tokens = 12 * 64
    med_raw, med_ours = statistics.median(raw), statistics.median(ours)
    p10 = lambda xs: statistics.quantiles(xs, n=10)[0]  # noqa: E731
    print(f"tiny GPT-2 (4x128, block 64, batch 12), {a.threads} threads, {len(raw)} step pairs (each bare-loop step "
          f"timed just before an llmtrain step), {a.repeat} run(s)")
    for name, med, lo in (("raw loop", med_raw, p10(raw)), ("llmtrain", med_ours, p10(ours))):
        print(f"{name:<10} {med * 1000:7.1f} ms/step  {tokens / med:9,.0f} tok/s   (median; 10th percentile "
              f"{lo * 1000:.1f} ms)")
    print(f"overhead_ratio={med_raw / med_ours:.3f}")


if __name__ == "__main__":
    main()
