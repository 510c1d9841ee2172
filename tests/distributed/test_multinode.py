"""Two "nodes" on this host: launch/torchrun.sh run twice (NNODES=2, two CPU processes each) meet at a c10d
rendezvous on 127.0.0.1 and train the tiny Llama with FSDP × tensor parallelism over gloo: tp 2 within each node
(consecutive ranks), FSDP's dp 2 across the nodes.

The two-node run trains the losses of one process with the same global batch, and a kill -9 of one rank of the
4-process job after a checkpoint fails the whole job in bounded time; the same command on both nodes then
resumes it, bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import PY, REPO, base_env, descendants, free_port, kill_tree, losses, max_rel, train_cli
from test_llama_strategies import TINY_LLAMA

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")]

STEPS, CKPT_EVERY = 12, 3
COMMON = [*TINY_LLAMA, f"trainer.max_steps={STEPS}", f"trainer.ckpt_every={CKPT_EVERY}", "logger.log_every=1"]
NODE = [*COMMON, "strategy=fsdp", "strategy.tp=2", "trainer.device=cpu",  # 2 nodes × 2 processes: dp 2 × tp 2
        "trainer.micro_batch_size=4"]
SINGLE = [*COMMON, "trainer.micro_batch_size=8"]  # the same global batch in one process
RTOL = 1e-6
RUN_TIMEOUT = 120  # seconds for a whole two-node job (about 20 s here)
FAIL_TIMEOUT = 60  # seconds for the surviving node to give up after its peer died


class Job:
    """Both agents of one two-node job: `bash launch/torchrun.sh` twice, each in a session of its own, logs in
    files (a full pipe would stall a rank). Every process seen under an agent is remembered, so that `close`
    can SIGKILL workers whose agent has already gone."""

    def __init__(self, run_dir: Path, overrides: list[str], name: str) -> None:
        env = base_env()
        env.update(PYTHON=PY, NNODES="2", NPROC_PER_NODE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
        self.logs = [run_dir.parent / f"{name}-node{i}.log" for i in range(2)]
        self.agents: list[subprocess.Popen] = []
        self.seen: set[int] = set()
        cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), *overrides, f"hydra.run.dir={run_dir}"]
        for i, log_path in enumerate(self.logs):
            with open(log_path, "w") as log:
                # NODE_RANK is accepted and ignored: the rendezvous assigns the node ranks
                self.agents.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO),
                                                    env={**env, "NODE_RANK": str(i)}, start_new_session=True))

    def log(self) -> str:
        return "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}\n" for p in self.logs)

    def remember(self) -> None:
        for a in self.agents:
            self.seen.update(descendants(a.pid))

    def worker(self, node: int) -> int | None:
        """The training process under this node's agent (torchrun's worker, in a session of its own)."""
        for pid in descendants(self.agents[node].pid):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"LOCAL_RANK=0" in env and any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in env):
                return pid
        return None

    def wait(self, timeout: float) -> list[int]:
        """Both agents' exit codes; a node still running after `timeout` seconds is a hang: fail."""
        deadline = time.monotonic() + timeout
        while any(a.poll() is None for a in self.agents):
            self.remember()
            if time.monotonic() > deadline:
                raise AssertionError(f"two-node job still running after {timeout:.0f}s (hang):\n{self.log()}")
            time.sleep(0.1)
        return [a.returncode for a in self.agents]

    def close(self) -> None:
        self.remember()
        for a in self.agents:
            kill_tree(a, grace=5)
        for pid in self.seen:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for a in self.agents:
            a.wait()


def two_nodes(run_dir: Path, name: str) -> str:
    """Run the two-node job to the end (logs `name`-node*.log); its output."""
    job = Job(run_dir, NODE, name)
    try:
        codes = job.wait(RUN_TIMEOUT)
        assert codes == [0, 0], f"exit codes {codes}\n{job.log()}"
        return job.log()
    finally:
        job.close()


def _alive(pid: int) -> bool:
    """True while pid runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _max_rel(a: dict[int, float], b: dict[int, float]) -> float:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), (sorted(a), sorted(b))
    return max_rel(a, b)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("multinode")


@pytest.fixture(scope="module")
def uninterrupted(root: Path) -> Path:
    run_dir = root / "two-nodes"
    out = two_nodes(run_dir, "two-nodes")
    assert "strategy fsdp × 4 (dp 2 × tp 2)" in out, out
    return run_dir


def test_two_nodes_train_the_losses_of_one_process(root: Path, uninterrupted: Path) -> None:
    """NNODES=2 × 2 processes through the c10d rendezvous, fsdp dp 2 × tp 2: every step's loss equals one
    process with the same global batch (micro 8 there, micro 4 per tensor-parallel pair here) to 1e-6 relative."""
    single = root / "single"
    train_cli(SINGLE, single, timeout=120)
    err = _max_rel(losses(uninterrupted), losses(single))
    print(f"\ntwo nodes × 2 processes (fsdp dp 2 × tp 2) vs one process: max relative loss difference {err:.2e}")
    assert err <= RTOL, f"two-node run drifts from one process: {err:.2e}"


def test_a_killed_node_fails_the_job_and_the_relaunch_resumes_bit_for_bit(root: Path, uninterrupted: Path) -> None:
    """kill -9 of one rank (node 1's first) once a checkpoint is complete: node 1's agent and node 0's
    (its peer gone) exit non-zero within FAIL_TIMEOUT, nothing is left running; the same command on both
    nodes resumes from the newest checkpoint and every loss equals the uninterrupted run's exactly."""
    from llmtrain import checkpoint as ckpt

    run_dir = root / "killed"
    job = Job(run_dir, NODE, "killed")
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (run_dir.is_dir() and ckpt.list_checkpoints(run_dir)):
            job.remember()
            assert all(a.poll() is None for a in job.agents), f"a node ended before a checkpoint:\n{job.log()}"
            assert time.monotonic() < deadline, f"no checkpoint after {RUN_TIMEOUT}s:\n{job.log()}"
            time.sleep(0.02)
        victim = job.worker(1)
        assert victim is not None, f"node 1's training process not found:\n{job.log()}"
        job.remember()
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        codes = job.wait(FAIL_TIMEOUT)
        took = time.monotonic() - t0
        grace = time.monotonic() + 5  # the agents are gone: so must every worker be, before close() kills any
        while any(_alive(p) for p in job.seen) and time.monotonic() < grace:
            time.sleep(0.1)
        left = [p for p in job.seen if _alive(p)]
    finally:
        job.close()
    assert codes[0] != 0 and codes[1] != 0, f"exit codes {codes} after a node's kill -9\n{job.log()}"
    assert not left, f"processes left behind by the failed job: {left}\n{job.log()}"
    killed_at = max(losses(run_dir))
    assert killed_at < STEPS, f"the run finished (step {killed_at}) before the kill: nothing was interrupted"
    resume_at = ckpt.step_of(ckpt.list_checkpoints(run_dir)[-1])
    print(f"\nnode 1 killed at step {killed_at} (newest checkpoint {resume_at}): both agents exited {codes} "
          f"{took:.1f}s later")

    out = two_nodes(run_dir, "relaunched")
    assert f"resuming from {run_dir / 'checkpoints' / f'step_{resume_at:08d}'} at step {resume_at}" in out, out
    got, want = losses(run_dir), losses(uninterrupted)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert {k: v for k, v in got.items() if k > resume_at} == {k: v for k, v in want.items() if k > resume_at}
    assert got == want
