"""fp32 against bf16 on this CPU: llmtrain's native GPT-2 training step (its loss, fused AdamW, clip 1.0, the
trainer's autocast), the two precisions taking turns step by step in one process, so a shared machine's slow
moments fall on both alike.

    python bench/cpu_bf16.py [--layers 4] [--width 256] [--seq 128] [--batch 8] [--steps 60] [--threads 2]

Prints what `trainer.precision=auto` picks on this CPU and why, the median milliseconds per optimizer step of
each precision (the first steps dropped as warm-up) and, as its last line, `bf16_speedup=<fp32 ms ÷ bf16 ms>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WARMUP = 5
VOCAB = 2048  # the default run's BPE


def make_step(precision: str, a: argparse.Namespace, batches: list) -> Callable[[int], float]:
    """One training step at `precision` on batch i (the same model init and batches for both); returns its loss."""
    import torch

    from llmtrain.datainfo import DataInfo
    from llmtrain.models.gpt2 import GPT2ModelConfig, GPT2Spec
    from llmtrain.optim import OptimConfig, build_optimizer
    from llmtrain.precision import Precision, autocast

    spec, cpu = GPT2Spec(), torch.device("cpu")
    torch.manual_seed(0)
    model = spec.build(GPT2ModelConfig(n_layer=a.layers, n_head=a.heads, n_embd=a.width, n_positions=a.seq),
                       DataInfo(task="lm", vocab_size=VOCAB)).train()
    opt = build_optimizer(OptimConfig(lr=1e-3, weight_decay=0.1), model)
    prec = Precision(precision)

    def step(i: int) -> float:
        with autocast(prec, cpu):
            loss_sum, n = spec.loss(model, batches[i % len(batches)])
        loss = loss_sum / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    a = ap.parse_args()
    import torch

    from llmtrain.precision import auto_reason

    torch.set_num_threads(a.threads)
    print(f"llmtrain: {auto_reason(torch.device('cpu'))}")
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(8):
        ids = torch.randint(0, VOCAB, (a.batch, a.seq + 1), generator=g)
        batches.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone()})
    steps = {p: make_step(p, a, batches) for p in ("fp32", "bf16")}
    times: dict[str, list[float]] = {p: [] for p in steps}
    losses: dict[str, float] = {}
    for i in range(a.steps):
        for p, step in (steps.items() if i % 2 == 0 else reversed(steps.items())):  # alternate who goes first
            t0 = time.perf_counter()
            losses[p] = step(i)
            times[p].append(time.perf_counter() - t0)
    tokens = a.batch * a.seq
    print(f"native GPT-2 {a.layers}x{a.width}, seq {a.seq}, batch {a.batch}, vocab {VOCAB}, {a.threads} threads, "
          f"{a.steps} step pairs (warm-up {WARMUP} dropped)")
    med = {}
    for p, ts in times.items():
        med[p] = statistics.median(ts[WARMUP:])
        print(f"{p:<5} {med[p] * 1000:8.1f} ms/step  {tokens / med[p]:9,.0f} tok/s  (last loss {losses[p]:.4f})")
    print(f"bf16_speedup={med['fp32'] / med['bf16']:.2f}")


if __name__ == "__main__":
    main()
