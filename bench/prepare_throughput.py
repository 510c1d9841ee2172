"""Preparation throughput (MB/s of text) and peak memory, per tokenizer / num_proc / corpus size.

    .venv/bin/python bench/prepare_throughput.py                      # tinyshakespeare, GPT-2 BPE, num_proc 1 and 2
    .venv/bin/python bench/prepare_throughput.py --synthetic-mb 20 100 --num-proc 1   # + 20 and 100 MB corpora

Each configuration runs in a fresh process that reports its own peak RSS (and its children's, for
num_proc > 1). Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
WORK = Path(os.environ.get("BENCH_DIR", "/tmp/llmtrain-bench"))


def synthetic_corpus(mb: int) -> Path:
    """~mb MB of real text (tinyshakespeare + stdlib sources, repeated) in files of ~10 MB."""
    out = WORK / f"corpus_{mb}mb"
    if out.is_dir() and (out / "done").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    parts = [(SHARED / "tinyshakespeare" / "input.txt").read_text()]
    parts += [p.read_text(errors="replace") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200]]
    blob = "\n".join(parts)
    written, k = 0, 0
    while written < mb * 1_000_000:
        with open(out / f"part_{k:03d}.txt", "w") as fh:
            n = 0
            while n < 8_000_000 and written + n < mb * 1_000_000:
                fh.write(blob)
                n += len(blob.encode())
        written += n
        k += 1
    (out / "done").write_text("")
    return out


def one(source: str, tokenizer: str, num_proc: int) -> None:
    """Child: prepare once into a fresh dir, print a JSON line of figures."""
    os.environ["LLMTRAIN_CACHE"] = str(WORK / "cache")
    sys.path.insert(0, str(REPO))
    from llmtrain.data.prepared import prepare
    from llmtrain.data.shards import read_meta
    from llmtrain.data.sources import resolve_source
    from llmtrain.data.text import TextDataConfig

    out = WORK / f"prep-{os.getpid()}"
    cfg = TextDataConfig(source=source, tokenizer=tokenizer, out_dir=str(out), num_proc=num_proc)
    size = resolve_source(source).total_bytes or 0
    t0 = time.perf_counter()
    prepare(cfg, quiet=True)
    dt = time.perf_counter() - t0
    meta = read_meta(out)
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({"source": source, "tokenizer": Path(tokenizer).name, "num_proc": num_proc, "mb": size / 1e6,
                      "seconds": dt, "mb_per_s": size / 1e6 / dt, "tokens": meta["train_tokens"] + meta["val_tokens"],
                      "peak_rss_mb": rss / 1024}))
    shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=str(SHARED / "gpt2-tokenizer"))
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--synthetic-mb", type=int, nargs="*", default=[], help="also synthetic corpora of these sizes")
    ap.add_argument("--no-shakespeare", action="store_true", help="only the synthetic corpora")
    ap.add_argument("--one", nargs=3, metavar=("SOURCE", "TOKENIZER", "NUM_PROC"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one[0], args.one[1], int(args.one[2]))
        return
    runs = [] if args.no_shakespeare else [(str(SHARED / "tinyshakespeare" / "input.txt"), n) for n in args.num_proc]
    for mb in args.synthetic_mb:
        runs += [(str(synthetic_corpus(mb)), n) for n in args.num_proc]
    print(f"{'source':<28} {'tokenizer':<15} {'num_proc':>8} {'MB':>8} {'s':>7} {'MB/s':>6} {'tokens':>12} {'peak RSS MB':>11}")
    for source, n in runs:
        res = subprocess.run([sys.executable, __file__, "--one", source, args.tokenizer, str(n)], capture_output=True,
                             text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if res.returncode != 0:
            print(res.stderr[-2000:])
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{Path(r['source']).name:<28} {r['tokenizer']:<15} {r['num_proc']:>8} {r['mb']:>8.1f} {r['seconds']:>7.1f} "
              f"{r['mb_per_s']:>6.2f} {r['tokens']:>12,} {r['peak_rss_mb']:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
