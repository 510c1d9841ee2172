"""Faults in one process: verified checkpoints and their fallback, safe loading, non-finite steps, preemption,
a full disk, the run-dir lock, resuming on another world size (the data position), damaged prepared data."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_LM, ckpt_state, compose, losses, read_metrics

from llmtrain import checkpoint as ckpt
from llmtrain.train import run

SHARD = "dcp/__0_0.distcp"  # a one-process checkpoint's model and optimizer tensors
BASE = ["trainer.eval_every=0", "trainer.keep_checkpoints=10", "logger.tensorboard=false", "logger.plots=false"]


def _cfg(run_dir: Path, *extra: str):
    return compose([*TINY_LM, *BASE, *extra, f"hydra.run.dir={run_dir}"])


def _state(ck: Path) -> dict:
    return ckpt_state(ck)


def _equal(a: dict, b: dict) -> bool:
    """Nested state dicts equal, tensor by tensor."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def _reseal(ck: Path) -> None:
    """Recompute a checkpoint's manifest checksums, as someone crafting a checkpoint would."""
    from llmtrain.safeio import describe_files

    m = ckpt.read_manifest(ck)
    m["files"] = describe_files(ck, m["files"])
    (ck / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 steps, a checkpoint every 2 (dropout and accumulation on: resumes must restore RNG and order)."""
    run_dir = tmp_path_factory.mktemp("rel") / "ref"
    run(_cfg(run_dir, "trainer.max_steps=8", "trainer.ckpt_every=2", "model.dropout=0.1",
             "trainer.grad_accum_steps=2"), run_dir)
    return run_dir


def _copy_until(ref: Path, dest: Path, step: int) -> Path:
    """A run dir holding `ref`'s config and its checkpoints up to `step` (a run that died after it)."""
    dest.mkdir(parents=True)
    shutil.copy(ref / "config.yaml", dest / "config.yaml")
    for ck in ckpt.list_checkpoints(ref):
        if int(ck.name[5:]) <= step:
            shutil.copytree(ck, dest / "checkpoints" / ck.name)
    return dest


# verified checkpoints --------------------------------------------------------------------------------------
DAMAGE = {
    "truncated": lambda ck: os.truncate(ck / SHARD, (ck / SHARD).stat().st_size // 2),
    "missing": lambda ck: (ck / "trainer.pt").unlink(),
    "flipped byte": lambda ck: _flip(ck / SHARD),
    "bad manifest": lambda ck: (ck / "manifest.json").write_text("{not json"),
}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_with_one_warning(reference: Path, tmp_path: Path, damage: str,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """The newest checkpoint (step 6) is damaged: resume says why in one line, never loads it, and continues
    from step 4 to the reference's losses bit for bit; keep_checkpoints=1 then keeps only a valid one."""
    part = _copy_until(reference, tmp_path / "part", 6)
    DAMAGE[damage](part / "checkpoints" / "step_00000006")
    run(_cfg(part, "trainer.max_steps=8", "trainer.ckpt_every=2", "model.dropout=0.1",
             "trainer.grad_accum_steps=2", "trainer.keep_checkpoints=1"), part)
    out = capsys.readouterr()
    warnings = [ln for ln in out.err.splitlines() if ln.startswith("llmtrain: warning: checkpoint")]
    assert len(warnings) == 1 and "step_00000006 is not usable" in warnings[0], out.err
    assert f"resuming from {part / 'checkpoints' / 'step_00000004'} at step 4" in out.out
    want = losses(reference)
    assert {s: v for s, v in losses(part).items() if s > 4} == {s: want[s] for s in range(5, 9)}
    assert [p.name for p in ckpt.list_checkpoints(part)] == ["step_00000008"]
    assert ckpt.problem(part / "checkpoints" / "step_00000008", checksums=True) is None


def test_every_checkpoint_damaged_starts_over(reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    part = _copy_until(reference, tmp_path / "part", 4)
    for ck in ckpt.list_checkpoints(part):
        _flip(ck / SHARD)
    assert ckpt.resolve_resume("auto", part) is None
    assert "no older checkpoint is left: starting from step 0" in capsys.readouterr().err


def test_manifest_lists_sizes_and_checksums(reference: Path) -> None:
    ck = reference / "checkpoints" / "step_00000008"
    files = ckpt.read_manifest(ck)["files"]
    assert set(files) == {SHARD, "dcp/.metadata", "rng_rank0.pt", "trainer.pt"}
    assert all(f["size"] == (ck / n).stat().st_size and len(f["sha256"]) == 64 for n, f in files.items())


# non-finite steps -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused-adamw"])
def test_a_nonfinite_step_changes_no_weight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fused: bool) -> None:
    """A NaN loss at step 3: its update is skipped (weights and optimizer state as after step 2, also on the
    fused kernel's on-device skip), counted and logged; training goes on."""
    monkeypatch.setenv("LLMTRAIN_FAULT", "nan:loss:3")
    run_dir = tmp_path / "run"
    run(_cfg(run_dir, "trainer.max_steps=5", "trainer.ckpt_every=1", f"optim.fused={str(fused).lower()}"), run_dir)
    recs = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    assert recs[3]["loss"] is None and recs[3]["bad_steps"] == 1 and "bad_steps" not in recs[2]
    assert all(np.isfinite(recs[s]["loss"]) for s in (1, 2, 4, 5))
    s2, s3, s4 = (_state(ckpt.step_dir(run_dir, s)) for s in (2, 3, 4))
    assert _equal(s2["model"], s3["model"]), "the skipped step changed the weights"
    assert _equal(s2["optim"]["state"], s3["optim"]["state"]), "... or the optimizer state (its step count)"
    assert not _equal(s3["model"], s4["model"])  # the next step trains again


def test_bad_steps_in_a_row_stop_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("LLMTRAIN_FAULT", "nan:loss:3+")
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as ei:
        run(_cfg(run_dir, "trainer.max_steps=20", "trainer.ckpt_every=1", "trainer.max_bad_steps=3"), run_dir)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("llmtrain: error")]
    assert ei.value.code == 1 and len(err) == 1 and "not finite for 3 steps in a row" in err[0], err
    assert max(losses(run_dir)) == 5  # steps 3, 4, 5 were bad
    good = _state(ckpt.step_dir(run_dir, 2))["model"]
    assert all(_equal(_state(ck)["model"], good) for ck in ckpt.list_checkpoints(run_dir)[2:])


# preemption -------------------------------------------------------------------------------------------------
PREEMPT_ARGS = ["trainer.max_steps=40", "trainer.ckpt_every=10", "model.dropout=0.1", "trainer.grad_accum_steps=2",
                "logger.plots=true"]


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("rel") / "long"
    run(_cfg(run_dir, *PREEMPT_ARGS), run_dir)
    return run_dir


@pytest.mark.parametrize("seed", [0, 1])
def test_sigterm_checkpoints_after_the_step_and_exits_0(long_reference: Path, tmp_path: Path, seed: int,
                                                        capsys: pytest.CaptureFixture) -> None:
    """SIGTERM at a random time: the step finishes, one checkpoint is written (off the ckpt_every cadence),
    exit 0; the same command again matches an uninterrupted run bit for bit."""
    run_dir = tmp_path / "run"
    after = random.Random(seed).randint(3, 30)  # SIGTERM once step `after` is logged, at a random instant
    sent: list[float] = []

    def preempt() -> None:
        while not (run_dir / "metrics.jsonl").is_file() or max(losses(run_dir), default=0) < after:
            time.sleep(0.002)
        time.sleep(random.Random(seed).uniform(0, 0.02))
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=preempt, daemon=True)
    t.start()
    with pytest.raises(SystemExit) as ei:
        run(_cfg(run_dir, *PREEMPT_ARGS), run_dir)
    took = time.monotonic() - sent[0]
    out = capsys.readouterr()
    assert ei.value.code == 0 and "llmtrain: preempted at step" in out.err, out.err[-2000:]
    step = max(losses(run_dir))
    assert after <= step < 40 and ckpt.list_checkpoints(run_dir)[-1].name == f"step_{step:08d}"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "preempted"
    assert (run_dir / "plots" / "loss.png").is_file()  # a stopped run has its plot too
    print(f"\nSIGTERM after step {after}: checkpoint of step {step}, exit {took * 1000:.0f} ms after the signal")
    run(_cfg(run_dir, *PREEMPT_ARGS), run_dir)
    assert losses(run_dir) == losses(long_reference)


# a full disk -------------------------------------------------------------------------------------------------
def test_disk_full_during_a_save_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("LLMTRAIN_FAULT", "enospc:save:2")
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as ei:
        run(_cfg(run_dir, "trainer.max_steps=6", "trainer.ckpt_every=2"), run_dir)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("llmtrain: error")]
    assert ei.value.code == 1 and len(err) == 1, err
    assert "No space left on device" in err[0] and "step_00000002" in err[0], err
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000002"]  # no temp dir left behind
    assert ckpt.problem(run_dir / "checkpoints" / "step_00000002", checksums=True) is None
    monkeypatch.delenv("LLMTRAIN_FAULT")
    run(_cfg(run_dir, "trainer.max_steps=6", "trainer.ckpt_every=2"), run_dir)  # space again: it resumes
    assert sorted(losses(run_dir)) == list(range(1, 7))


