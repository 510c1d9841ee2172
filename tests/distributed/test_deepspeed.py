"""DeepSpeed ZeRO 1/2/3 on CPU (2 processes, gloo): parity with one process, exact resume, export,
offload, bf16/fp16, the `deepspeed` launcher and the lr reaching DeepSpeed's optimizer.

Runs are shared through module-scoped fixtures: each 2-process run costs ~10-20 s on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import textwrap
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
    losses,
    read_metrics,
    run_cmd,
    samples,
    train_cli,
)

STEPS = 20
CKPT = 10
PARITY_RTOL = 1e-6  # measured: <= 1.7e-7 for every stage, with and without accumulation
REF = TINY_LM + [f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=8", *SAMPLING]  # 1 process, global batch 8
DS = TINY_LM + [f"trainer.max_steps={STEPS}", "strategy=deepspeed", f"trainer.ckpt_every={CKPT}",
                "trainer.keep_checkpoints=10", *SAMPLING]  # 2 processes x micro-batch 4


def _accum(stage: int) -> tuple[str, ...]:
    """Overrides of the accumulation runs; ZeRO-3's also checkpoints activations (exported below)."""
    return ("trainer.grad_accum_steps=2",) + (("trainer.gradient_checkpointing=true",) if stage == 3 else ())


def _rel(a: dict[int, float], b: dict[int, float]) -> float:
    assert sorted(a) == sorted(b)
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in b)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deepspeed")


@pytest.fixture(scope="module")
def zero3_json(root: Path) -> Path:
    """Partition every ZeRO-3 parameter (the tiny model's tensors are below DeepSpeed's default threshold)."""
    path = root / "zero3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    return path


class Runs:
    """Launches each distinct run once per module; later requests reuse its run dir."""

    def __init__(self, root: Path, zero3_json: Path) -> None:
        self.root, self.zero3_json, self.done = root, zero3_json, {}

    def single(self, gas: int = 1) -> Path:
        return self._run(f"single_gas{gas}", REF + [f"trainer.grad_accum_steps={gas}"], nproc=1)

    def zero(self, stage: int, *extra: str) -> Path:
        name = "_".join([f"zero{stage}", *(e.replace("=", "-").replace(".", "-") for e in extra)])
        return self._run(name, self.zero_args(stage, *extra), nproc=2)

    def zero_args(self, stage: int, *extra: str) -> list[str]:
        args = DS + [f"strategy.zero_stage={stage}", *extra]
        if stage == 3:
            args.append(f"strategy.deepspeed_config={self.zero3_json}")
        return args

    def _run(self, name: str, args: list[str], nproc: int) -> Path:
        if name not in self.done:
            run_dir = self.root / name
            env = {**base_env(), "LLMTRAIN_COUNT_COMM": "1"}  # bytes handed to collectives, for llmtrain-plan
            train_cli(args, run_dir, nproc=nproc, timeout=300, env=env)
            self.done[name] = run_dir
        return self.done[name]


@pytest.fixture(scope="module")
def runs(root: Path, zero3_json: Path) -> Runs:
    return Runs(root, zero3_json)


# parity with one process ---------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("gas", [1, 2])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_loss_parity_with_single_process(runs: Runs, stage: int, gas: int) -> None:
    """First 20 losses of ZeRO-`stage` on 2 processes equal one process with the same global batch (fp32)."""
    ds = losses(runs.zero(stage) if gas == 1 else runs.zero(stage, *_accum(stage)))
    ref = losses(runs.single(gas))
    assert len(ds) == STEPS
    assert _rel(ds, ref) <= PARITY_RTOL
    norms = [r["grad_norm"] for r in read_metrics(runs.zero(stage)) if "grad_norm" in r]
    assert norms and all(math.isfinite(n) and n > 0 for n in norms)  # the engine's global norm is reported
    if stage == 3:  # samples during training: ZeRO-3's partitioned weights gathered for rank 0's greedy samples
        got = samples(runs.zero(stage) if gas == 1 else runs.zero(stage, *_accum(stage)))
        assert [s for s, _ in got] == [10, 10, 20, 20] and got == samples(runs.single(gas))


