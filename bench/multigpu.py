"""The parallel layouts on every GPU of one machine: tokens/s, MFU and peak memory of fsdp, fsdp × tp and HSDP on
GPT-2 XL's and Llama-3-8B's shapes, each beside llmtrain-plan's estimate for the same layout (the plan's
tokens/s, step time and memory per GPU), so the planner's choice can be checked against what ran.

    python bench/multigpu.py                                # both shapes on all GPUs (each layout 30 steps)
    python bench/multigpu.py --model llama3_8b --steps 20
    python bench/multigpu.py --device cpu --nproc 4 --tiny  # a dry run of every row on the CPU (gloo)

Each row is one `torchrun --standalone --nproc-per-node N -m llmtrain.train` of the layout (bf16, activation
checkpointing, random token ids: `gpu.corpus`); its tokens/s and MFU are the medians of the steps after the
warm-up as llmtrain's metrics.jsonl records them, its memory rank 0's peak. Layouts: fsdp (dp N), fsdp dp N/2 ×
tp 2 with sequence parallelism, HSDP 2 × N/2. The plan's row is `llmtrain.plan.layout_row` on one node of N of
this GPU (`distributed.auto.gpu_key`); on the CPU the plan's figures are an H100's (shown for the shape of the
table only). Needs at least 4 processes (2 on the CPU dry run with --nproc 2: HSDP 2 × 1, tp 2 alone).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

MODELS = {  # name → (the model's overrides, the data's vocabulary, micro-batch, sequence)
    "gpt2_xl": (["experiment=gpt2_xl", "model.vocab_size=50257"], 50257, 4, 1024),
    "llama3_8b": (["experiment=llama_tiny", "model=llama3_8b"], 128256, 1, 4096),
}
TINY = {
    "gpt2_xl": (["experiment=gpt2_tiny", "model.vocab_size=50257"], 50257, 4, 64),
    "llama3_8b": (["experiment=llama_tiny", "model.vocab_size=50257"], 50257, 4, 64),
}


class _Data:
    """What gpu.corpus reads of its Setup."""

    def __init__(self, tiny: bool, vocab: int) -> None:
        self.tiny, self.data_vocab = tiny, vocab


def layouts(n: int) -> list[tuple[str, list[str], dict[str, Any]]]:
    """(label, strategy overrides, llmtrain.plan.Layout fields) of the rows for n processes."""
    rows = [(f"fsdp dp{n}", ["strategy=fsdp"], {"strategy": "fsdp"})]
    if n % 2 == 0:
        rows.append((f"fsdp dp{n // 2}×tp2" if n > 2 else "tp2 (fsdp dp1)", ["strategy=fsdp", "strategy.tp=2"],
                     {"strategy": "fsdp", "tp": 2, "sequence_parallel": True}))
        rows.append((f"hsdp 2×{n // 2}", ["strategy=fsdp", "strategy.dp_replicate=2"],
                     {"strategy": "fsdp", "dp_replicate": 2}))
    return rows


def overrides(model: str, a: argparse.Namespace, data: Path) -> list[str]:
    base, _, micro, seq = (TINY if a.tiny else MODELS)[model]
    return [*base, f"data.source={data}", f"data.seq_len={seq}", f"model.n_positions={seq}" if "gpt2" in model
            else f"model.n_positions={max(seq, 64)}", f"trainer.micro_batch_size={micro}",
            "trainer.grad_accum_steps=1", f"trainer.max_steps={a.steps}", "trainer.gradient_checkpointing=true",
            "trainer.precision=bf16", f"trainer.device={a.device}", "trainer.compile=false", "trainer.eval_every=0",
            "trainer.ckpt_every=0", "trainer.sample_tokens=0", "logger.log_every=1", "logger.progress=false",
            "logger.tensorboard=false", "logger.plots=false"]


def run_layout(args: list[str], n: int, run_dir: Path, timeout: float) -> dict[str, Any]:
    """One torchrun of the layout; the medians of its metrics after the warm-up (or the error's last line)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m",
           "llmtrain.train", *args, f"hydra.run.dir={run_dir}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    metrics = run_dir / "metrics.jsonl"
    if res.returncode != 0 or not metrics.is_file():
        err = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
        return {"error": err[-1][:200] if err else f"exit {res.returncode}"}
    recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    recs = [r for r in recs if "tokens_per_s" in r]
    kept = recs[min(len(recs) - 1, max(2, len(recs) // 4)):]  # after the warm-up
    out = {k: statistics.median(r[k] for r in kept) for k in ("tokens_per_s", "step_time_s", "mfu")
           if kept and all(k in r for r in kept)}
    mem = [r["peak_mem_gib"] for r in recs if "peak_mem_gib" in r]
    out["peak_gib"] = max(mem) if mem else None
    return out


def planned(args: list[str], n: int, fields: dict[str, Any], device: str) -> dict[str, Any]:
    """llmtrain-plan's row of this layout on one node of n of this GPU (an H100 on the CPU)."""
    from llmtrain.distributed.auto import gpu_key
    from llmtrain.plan import GIB, Cluster, Layout, compose, layout_row, shape_of

    gpu = "h100"
    if device == "cuda":
        gpu = gpu_key(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory)
    s = shape_of(compose(args))
    r = layout_row(s, Layout(**fields), Cluster(1, n, gpu))
    return {"tokens_per_s": r.tokens_per_s, "step_time_s": r.step_s, "gib": r.memory.total / GIB, "fits": r.fits,
            "gpu": gpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nproc", type=int, default=None, help="processes (default: every GPU)")
    ap.add_argument("--model", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: a dry run of every row")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per row")
    ap.add_argument("--out", type=Path, default=Path("bench-multigpu.json"))
    a = ap.parse_args()
    n = a.nproc or (torch.cuda.device_count() if a.device == "cuda" else 2)
    if n < 2:
        ap.error(f"{n} device(s): the layouts need at least 2 processes (--nproc; on one GPU, bench/gpu.py)")
    from gpu import corpus

    name = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.model:
            vocab = (TINY if a.tiny else MODELS)[model][1]
            data = corpus(Path(tmp) / f"data-{model}", _Data(a.tiny, vocab))
            for label, strategy, fields in layouts(n):
                args = [*overrides(model, a, data), *strategy]
                got = run_layout(args, n, Path(tmp) / f"run-{len(rows)}", a.timeout)
                plan = planned(args, n, fields, a.device)
                rows.append({"model": model, "layout": label, "measured": got, "plan": plan,
                             "command": f"torchrun --nproc-per-node {n} -m llmtrain.train " + " ".join(args)})
                print(json.dumps(rows[-1]["measured"] | {"row": f"{model} {label}"}), flush=True)
    print(f"\n{datetime.date.today()} · {n} × {name} · torch {torch.__version__}\n")
    print("| model | layout | tokens/s | step s | MFU | peak GiB | plan tokens/s | plan step s | plan GiB |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, p = r["measured"], r["plan"]
        cells = ([f"{m['tokens_per_s']:,.0f}", f"{m['step_time_s']:.3f}",
                  f"{m['mfu']:.1%}" if "mfu" in m else "-",
                  f"{m['peak_gib']:.1f}" if m.get("peak_gib") is not None else "-"]
                 if "tokens_per_s" in m else [f"failed: {m.get('error', '?')}", "", "", ""])
        cells += [f"{p['tokens_per_s']:,.0f}", f"{p['step_time_s']:.3f}", f"{p['gib']:.1f}"]
        print(f"| {r['model']} | {r['layout']} | {' | '.join(cells)} |")
    a.out.write_text(json.dumps({"date": str(datetime.date.today()), "device": name, "nproc": n, "rows": rows},
                                indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
