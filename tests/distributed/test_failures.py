"""A rank that dies or stalls ends the whole 2-process job with an error, in bounded time (no hang).

The test itself signals rank 1's process (found under the launcher, by its RANK, in /proc) at step 2:
no fault-injection code lives in the trainer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import PY, TINY_LM, base_env, descendants, free_port, kill_tree

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")]

TIMEOUT_S = 5  # strategy.timeout_s: how long a collective waits for a silent peer


def _launch(run_dir: Path, strategy: str) -> subprocess.Popen:
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", f"--master_port={free_port()}",
           "--max_restarts=0", "-m", "llmtrain.train", *TINY_LM, f"strategy={strategy}",
           f"strategy.timeout_s={TIMEOUT_S}", "trainer.max_steps=100000", "trainer.eval_every=0",
           "trainer.ckpt_every=0", f"hydra.run.dir={run_dir}"]
    run_dir.mkdir(parents=True)
    log = open(run_dir.parent / "job.log", "w")  # a file, not a pipe: a full pipe would stall rank 0
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=base_env(), start_new_session=True)
    finally:
        log.close()


def _log(run_dir: Path) -> str:
    return (run_dir.parent / "job.log").read_text()[-3000:]


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The worker under this launcher whose environment says RANK=rank."""
    for pid in descendants(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in env):
            return pid
    return None


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"job ended early:\n{_log(run_dir)}"
        if metrics.is_file():
            steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines() if x.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.2)
    kill_tree(proc)
    raise AssertionError(f"training did not reach step {step} in {timeout}s")


def _wait_exit(proc: subprocess.Popen, run_dir: Path, timeout: float) -> tuple[int, float]:
    t0 = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        proc.wait()
        raise AssertionError(f"job still running {timeout}s after the fault (hang):\n{_log(run_dir)}") from None
    return proc.returncode, time.monotonic() - t0


def _alive(pid: int) -> bool:
    """True while pid runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _assert_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"worker processes left behind: {left}"


def test_killed_rank_fails_the_job(tmp_path: Path) -> None:
    """SIGKILL rank 1 (FSDP) after step 2: the launcher stops rank 0 and exits non-zero within seconds."""
    proc = _launch(tmp_path / "run", "fsdp")
    _wait_for_step(proc, tmp_path / "run", 2)
    workers = descendants(proc.pid)
    pid = _rank_pid(proc.pid, 1)
    assert pid is not None, "rank 1 not found"
    os.kill(pid, signal.SIGKILL)
    code, took = _wait_exit(proc, tmp_path / "run", timeout=60)
    assert code != 0, _log(tmp_path / "run")
    print(f"\nfsdp: job exited {code} {took:.1f}s after rank 1 was killed")
    _assert_gone(workers)


def test_stalled_rank_times_out(tmp_path: Path) -> None:
    """SIGSTOP rank 1 (DDP): rank 0's next collective fails after strategy.timeout_s instead of waiting forever.

    The launcher then asks the stalled rank to stop (SIGTERM, which a stopped process only sees once
    continued), so the test continues it after rank 0 is gone and checks the job's non-zero exit.
    """
    proc = _launch(tmp_path / "run", "ddp")
    _wait_for_step(proc, tmp_path / "run", 2)
    workers = descendants(proc.pid)
    rank0, rank1 = _rank_pid(proc.pid, 0), _rank_pid(proc.pid, 1)
    assert rank0 is not None and rank1 is not None
    os.kill(rank1, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        while _alive(rank0) and time.monotonic() - t0 < TIMEOUT_S + 60:
            time.sleep(0.2)
        rank0_gone = time.monotonic() - t0
        assert not _alive(rank0), f"rank 0 still waiting {rank0_gone:.0f}s after its peer stalled"
    finally:
        os.kill(rank1, signal.SIGCONT)
    code, _ = _wait_exit(proc, tmp_path / "run", timeout=60)
    assert code != 0, _log(tmp_path / "run")
    full_log = (tmp_path / "job.log").read_text().lower()  # the whole log: tracebacks push it out of the tail
    assert "timed out" in full_log or "timeout" in full_log, _log(tmp_path / "run")
    print(f"\nrank 0 gave up {rank0_gone:.1f}s after its peer stalled (timeout_s={TIMEOUT_S})")
    assert rank0_gone >= TIMEOUT_S - 1
    _assert_gone(workers)


def test_one_writer_per_run_dir_and_no_orphans(tmp_path: Path) -> None:
    """While a job trains, the same command is refused with one line naming the holder. kill -9 of the
    launcher (torchrun) alone: its workers, each in a session of its own, exit within seconds instead of
    training on; the next job can train in the dir."""
    from helpers import losses, train_cli

    run_dir = tmp_path / "run"
    proc = _launch(run_dir, "ddp")
    _wait_for_step(proc, run_dir, 2)
    workers = descendants(proc.pid)
    second = train_cli([*TINY_LM, "strategy=ddp", "trainer.max_steps=4"], run_dir, check=False, timeout=120)
    err = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert second.returncode == 2 and len(err) == 1, second.stderr[-3000:]
    holder = _rank_pid(proc.pid, 0)
    assert f"is in use by pid {holder} on " in err[0], err
    os.kill(proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    _assert_gone(workers)
    print(f"\nworkers gone {time.monotonic() - t0:.1f}s after their launcher was killed")
    proc.wait()
    train_cli([*TINY_LM, "strategy=ddp", "trainer.max_steps=4", "trainer.eval_every=0"], run_dir,
              nproc=2, timeout=120)
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]  # the dir is free again (a lock left behind is taken over)


def test_a_refusal_at_start_is_one_line_on_two_ranks(tmp_path: Path) -> None:
    """Rank 0 refuses the run dir (a file no export wrote sits in its final/) and every rank learns why: one
    line for the job, exit 2, no traceback from the other rank, nothing of the user's touched."""
    from helpers import train_cli

    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "final" / "notes.txt").write_text("mine")
    res = train_cli([*TINY_LM, "strategy=ddp", "trainer.max_steps=2"], run_dir, nproc=2, check=False, timeout=120)
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(err) == 1 and "notes.txt" in err[0], res.stderr[-3000:]
    assert (run_dir / "final" / "notes.txt").read_text() == "mine" and not (run_dir / "config.yaml").exists()
