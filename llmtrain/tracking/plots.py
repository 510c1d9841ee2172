"""PNG plots (matplotlib, no display): a run's loss curves, and a sweep's eval-loss curves side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of <run>/metrics.jsonl (a torn or garbled line dropped with a warning)."""
    from llmtrain.jsonl import read_jsonl
    from llmtrain.rundir import METRICS_FILE

    return read_jsonl(run_dir / METRICS_FILE)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_plot(run_dir: Path) -> Path | None:
    """<run>/plots/loss.png: train and eval loss against the step, the learning rate on a second axis; below them
    the benchmarks' accuracies when the run scored any (trainer.bench_tasks)."""
    recs = _records(run_dir)
    train = [(r["step"], r["loss"], r.get("lr")) for r in recs if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in recs if r.get("eval_loss") is not None]
    if not train:
        return None
    bench = sorted({k for r in recs for k in r if k.startswith("bench/")})  # trainer.bench_tasks' scores
    plt = _pyplot()
    fig, axes = plt.subplots(2 if bench else 1, 1, figsize=(8, 8 if bench else 4.5), dpi=100, squeeze=False)
    ax = axes[0][0]
    ax.plot([s for s, _, _ in train], [v for _, v, _ in train], label="train loss", lw=1.2)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    if any(lr is not None for _, _, lr in train):
        ax2 = ax.twinx()
        ax2.plot([s for s, _, _ in train], [lr for _, _, lr in train], color="tab:gray", ls="--", lw=1, label="lr")
        ax2.set_ylabel("learning rate")
        more = ax2.get_legend_handles_labels()
        lines, labels = lines + more[0], labels + more[1]
    ax.legend(lines, labels, loc="upper right")
    ax.set_title(run_dir.name)
    if bench:  # below: each benchmark's accuracy against the step
        bx = axes[1][0]
        for k in bench:
            pts = [(r["step"], r[k]) for r in recs if r.get(k) is not None]
            bx.plot([s for s, _ in pts], [v for _, v in pts], "o-", ms=3, lw=1.2, label=k.removeprefix("bench/"))
        bx.set_xlabel("step")
        bx.set_ylabel("benchmark accuracy")
        bx.set_ylim(0, 1)
        bx.grid(alpha=0.3)
        bx.legend(fontsize=7, loc="lower right")
    out = run_dir / "plots" / "loss.png"
    out.parent.mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def sweep_plot(trials: list[tuple[str, Path]], out: Path) -> Path | None:
    """The eval-loss curves of a sweep's trials (label, run dir) on one plot."""
    curves = [(label, [(r["step"], r["eval_loss"]) for r in _records(d) if r.get("eval_loss") is not None])
              for label, d in trials]
    curves = [(label, c) for label, c in curves if c]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for label, c in curves:
        ax.plot([s for s, _ in c], [v for _, v in c], "o-", ms=3, lw=1.2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(out.parent.name)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
