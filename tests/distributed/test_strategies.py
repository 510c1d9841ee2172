"""Single / DDP / FSDP2 over 2 CPU processes (gloo): loss parity, mixed precision, exact resume, export.

Runs are launched through the CLI (torchrun) once per module and shared by the tests that read them.
The reference is one process with the same global batch: micro 8 there, micro 4 × 2 ranks here.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    PY,
    REPO,
    SAMPLING,
    TINY_LM,
    base_env,
    fork_cli,
    free_port,
    losses,
    read_metrics,
    run_cmd,
    samples,
    train_cli,
)

pytestmark = pytest.mark.distributed

STEPS = 20
CKPT_AT = 10  # resume tests restart from this checkpoint
COMMON = [*TINY_LM, f"trainer.max_steps={STEPS}", "trainer.eval_every=0", f"trainer.ckpt_every={CKPT_AT}",
          "trainer.keep_checkpoints=100", *SAMPLING]
FP32_RTOL = 1e-5  # fp32: ranks and accumulation only reorder float sums
# Mixed precision is compared with the fp32 reference, not with itself: single-process autocast and FSDP's
# MixedPrecisionPolicy cast differently, so only closeness to the fp32 trajectory is meaningful. Observed
# over 20 steps: bf16 ≤ 4e-4 (FSDP) / 6e-5 (DDP), fp16 ≤ 3e-5 relative; 5e-3 leaves >10x room.
MIXED_RTOL = 5e-3

# name -> (overrides, nproc)
RUNS: dict[str, tuple[list[str], int]] = {
    "single": (["trainer.micro_batch_size=8"], 1),
    "single_accum": (["trainer.micro_batch_size=8", "trainer.grad_accum_steps=2"], 1),
    "ddp": (["strategy=ddp"], 2),
    "fsdp": (["strategy=fsdp"], 2),
    "ddp_accum": (["strategy=ddp", "trainer.grad_accum_steps=2"], 2),
    # accumulation and activation checkpointing together (each alone is a subset of this path)
    "fsdp_accum_ckpt": (["strategy=fsdp", "trainer.grad_accum_steps=2", "trainer.gradient_checkpointing=true"], 2),
    "fsdp_1proc": (["strategy=fsdp", "trainer.micro_batch_size=8"], 1),
    "ddp_bf16": (["strategy=ddp", "trainer.precision=bf16"], 2),
    "fsdp_bf16": (["strategy=fsdp", "trainer.precision=bf16"], 2),
    "ddp_fp16": (["strategy=ddp", "trainer.precision=fp16"], 2),
    "fsdp_fp16": (["strategy=fsdp", "trainer.precision=fp16"], 2),
    # prompt/completion rows padded per batch: each rank's micro-batch holds another number of targets
    "single_padded_sgd": (["trainer.micro_batch_size=4"], 1),
    "ddp_padded_sgd": (["strategy=ddp", "trainer.micro_batch_size=2"], 2),
}
PADDED = ["data=instruct", f"data.source={REPO / 'examples' / 'stdlib_modules.jsonl'}", "data.tokenizer=byte",
          "data.seq_len=80", "model.n_positions=96", "optim=sgd", "optim.lr=0.5", "trainer.grad_clip=0"]


def _args(name: str) -> list[str]:
    overrides = RUNS[name][0]
    if "padded" in name:  # no text-corpus keys: the data is prompt/completion JSONL
        return [*(a for a in COMMON if not a.startswith("data.")), *PADDED, *overrides]
    return [*COMMON, *overrides]


class Runs:
    """Each named run is trained on first use and kept for the module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, Path] = {}

    def __call__(self, name: str) -> Path:
        if name not in self.done:
            nproc = RUNS[name][1]
            run_dir = self.root / name
            env = {**base_env(), "LLMTRAIN_COUNT_COMM": "1"}  # bytes handed to collectives, for llmtrain-plan
            train_cli(_args(name), run_dir, nproc=nproc, timeout=180, env=env)
            self.done[name] = run_dir
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("strategies"))


def _max_rel(a: dict[int, float], b: dict[int, float]) -> float:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


# parity ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "ref"), [
    ("ddp", "single"), ("fsdp", "single"), ("ddp_accum", "single_accum"),
    ("fsdp_accum_ckpt", "single_accum"), ("fsdp_1proc", "single"),
])
def test_fp32_loss_parity(runs: Runs, name: str, ref: str) -> None:
    """Same seed and global batch: the first 20 losses match one process to 1e-5 relative."""
    err = _max_rel(losses(runs(name)), losses(runs(ref)))
    print(f"\n{name} vs {ref}: max relative loss difference {err:.2e}")
    assert err <= FP32_RTOL, f"{name} drifts from {ref}: {err:.2e}"