# one writer per run dir ------------------------------------------------------------------------------------
def test_a_locked_run_dir_is_refused_naming_the_holder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llmtrain.runlock import RunLock

    run_dir = tmp_path / "run"
    with RunLock(run_dir) as lock:
        lock.acquire()
        with pytest.raises(SystemExit) as ei:
            run(_cfg(run_dir, "trainer.max_steps=2"), run_dir)
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(err) == 1 and f"is in use by pid {os.getpid()}" in err[0], err
    assert not (run_dir / "metrics.jsonl").exists()
    run(_cfg(run_dir, "trainer.max_steps=2"), run_dir)  # released: it trains
    assert not (run_dir / ".lock").exists()


def test_a_stale_lock_is_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 999999, "started": 0, "command": "x"}))
    run(_cfg(run_dir, "trainer.max_steps=2"), run_dir)
    assert "took over the lock of pid 999999 on elsewhere" in capsys.readouterr().err
    assert sorted(losses(run_dir)) == [1, 2]


# another world size ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 3), (4, 2)])
def test_the_data_position_carries_over_to_another_world_size(before: int, after: int) -> None:
    """k global batches on `before` ranks, the rest of the epoch on `after` ranks: every item of the epoch
    exactly once (the dropped tail aside)."""
    from llmtrain.data.base import ShardedSampler

    n, b = 103, 4
    old = [ShardedSampler(n, b, seed=5, shuffle=True, rank=r, world_size=before) for r in range(before)]
    seen = [i for _ in range(5) for s in old for i in s.next_indices()]
    state = old[0].state_dict()
    new = [ShardedSampler(n, b, seed=5, shuffle=True, rank=r, world_size=after) for r in range(after)]
    for s in new:
        s.load_state_dict(state)
    while new[0].pos + b * after <= n:
        seen += [i for s in new for i in s.next_indices()]
    assert len(seen) == len(set(seen)) and len(seen) > n - b * max(before, after)
    assert set(seen) <= set(range(n))


# damaged prepared data -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "edited"])
def test_damaged_prepared_data_is_found_at_start(tmp_path: Path, damage: str) -> None:
    from llmtrain.data.base import build_data
    from llmtrain.errors import ConfigError

    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    out = tmp_path / "prepared"
    cfg = _cfg(tmp_path / "r", f"data.source={corpus}", f"data.out_dir={out}").data
    build_data(cfg)
    shard = out / "train_000.bin"
    if damage == "truncated":
        os.truncate(shard, shard.stat().st_size - 2)
    else:
        _flip(shard)
    direct = _cfg(tmp_path / "r", f"data.source={out}").data  # a prepared dir given as data.source
    with pytest.raises(ConfigError, match="is damaged: train_000.bin") as ei:
        build_data(direct)
    assert "\n" not in str(ei.value)
    build_data(cfg)  # the raw source: prepared again (with a warning), then it loads
    build_data(direct)
