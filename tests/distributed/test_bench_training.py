"""Benchmarks during training (trainer.bench_every, trainer.bench_tasks): a 2-process FSDP run scores a local
multiple-choice task on its sharded weights every 2 steps, each rank its share of the items; the scores reach
metrics.jsonl, TensorBoard and the loss plot, and the last one equals the one-process scorer's (llmtrain-eval's) on
the run's exported weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TINY_LM, read_metrics, train_cli

pytestmark = pytest.mark.distributed

WORDS = ["the", "cat", "sat", "on", "mat", "def", "import", "return", "class", "self", "print", "while"]


def _items(path: Path, n: int = 9) -> Path:
    """n items of 3 endings each (an odd count: the 2 ranks' shares differ, one scores a filler)."""
    rows = []
    for i in range(n):
        endings = [" ".join(WORDS[(i + j + k) % len(WORDS)] for k in range(2 + j)) for j in range(3)]
        rows.append({"context": f"{WORDS[i % len(WORDS)]} = ", "endings": endings, "label": i % 3})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bench_scores_during_a_sharded_run_equal_the_scorer_on_its_export(tmp_path: Path) -> None:
    from llmtrain.generation.choice import read_items, score_items
    from llmtrain.generation.sources import load_source
    from llmtrain.precision import Precision

    items = _items(tmp_path / "items.jsonl")
    run = tmp_path / "run"
    train_cli([*TINY_LM, "strategy=fsdp", "trainer.max_steps=4", "trainer.eval_every=0", "trainer.bench_every=2",
               f"trainer.bench_tasks=[{items}]", "logger.tensorboard=true", "logger.plots=true"], run, nproc=2,
              timeout=180)
    recs = [r for r in read_metrics(run) if "bench/items/acc" in r]
    assert [r["step"] for r in recs] == [2, 4]
    assert all(0 <= r["bench/items/acc"] <= 1 and 0 <= r["bench/items/acc_norm"] <= 1 for r in recs)
    events = b"".join(p.read_bytes() for p in run.rglob("events.out.tfevents.*"))
    assert b"bench/items/acc" in events and b"bench/items/acc_norm" in events
    assert (run / "plots" / "loss.png").is_file()
    lm, tok = load_source(str(run / "final"))
    import torch

    want = score_items(lm, tok, read_items(items), Precision.fp32, torch.device("cpu"))
    print(f"\nin training (fsdp × 2, step 4): acc {recs[-1]['bench/items/acc']:.4f} acc_norm "
          f"{recs[-1]['bench/items/acc_norm']:.4f}; one process on final/: {want}")
    assert want["n"] == 9
    assert recs[-1]["bench/items/acc"] == pytest.approx(want["acc"], abs=1e-9)
    assert recs[-1]["bench/items/acc_norm"] == pytest.approx(want["acc_norm"], abs=1e-9)


@pytest.mark.parametrize(("overrides", "needle"), [
    (["trainer.bench_every=2"], "is empty while trainer.bench_every > 0"),
    (["trainer.bench_every=2", "trainer.bench_tasks=[missing.jsonl]"], "missing.jsonl: no such file"),
    (["trainer.bench_every=-1"], "must be >= 0"),
])
def test_bench_refusals_are_one_line(overrides: list[str], needle: str) -> None:
    from helpers import compose

    from llmtrain.config import checked
    from llmtrain.errors import ConfigError

    with pytest.raises(ConfigError) as ei:
        checked(compose([*TINY_LM, *overrides]))
    assert needle in ei.value.message and "\n" not in str(ei.value)