def test_loss_is_normalised_by_the_global_count_over_uneven_ranks(runs: Runs) -> None:
    """Plain SGD, no clipping: the update is the gradient itself, so normalising by a rank's own target count
    instead of the global one would change it. The ranks' micro-batches hold different numbers of targets
    (padded prompt/completion rows), and 2 processes still match 1 with the same global batch."""
    from helpers import compose

    from llmtrain.data.base import build_data

    cfg = compose(_args("ddp_padded_sgd"))
    data = build_data(cfg.data)
    loaders = [data.loader("train", 2, seed=cfg.trainer.seed, shuffle=True, rank=r, world_size=2,
                           device=torch.device("cpu")) for r in range(2)]
    counts = [[int((next(ld)["labels"] != -100).sum()) for _ in range(STEPS)] for ld in loaders]
    assert sum(a != b for a, b in zip(*counts, strict=True)) > STEPS // 2, counts  # uneven, step after step
    err = _max_rel(losses(runs("ddp_padded_sgd")), losses(runs("single_padded_sgd")))
    print(f"\nddp vs single, padded rows and SGD: max relative loss difference {err:.2e}")
    assert err <= FP32_RTOL


@pytest.mark.parametrize(("name", "ref"), [("ddp", "single"), ("fsdp", "single"),
                                         ("fsdp_accum_ckpt", "single_accum")])
def test_samples_during_training_match_one_process(runs: Runs, name: str, ref: str) -> None:
    """trainer.sample_every under DDP and FSDP (sharded weights gathered for rank 0): the greedy samples at
    steps 10 and 20 are those of one process, and only rank 0 wrote them."""
    got = samples(runs(name))
    assert [s for s, _ in got] == [10, 10, 20, 20] and got == samples(runs(ref))


@pytest.mark.parametrize("name", ["ddp_bf16", "fsdp_bf16", "ddp_fp16", "fsdp_fp16"])
def test_mixed_precision_tracks_fp32(runs: Runs, name: str) -> None:
    """bf16/fp16 run, stay finite and follow the fp32 trajectory loosely; fp16 reports its loss scale."""
    run_dir = runs(name)
    got = losses(run_dir)
    assert all(math.isfinite(v) for v in got.values())
    err = _max_rel(got, losses(runs("single")))
    print(f"\n{name} vs fp32 single: max relative loss difference {err:.2e}")
    assert err <= MIXED_RTOL
    if name.endswith("fp16"):
        recs = [r for r in read_metrics(run_dir) if "loss" in r]
        assert all(r["loss_scale"] > 0 for r in recs)
        assert sum(r["skipped"] for r in recs) < STEPS // 2  # overflow skips are rare, not the norm


def _run_dir_at(full: Path, step: int, dest: Path) -> tuple[Path, str]:
    """A new run dir holding only `full`'s config and its checkpoint of `step`."""
    ck = f"checkpoints/step_{step:08d}"
    shutil.copytree(full / ck, dest / ck)
    shutil.copy(full / "config.yaml", dest / "config.yaml")
    return dest, ck


@pytest.mark.parametrize("name", ["ddp", "ddp_accum", "fsdp", "fsdp_accum_ckpt"])
def test_planned_communication_matches_the_counted_bytes(runs: Runs, name: str) -> None:
    """llmtrain-plan's bytes per optimizer step (gradient all-reduce; FSDP's all-gathers and reduce-scatter)
    against the bytes each rank handed to collectives in the run (the small loss and count reductions aside)."""
    import json

    from helpers import compose

    from llmtrain.plan import communication, shape_of

    counted = json.loads((runs(name) / "comm_rank0.json").read_text())
    per_step = {k: v / counted["steps"] for k, v in counted["bytes"].items()}
    s = shape_of(compose(_args(name)), device="cpu")
    planned, _ = communication(s, RUNS[name][0][0].split("=")[1], 2)
    for kind, want in planned.items():
        got = per_step.get(kind, 0.0)
        print(f"\n{name} {kind}: planned {want / 1e3:.1f} kB/step, counted {got / 1e3:.1f} kB/step")
        assert got == pytest.approx(want, rel=0.1), (kind, got, want)


# resume ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_exact_resume(runs: Runs, name: str, tmp_path: Path) -> None:
    """Restarting from the step-10 checkpoint reproduces steps 11..20 bit for bit."""
    full = runs(name)
    fresh, ck = _run_dir_at(full, CKPT_AT, tmp_path / "resumed")
    nproc = RUNS[name][1]
    res = train_cli([*_args(name), "trainer.resume=auto"], fresh, nproc=nproc, timeout=180)
    assert f"resuming from {fresh / ck} at step {CKPT_AT}" in res.stdout
    want = {k: v for k, v in losses(full).items() if k > CKPT_AT}
    got = {k: v for k, v in losses(fresh).items() if k > CKPT_AT}
    assert got == want