@pytest.mark.distributed
@pytest.mark.parametrize("gas", [1, 2])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_planned_communication_matches_the_counted_bytes(runs: Runs, stage: int, gas: int) -> None:
    """llmtrain-plan's bytes per optimizer step under ZeRO-`stage` (gradient reduce-scatter, parameter
    all-gather) against the bytes each rank handed to collectives."""
    from helpers import compose

    from llmtrain.plan import communication, shape_of

    run_dir = runs.zero(stage) if gas == 1 else runs.zero(stage, *_accum(stage))
    counted = json.loads((run_dir / "comm_rank0.json").read_text())
    per_step = {k: v / counted["steps"] for k, v in counted["bytes"].items()}
    args = runs.zero_args(stage) if gas == 1 else runs.zero_args(stage, *_accum(stage))
    planned, _ = communication(shape_of(compose(args), device="cpu"), "deepspeed", 2, zero_stage=stage)
    print(f"\nZeRO-{stage} accum {gas}: planned {planned}, counted {per_step}")
    for kind, want in planned.items():
        assert per_step.get(kind, 0.0) == pytest.approx(want, rel=0.15), (kind, per_step, planned)


# exact resume -----------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_exact_resume(runs: Runs, root: Path, stage: int) -> None:
    """A fresh run dir holding only the step-10 checkpoint + config.yaml resumes bit-identically."""
    full = runs.zero(stage)
    fresh = root / f"resume_zero{stage}"
    shutil.rmtree(fresh, ignore_errors=True)
    (fresh / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "config.yaml", fresh / "config.yaml")
    src = full / "checkpoints" / f"step_{CKPT:08d}"
    assert (src / "deepspeed").is_dir() and len(list((src / "deepspeed").glob("*optim_states.pt"))) == 2
    shutil.copytree(src, fresh / "checkpoints" / src.name)
    res = train_cli(runs.zero_args(stage), fresh, nproc=2, timeout=300)
    assert f"resuming from {fresh}" in res.stdout and f"at step {CKPT}" in res.stdout
    before, after = losses(full), losses(fresh)
    assert sorted(after) == list(range(CKPT + 1, STEPS + 1))
    assert {k: before[k] for k in after} == after


@pytest.mark.distributed
def test_another_world_size_is_refused_with_the_way_out(runs: Runs, root: Path) -> None:
    """DeepSpeed's partitions load only on the world size that wrote them: one line naming what to do, exit 2,
    nothing written."""
    full = runs.zero(2)
    fresh = root / "resume_zero2_on_1"
    shutil.rmtree(fresh, ignore_errors=True)
    (fresh / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "config.yaml", fresh / "config.yaml")
    shutil.copytree(full / "checkpoints" / f"step_{CKPT:08d}", fresh / "checkpoints" / f"step_{CKPT:08d}")
    before = {p: p.read_bytes() for p in fresh.rglob("*") if p.is_file()}
    res = train_cli([*runs.zero_args(2), "trainer.micro_batch_size=8"], fresh, nproc=1, timeout=300, check=False)
    err = [ln for ln in res.stderr.splitlines() if ln.strip() and "warning" not in ln.lower()]
    assert res.returncode == 2 and len(err) == 1, res.stderr[-3000:]
    assert "written by 2 DeepSpeed processes" in err[0] and "llmtrain-export" in err[0], err
    assert {p: p.read_bytes() for p in fresh.rglob("*") if p.is_file()} == before


