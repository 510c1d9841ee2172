"""GPT-2 124M, bf16, N steps under each strategy (world size 1), with and without gradient checkpointing.

Prints a markdown table of median tokens/s (steps after warm-up) and peak GPU memory per row, with the
exact command of each row. Needs a GPU, a corpus and the GPT-2 tokenizer files:

    python bench/strategies.py --corpus input.txt --tokenizer gpt2-tokenizer/ [--steps 50] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROWS = [("single", []), ("ddp", ["strategy=ddp"]), ("fsdp", ["strategy=fsdp"]),
        ("deepspeed zero2", ["strategy=deepspeed", "strategy.zero_stage=2"]),
        ("deepspeed zero3", ["strategy=deepspeed", "strategy.zero_stage=3"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the median")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="llmtrain-bench-"))
    print("| strategy | grad ckpt | tok/s (median) | peak mem GiB | command |\n| --- | --- | --- | --- | --- |")
    for name, extra in ROWS:
        for gc in (False, True):
            run_dir = out / f"{name.replace(' ', '_')}_{int(gc)}"
            overrides = ["experiment=gpt2_small", f"data.source={args.corpus}", f"data.tokenizer={args.tokenizer}",
                         f"trainer.max_steps={args.steps}", f"trainer.micro_batch_size={args.micro_batch}",
                         "trainer.grad_accum_steps=1", "trainer.precision=bf16", f"trainer.compile={args.compile}",
                         f"trainer.gradient_checkpointing={gc}", "trainer.eval_every=0", "trainer.ckpt_every=0",
                         "trainer.sample_tokens=0", "logger.log_every=1", "logger.progress=false", *extra,
                         f"hydra.run.dir={run_dir}"]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                   "-m", "llmtrain.train", *overrides]
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            shown = "torchrun --standalone --nproc_per_node=1 -m llmtrain.train " + shlex.join(overrides[:-1])
            if res.returncode != 0:
                print(f"| {name} | {gc} | failed (exit {res.returncode}) | | `{shown}` |")
                print(res.stderr[-2000:], file=sys.stderr)
                continue
            from llmtrain.rundir import METRICS_FILE

            recs = [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]
            steady = [r for r in recs if "tokens_per_s" in r and r["step"] > args.warmup]
            tps = statistics.median(r["tokens_per_s"] for r in steady)
            mem = max(r.get("peak_mem_gib", 0.0) for r in steady)
            print(f"| {name} | {gc} | {tps:,.0f} | {mem:.1f} | `{shown}` |", flush=True)


if __name__ == "__main__":
    main()