# export ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_export_cli_matches_final(runs: Runs, name: str, tmp_path: Path) -> None:
    """llmtrain-export on the last checkpoint (one process) rebuilds the in-training final/ exactly."""
    from transformers import GPT2LMHeadModel

    full = runs(name)
    out, _ = _run_dir_at(full, STEPS, tmp_path / "exported")
    res = fork_cli("llmtrain.export", [str(out)], timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]

    trained = GPT2LMHeadModel.from_pretrained(full / "final").eval()
    exported = GPT2LMHeadModel.from_pretrained(out / "final").eval()
    assert exported.lm_head.weight.data_ptr() == exported.transformer.wte.weight.data_ptr()  # still tied
    a, b = trained.state_dict(), exported.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, trained.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la = trained(input_ids=ids, labels=ids).loss
        lb = exported(input_ids=ids, labels=ids).loss
    assert torch.equal(la, lb)


# launch scripts ------------------------------------------------------------------------------------------
def _fake_slurm(bin_dir: Path) -> dict[str, str]:
    """`srun` that runs its command here (dropping its own flags) and `scontrol` naming this host."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {bin_dir}/scontrol.log\necho 127.0.0.1\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "2",
            "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_ID": "4242", "MASTER_PORT": str(free_port()),
            "LLMTRAIN_REPO": str(REPO)}


@pytest.mark.parametrize("script", ["torchrun.sh", "accelerate.sh", "slurm.sbatch"])
def test_launch_script_reproduces_ddp(runs: Runs, script: str, tmp_path: Path) -> None:
    """launch/<script> with 2 CPU processes trains the same first steps as the torchrun DDP run, bit for bit.

    SLURM itself is not here: fake `srun`/`scontrol` run the template's torchrun rendezvous on this host.
    """
    env = base_env()
    env.update(PYTHON=PY, NPROC_PER_NODE="2", ACCELERATE=str(Path(PY).parent / "accelerate"))
    if script == "slurm.sbatch":
        env.update(_fake_slurm(tmp_path / "bin"))
    run_dir = tmp_path / "run"
    overrides = [a for a in COMMON if not a.startswith("trainer.max_steps=")]
    res = run_cmd(["bash", str(REPO / "launch" / script), *overrides, *RUNS["ddp"][0], "trainer.device=cpu",
                   "trainer.max_steps=5", f"hydra.run.dir={run_dir}"], timeout=180, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "strategy ddp × 2" in res.stdout
    for noise in ("Setting OMP_NUM_THREADS", "were not passed", "Warning", "Traceback"):  # launcher chatter
        assert noise not in res.stdout + res.stderr, res.stdout[-3000:] + res.stderr[-3000:]
    if script == "slurm.sbatch":
        assert "1 node(s) × 2 process(es), rendezvous 127.0.0.1:" in res.stdout
    ref = losses(runs("ddp"))
    got = losses(run_dir)
    assert got == {k: ref[k] for k in range(1, 6)}


def test_slurm_template_checkpoints_and_requeues_on_its_warning_signal(tmp_path: Path) -> None:
    """SLURM's USR1 before the time limit (--signal=B:USR1@180) reaches the batch script: its job step gets
    SIGTERM, both ranks finish the step and write one checkpoint, and the script requeues the job."""
    import signal
    import subprocess
    import time

    from helpers import kill_tree

    env = base_env()
    env.update(PYTHON=PY, **_fake_slurm(tmp_path / "bin"))
    run_dir = tmp_path / "run"
    args = [*COMMON, *RUNS["ddp"][0], "trainer.device=cpu", "trainer.max_steps=100000", "trainer.sample_tokens=0",
            f"hydra.run.dir={run_dir}"]
    log = open(tmp_path / "job.log", "w")  # noqa: SIM115  (a file, not a pipe that could fill and stall)
    proc = subprocess.Popen(["bash", str(REPO / "launch" / "slurm.sbatch"), *args], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    log.close()
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() or len(losses(run_dir)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=60)
    finally:
        kill_tree(proc)
    out = (tmp_path / "job.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "requeue 4242" in (tmp_path / "bin" / "scontrol.log").read_text(), out[-3000:]
    step = max(losses(run_dir))
    assert f"llmtrain: preempted at step {step} of 100000" in out, out[-3000:]
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / "manifest.json").is_file()
