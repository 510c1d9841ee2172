"""Where the CPU step's time goes: `torch.profiler` over the training step of llmtrain's native GPT-2 and, when
a nanoGPT checkout is given, of nanoGPT's `model.GPT` on the same small recipe (4 layers, 4 heads, 128 wide,
block 64, batch 12, AdamW, clip 1.0).

    python bench/profile_cpu.py [--nanogpt ~/nanoGPT] [--steps 30] [--threads 2] [--top 12]

Rows: llmtrain as it trains (byte vocabulary, 257 symbols padded to 320, GPT-2 biases, fused AdamW), llmtrain with
nanoGPT's 65-symbol vocabulary (padded to 128), and nanoGPT (65 symbols, no biases, its own optimizer set-up,
which is not fused on the CPU). The steps of the models take turns, so a shared machine's slow moments fall
on all of them. For each: the median ms per step and the operators with the most self CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

B, T = 12, 64


def llmtrain_step(vocab: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """llmtrain's step on its native GPT-2: summed loss / target count, clip, fused AdamW (its CPU default)."""
    from llmtrain.datainfo import DataInfo
    from llmtrain.models.gpt2 import GPT2ModelConfig, GPT2Spec
    from llmtrain.optim import OptimConfig, build_optimizer

    torch.manual_seed(0)
    model = GPT2Spec().build(GPT2ModelConfig(n_layer=4, n_head=4, n_embd=128, n_positions=T, vocab_size=vocab),
                             DataInfo(task="lm", vocab_size=vocab))
    opt = build_optimizer(OptimConfig(lr=1e-3, weight_decay=0.1), model)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss_sum, n = model(input_ids=x, labels=y)
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def nanogpt_step(root: Path) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """nanoGPT's step as its train.py makes it on a CPU (no scaler, no compile)."""
    sys.path.insert(0, str(root))
    from model import GPT, GPTConfig  # type: ignore[import-not-found]

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=T, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        _, loss = model(x, y % 65)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout (its model.py)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    steps: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
        "llmtrain (vocab 257 -> 320)": llmtrain_step(257),
        "llmtrain (vocab 65 -> 128)": llmtrain_step(65),
    }
    if a.nanogpt:
        steps["nanoGPT (vocab 65, no bias)"] = nanogpt_step(a.nanogpt)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 65, (B, T + 1), generator=g) for _ in range(a.warmup + a.steps)]

    times: dict[str, list[float]] = {k: [] for k in steps}
    for i, xy in enumerate(batches):  # timing: the models take turns, no profiler
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(xy[:, :-1], xy[:, 1:])
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    print(f"{a.threads} threads, {a.steps} timed steps each (after {a.warmup} warm-up), taking turns; then "
          f"{a.steps} profiled steps each; torch {torch.__version__}")
    for name, step in steps.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for xy in batches[a.warmup:]:
                step(xy[:, :-1], xy[:, 1:])
        print(f"\n## {name}: median {statistics.median(times[name]) * 1000:.1f} ms/step")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top, max_name_column_width=36))


if __name__ == "__main__":
    main()
