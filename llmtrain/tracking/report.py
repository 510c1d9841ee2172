"""`llmtrain-report <sweep_dir>`: every trial of a sweep, best first.

A markdown table on stdout (the trial, i.e. its swept overrides; final train and eval loss, the last score of each
benchmark task (trainer.bench_tasks), median tokens/s, wall time, status), the same rows in <sweep_dir>/report.csv (with every override of each trial), and
<sweep_dir>/sweep.png overlaying the trials' eval-loss curves.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("trial", "train_loss", "eval_loss", "tokens_per_s", "wall_s", "status")
CSV_COLUMNS = (*COLUMNS, "overrides")


def trial_dirs(sweep_dir: Path) -> list[Path]:
    """Run dirs under the sweep dir (any depth): a config.yaml beside run.json or metrics.jsonl, and not inside
    a wandb/ dir (wandb keeps a config.yaml of its own in <run>/wandb/run-*/files/)."""
    from llmtrain.rundir import CONFIG_FILE, METRICS_FILE, RECORD_FILE

    dirs = []
    for p in sweep_dir.rglob(CONFIG_FILE):
        d = p.parent
        if d == sweep_dir or "wandb" in d.relative_to(sweep_dir).parts:
            continue
        if (d / RECORD_FILE).is_file() or (d / METRICS_FILE).is_file():
            dirs.append(d)
    return sorted(dirs)


def trial_row(sweep_dir: Path, run_dir: Path) -> dict[str, Any]:
    from llmtrain.jsonl import read_jsonl
    from llmtrain.rundir import METRICS_FILE, read_run_record

    rec = read_run_record(run_dir)
    metrics = read_jsonl(run_dir / METRICS_FILE)
    train = [m for m in metrics if m.get("loss") is not None]
    evals = [m for m in metrics if m.get("eval_loss") is not None]
    rates = [m["tokens_per_s"] if "tokens_per_s" in m else m.get("samples_per_s") for m in train]
    rates = [r for r in rates if r is not None]
    status = rec.get("status") or ("complete" if (run_dir / "final").is_dir() else "incomplete")
    bench = {k: m[k] for m in metrics for k in m if k.startswith("bench/")}  # each benchmark's last value
    return {**bench, "trial": str(run_dir.relative_to(sweep_dir)),  # named after the swept overrides
            "overrides": " ".join(rec.get("overrides", [])) or run_dir.name,
            "train_loss": train[-1]["loss"] if train else None,
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "tokens_per_s": statistics.median(rates) if rates else None,
            "wall_s": rec.get("wall_s"), "status": status}


def _key(row: dict[str, Any]) -> tuple:
    """Complete trials by eval loss (else train loss), then the rest."""
    loss = row["eval_loss"] if row["eval_loss"] is not None else row["train_loss"]
    ok = row["status"] == "complete" and loss is not None and math.isfinite(loss)
    return (not ok, loss if loss is not None and math.isfinite(loss) else math.inf, row["trial"])


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v).replace("|", "\\|")


def report(sweep_dir: Path) -> list[dict[str, Any]]:
    from llmtrain.errors import ConfigError
    from llmtrain.tracking.plots import sweep_plot

    if not sweep_dir.is_dir():
        raise ConfigError("sweep_dir", f"{sweep_dir} does not exist")
    dirs = trial_dirs(sweep_dir)
    if not dirs:
        raise ConfigError("sweep_dir", f"{sweep_dir} holds no llmtrain run (no dir below it with a config.yaml "
                                          "and a run.json or metrics.jsonl)")
    rows = sorted((trial_row(sweep_dir, d) for d in dirs), key=_key)
    bench = sorted({k for r in rows for k in r if k.startswith("bench/")})  # trainer.bench_tasks' last scores
    columns = (*COLUMNS[:3], *bench, *COLUMNS[3:])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    with open(sweep_dir / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=(*columns, "overrides"), restval="")
        w.writeheader()
        w.writerows(rows)
    png = sweep_plot([(r["trial"], sweep_dir / r["trial"]) for r in rows], sweep_dir / "sweep.png")
    print(f"llmtrain: {len(rows)} trials; wrote {sweep_dir / 'report.csv'}" + (f" and {png}" if png else ""),
          file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> None:
    from llmtrain.cli import report_and_exit
    from llmtrain.errors import ConfigError

    ap = argparse.ArgumentParser(prog="llmtrain-report", description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path, help="a sweep's dir, e.g. multirun/gpt2_tiny")
    args = ap.parse_args(argv)
    try:
        report(args.sweep_dir)
    except ConfigError as err:
        report_and_exit(err)


if __name__ == "__main__":
    main()
