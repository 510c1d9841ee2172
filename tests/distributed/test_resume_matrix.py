"""One checkpoint format for single, ddp and fsdp: a run checkpointed under any of them resumes under any other
and under fsdp at another world size, continuing the uninterrupted run's losses (CPU fp32, accumulation 2,
dropout on), optimizer state and data position included.

Dropout masks come from each sample's row in the global micro-batch (`trainer.dropout_rng=global`), so the
uninterrupted runs of every layout agree with each other too: the first test checks that.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY_LM, ckpt_state, losses, train_cli

from llmtrain import checkpoint as ckpt

pytestmark = pytest.mark.distributed

STEPS, AT = 8, 4
RTOL = 1e-6
BASE = [*TINY_LM, "model.dropout=0.1", "trainer.dropout_rng=global", "trainer.grad_accum_steps=2",
        f"trainer.max_steps={STEPS}", "trainer.eval_every=0", f"trainer.ckpt_every={AT}", "trainer.keep_checkpoints=10",
        "logger.tensorboard=false", "logger.plots=false"]
# the same global micro-batch (8 rows) in every layout
LAYOUTS: dict[str, tuple[list[str], int]] = {
    "single": (["trainer.micro_batch_size=8"], 1),
    "ddp": (["strategy=ddp", "trainer.micro_batch_size=4"], 2),
    "fsdp": (["strategy=fsdp", "trainer.micro_batch_size=4"], 2),
    "fsdp1": (["strategy=fsdp", "trainer.micro_batch_size=8"], 1),
}
# each of single, ddp, fsdp resumes under the others, and fsdp under another world size (1 ↔ 2)
MATRIX = [("single", "ddp"), ("single", "fsdp"), ("ddp", "single"), ("ddp", "fsdp"), ("ddp", "fsdp1"),
          ("fsdp", "single"), ("fsdp", "ddp"), ("fsdp", "fsdp1"), ("fsdp1", "fsdp")]


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The uninterrupted run of every layout a matrix row starts from."""
    root = tmp_path_factory.mktemp("matrix")
    out = {}
    for name in sorted({src for src, _ in MATRIX}):
        overrides, nproc = LAYOUTS[name]
        train_cli([*BASE, *overrides], root / name, nproc=nproc, timeout=180)
        out[name] = root / name
    return out


def _rel(got: dict[int, float], want: dict[int, float]) -> float:
    assert sorted(got) == sorted(want)
    return max(abs(got[k] - want[k]) / abs(want[k]) for k in want)


def test_every_layout_draws_the_same_run(full: dict[str, Path]) -> None:
    """Same seed, same global batch, dropout on: single, ddp×2, fsdp×2 and fsdp×1 train the same losses."""
    ref = losses(full["single"])
    assert sorted(ref) == list(range(1, STEPS + 1))
    for name, run_dir in full.items():
        assert _rel(losses(run_dir), ref) <= RTOL, name


@pytest.mark.parametrize(("src", "dst"), MATRIX, ids=[f"{s}-to-{d}" for s, d in MATRIX])
def test_a_checkpoint_resumes_under_another_strategy(full: dict[str, Path], tmp_path: Path, src: str,
                                                     dst: str) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(full[src] / "config.yaml", run_dir)
    shutil.copytree(ckpt.step_dir(full[src], AT), ckpt.step_dir(run_dir, AT))
    overrides, nproc = LAYOUTS[dst]
    res = train_cli([*BASE, *overrides], run_dir, nproc=nproc, timeout=180)
    assert f"resuming from {ckpt.step_dir(run_dir, AT)} at step {AT}" in res.stdout, res.stdout[-2000:]
    want = {k: v for k, v in losses(full[src]).items() if k > AT}
    assert _rel(losses(run_dir), want) <= RTOL
    a, b = ckpt_state(ckpt.step_dir(full[src], STEPS)), ckpt_state(ckpt.step_dir(run_dir, STEPS))
    assert a["optim"]["state"].keys() == b["optim"]["state"].keys()
    for name, sa in a["optim"]["state"].items():  # Adam's moments carried over, not restarted
        sb = b["optim"]["state"][name]
        assert int(sa["step"]) == int(sb["step"]) == STEPS
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=1e-4, atol=1e-12, msg=name)


def test_deepspeed_and_the_others_refuse_each_other_with_the_way_out(full: dict[str, Path], tmp_path: Path) -> None:
    """DeepSpeed keeps its own format: a single/ddp/fsdp checkpoint under strategy=deepspeed is one line naming
    the strategies that read it and how to start from its weights."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(full["single"] / "config.yaml", run_dir)
    shutil.copytree(ckpt.step_dir(full["single"], AT), ckpt.step_dir(run_dir, AT))
    res = train_cli([*BASE, "strategy=deepspeed", "trainer.micro_batch_size=8"], run_dir, check=False, timeout=120)
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(err) == 1, res.stderr[-2000:]
    assert "strategy=single, ddp or fsdp" in err[0] and "llmtrain-export" in err[0] and "model.pretrained" in err[0]