# export -------------------------------------------------------------------------------------------------
def _eval_loss(model_dir: Path) -> float:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.distributed
@pytest.mark.parametrize(("stage", "accum"), [(2, False), (3, True)])
def test_export_cli_consolidates_zero_checkpoint(runs: Runs, root: Path, stage: int, accum: bool) -> None:
    """`python -m llmtrain.export` on a ZeRO run (one process) gives the in-run final/ and the 1-process weights.

    The ZeRO-3 run accumulates and checkpoints activations (wrapped block names in DeepSpeed's files)."""
    from transformers import GPT2LMHeadModel

    trained = runs.zero(stage, *_accum(stage)) if accum else runs.zero(stage)
    reference = runs.single(2 if accum else 1)
    run = root / f"export_zero{stage}"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("final"))
    res = fork_cli("llmtrain.export", [str(run)], timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    exported = GPT2LMHeadModel.from_pretrained(str(run / "final")).state_dict()
    in_run = GPT2LMHeadModel.from_pretrained(str(trained / "final")).state_dict()
    single = GPT2LMHeadModel.from_pretrained(str(reference / "final")).state_dict()
    assert exported.keys() == in_run.keys() == single.keys()
    assert all(exported[k].dtype == torch.float32 for k in exported)
    assert all(torch.equal(exported[k], in_run[k]) for k in exported)  # same fp32 master weights
    assert max((exported[k] - single[k]).abs().max().item() for k in exported) < 1e-5
    assert torch.equal(exported["lm_head.weight"], exported["transformer.wte.weight"])
    assert _eval_loss(run / "final") == pytest.approx(_eval_loss(reference / "final"), rel=1e-5)
    evals = [[r["eval_loss"] for r in read_metrics(d) if "eval_loss" in r] for d in (run, reference)]
    assert evals[0][-1] == pytest.approx(evals[1][-1], rel=1e-5)


# offload ---------------------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize(("stage", "flag"), [(2, "strategy.offload_optimizer=true"),
                                             (3, "strategy.offload_params=true")])
def test_offload_matches_no_offload(runs: Runs, stage: int, flag: str) -> None:
    off, on_device = losses(runs.zero(stage, flag)), losses(runs.zero(stage))
    assert _rel(off, on_device) <= 1e-6


# mixed precision ---------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_bf16_tracks_fp32(runs: Runs) -> None:
    bf16, fp32 = losses(runs.zero(2, "trainer.precision=bf16")), losses(runs.zero(2))
    assert all(math.isfinite(v) for v in bf16.values())
    assert _rel(bf16, fp32) <= 2e-2  # measured ~4e-4
    assert bf16[STEPS] < bf16[1] - 0.5  # it learns


def _fp16_supported() -> bool:
    code = "from deepspeed.accelerator import get_accelerator as g; print(bool(g().is_fp16_supported()))"
    res = run_cmd([PY, "-c", code], timeout=120, env=base_env())
    return res.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.distributed
def test_fp16_runs_or_fails_with_one_line(root: Path) -> None:
    """fp16 needs the accelerator's fp16 (not DeepSpeed's CPU accelerator here): else a one-line ConfigError."""
    args = TINY_LM + ["trainer.max_steps=5", "strategy=deepspeed", "trainer.precision=fp16"]
    res = train_cli(args, root / "fp16", nproc=1, timeout=180, check=False)
    if _fp16_supported():
        assert res.returncode == 0, res.stderr[-3000:]
        recs = [r for r in read_metrics(root / "fp16") if "loss" in r]
        assert all(math.isfinite(r["loss"]) and r["loss_scale"] > 0 for r in recs)
    else:
        assert res.returncode == 2
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("llmtrain: error:")]
        assert lines == ["llmtrain: error: trainer.precision: DeepSpeed has no fp16 on the cpu accelerator; "
                         "use bf16 or fp32"]
        assert "Traceback" not in res.stderr


