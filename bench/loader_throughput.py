"""Loader throughput in tokens/s per process: memmapped shards → [B, T] int64 batches (CPU).

    .venv/bin/python bench/loader_throughput.py            # 50M random tokens in 2 shards, a few shapes

Target: >= 8M tokens/s (20x what GPT-2 124M consumes on one H100, ~400k tok/s). The shards are
fresh, so reads come from the page cache; a cold multi-GB corpus adds disk time on first touch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmtrain.data.base import Loader, ShardedSampler  # noqa: E402
from llmtrain.data.text import TokenBlocks  # noqa: E402

WORK = Path(os.environ.get("BENCH_DIR", "/tmp/llmtrain-bench")) / "loader"


def shards(n_tokens: int, n_shards: int) -> list[Path]:
    WORK.mkdir(parents=True, exist_ok=True)
    per = n_tokens // n_shards
    paths = [WORK / f"train_{k:03d}.bin" for k in range(n_shards)]
    if not all(p.is_file() and p.stat().st_size == per * 2 for p in paths):
        rng = np.random.default_rng(0)
        for p in paths:
            rng.integers(0, 50257, per, dtype=np.uint16).tofile(p)
    return paths


def measure(paths: list[Path], seq_len: int, batch: int, shuffle: bool, prefetch: int, seconds: float) -> float:
    ds = TokenBlocks(paths, "uint16", seq_len)
    loader = Loader(ds, ShardedSampler(len(ds), batch, seed=0, shuffle=shuffle), torch.device("cpu"),
                    prefetch=prefetch)
    next(loader)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(50):
            n += next(loader)["input_ids"].numel()
    dt = time.perf_counter() - t0
    loader.close()
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=50_000_000)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'shards':>6} {'seq_len':>7} {'batch':>5} {'order':>10} {'prefetch':>8} {'tokens/s':>14}")
    for n_shards in (1, 2):
        paths = shards(args.tokens, n_shards)
        for seq_len, batch in ((1024, 8), (1024, 16), (128, 16)):
            for shuffle in (True, False):
                for prefetch in (0, 2):
                    r = measure(paths, seq_len, batch, shuffle, prefetch, args.seconds)
                    print(f"{n_shards:>6} {seq_len:>7} {batch:>5} {'random' if shuffle else 'sequential':>10} "
                          f"{prefetch:>8} {r:>14,.0f}", flush=True)


if __name__ == "__main__":
    main()
