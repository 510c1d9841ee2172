"""kill -9 at seeded random points under every strategy, then resume: bit-identical to the uninterrupted run
(tests/fault_harness.py, which also runs alone for hundreds of kills); preemption of one rank of two;
resuming on another world size; the run-dir lock against a second job; workers outliving their launcher."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from fault_harness import STATE_POINTS, STRATEGIES, args_for, reference, run_chain, same_run
from helpers import base_env, losses, train_cli

pytestmark = pytest.mark.distributed

# 20 kill points in all: more where a run is cheap. The random ones are inside training, checkpoints and
# exports (a write point, visited at every step, would take most of them); TORN kills inside each write: a
# metrics.jsonl line of step 6 (the 7th record; checkpoint 4 is the newest), between run.json's temp file and
# its rename, the samples.jsonl line of step 5
KILLS = {"single": 3, "ddp": 4, "fsdp": 4, "zero2": 3, "zero3": 3}
TORN = ("kill:metrics:7", "kill:record:1", "kill:samples:1")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_killed_anywhere_then_resumed_is_bit_identical(root: Path, strategy: str) -> None:
    chain = run_chain(strategy, root, random.Random(f"ci-{strategy}"), KILLS[strategy], points=STATE_POINTS)
    print(f"\n{strategy}: {chain.killed} kills {chain.faults} in {chain.seconds:.0f}s")
    assert chain.killed == KILLS[strategy], chain  # every chosen point was reached and killed the job
    assert chain.identical, chain


@pytest.mark.parametrize("seed", [0, 1])
def test_a_preemption_signal_on_one_rank_stops_both_after_the_same_step(root: Path, tmp_path: Path,
                                                                        seed: int) -> None:
    """SIGTERM or SIGUSR1 to one rank at a random step (a preempted node): both ranks finish that step, one
    checkpoint is written, exit 0; the rerun reproduces the uninterrupted run bit for bit."""
    rng = random.Random(seed)
    sig, rank, at = rng.choice(["term", "usr1"]), rng.randrange(2), rng.randint(1, 7)
    args, nproc = args_for("ddp", root)
    ref = reference("ddp", root)
    run_dir = tmp_path / "run"
    env = base_env()
    env["LLMTRAIN_FAULT"] = f"{sig}:step:{at}:{rank}"
    t0 = time.monotonic()
    res = train_cli(args, run_dir, nproc=nproc, env=env, timeout=180, check=False)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count(f"llmtrain: preempted at step {at} of") == 1, res.stderr[-3000:]
    assert max(losses(run_dir)) == at and (run_dir / "checkpoints" / f"step_{at:08d}").is_dir()
    print(f"\n{sig} to rank {rank} inside step {at}: both ranks stopped after it; the job took {took:.1f}s")
    train_cli(args, run_dir, nproc=nproc, timeout=180)
    assert losses(run_dir) == losses(ref)


def test_a_kill_inside_an_append_or_a_run_record_write_then_resumed_is_bit_identical(root: Path,
                                                                                    tmp_path: Path) -> None:
    """kill -9 halfway through a metrics.jsonl line, between run.json's temp file and its rename, halfway
    through a samples.jsonl line: the rerun that appends next drops the torn line with one warning (no
    traceback), the stray temp file goes, and the finished run is the uninterrupted one bit for bit."""
    args, nproc = args_for("single", root)
    ref = reference("single", root)
    run_dir = tmp_path / "run"
    err = ""
    for fault in TORN:
        env = base_env()
        env["LLMTRAIN_FAULT"] = fault
        res = train_cli(args, run_dir, nproc=nproc, env=env, timeout=180, check=False)
        assert res.returncode != 0, f"{fault} was not reached"
        err += res.stderr
        if fault.startswith("kill:record"):
            assert list(run_dir.glob(".run.json.tmp*")) and (run_dir / "run.json").is_file()
        else:
            torn = run_dir / ("metrics.jsonl" if "metrics" in fault else "samples.jsonl")
            assert not torn.read_bytes().endswith(b"\n"), f"{fault} left no torn line"
    err += train_cli(args, run_dir, nproc=nproc, timeout=180).stderr
    warned = [ln for ln in err.splitlines() if ln.startswith("llmtrain: warning:")]
    assert [w.split(": ")[2].rsplit("/", 1)[-1] for w in warned] == ["metrics.jsonl", "samples.jsonl"], warned
    assert all("dropped 1 unreadable line" in w for w in warned) and "Traceback" not in err, err[-3000:]
    assert not list(run_dir.glob(".run.json.tmp*"))
    assert same_run(ref, run_dir)