# the lr of llmtrain's Scheduler reaches DeepSpeed's optimizer ------------------------------------------------------
LR_SCRIPT = textwrap.dedent("""
    import sys, torch
    from llmtrain.distributed.base import SetupArgs, StrategyConfig
    from llmtrain.distributed.deepspeed import DeepSpeedStrategy
    from llmtrain.distributed.dist import Dist
    from llmtrain.optim import OptimConfig, Scheduler, SchedulerConfig, build_optimizer
    from llmtrain.precision import Precision

    for stage, extra in [(0, {}), (1, {}), (2, {}), (3, {}), (2, {"offload_optimizer": True}),
                         (3, {"offload_params": True})]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        s = DeepSpeedStrategy(StrategyConfig(name="deepspeed", zero_stage=stage, **extra), Dist(),
                              torch.device("cpu"))
        s.setup(model, lambda m: build_optimizer(OptimConfig(lr=1.0), m),
                SetupArgs(Precision.fp32, False, False, (), 2, 1, 0.0))
        x = torch.randn(2, 4)
        moves = []
        for lr in (0.0, 1e-3, 0.1):
            Scheduler(SchedulerConfig(name="constant"), s.optimizer, lr, 10)  # sets every param group's lr
            before = s.full_state_dict()
            with s.micro_step(sync_grads=True):
                s.backward(s.model(x).pow(2).sum())
            s.clip_grad_norm(0.0)
            s.step()
            after = s.full_state_dict()
            moves.append(max((after[k] - before[k]).abs().max().item() for k in after))
        print("MOVES", stage, extra, moves, flush=True)
        assert moves[0] == 0.0 and 1e-4 < moves[1] < 3e-3 and moves[2] > 3e-2, moves
    print("LR-OK")
""")


@pytest.mark.distributed
def test_scheduler_lr_reaches_deepspeed_optimizer(root: Path) -> None:
    """lr written on strategy.optimizer.param_groups drives the update under ZeRO 0-3 and offload."""
    script = root / "lr_check.py"
    script.write_text(LR_SCRIPT)
    res = run_cmd([PY, str(script)], timeout=180, env=base_env())
    assert res.returncode == 0 and "LR-OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


# the deepspeed launcher -------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_deepspeed_launcher_on_cpu(runs: Runs, root: Path) -> None:
    """launch/deepspeed.sh starts 2 CPU processes; --local_rank is dropped; losses equal the torchrun run's."""
    run_dir = root / "launcher"
    env = base_env()
    env.update(PYTHON=PY, NUM_GPUS="2")
    args = [a for a in runs.zero_args(2) if a != "strategy=deepspeed" and not a.startswith("trainer.max_steps=")]
    res = run_cmd(["bash", str(REPO / "launch" / "deepspeed.sh"), *args, "trainer.max_steps=5",
                   f"hydra.run.dir={run_dir}"], timeout=240, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # Hydra would refuse a --local_rank=N argument: the run succeeding shows it was dropped. Nothing but
    # llmtrain's own lines: no launcher INFO, no gcc probes from DeepSpeed's op builds, no FutureWarning.
    for noise in ("[INFO]", "gcc ", "built successfully", "Warning", "Traceback"):
        assert noise not in res.stdout + res.stderr, res.stdout[-3000:] + res.stderr[-3000:]
    ref = losses(runs.zero(2))
    got = losses(run_dir)
    assert got == {k: ref[k] for k in got} and len(got) == 5


# pure helpers (no processes) ----------------------------------------------------------------------------------------
def test_deep_merge_and_generated_config() -> None:
    from llmtrain.distributed.base import SetupArgs, StrategyConfig
    from llmtrain.distributed.deepspeed import build_ds_config, deep_merge
    from llmtrain.errors import ConfigError
    from llmtrain.precision import Precision

    args = SetupArgs(Precision.bf16, False, False, (), micro_batch_size=4, grad_accum_steps=3, grad_clip=1.0)
    ds = build_ds_config(StrategyConfig(name="deepspeed", zero_stage=3, offload_params=True), args, world_size=2)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    merged = deep_merge(ds, {"zero_optimization": {"stage": 2, "overlap_comm": True}, "bf16": {"enabled": False}})
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True, "offload_param": ds["zero_optimization"][
        "offload_param"]}
    assert merged["bf16"] == {"enabled": False} and ds["zero_optimization"]["stage"] == 3  # base untouched
    with pytest.raises(ConfigError, match="strategy.offload_params"):
        build_ds_config(StrategyConfig(name="deepspeed", zero_stage=2, offload_params=True), args, 2)


def test_local_rank_flag_is_stripped(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmtrain.distributed.env import strip_local_rank_arg

    monkeypatch.setenv("LOCAL_RANK", "")  # recorded, so the value the call writes is undone after the test
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_local_rank_arg(["train", "--local_rank=1", "strategy=deepspeed"]) == ["train", "strategy=deepspeed"]
    assert os.environ["LOCAL_RANK"] == "1"
