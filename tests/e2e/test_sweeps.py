"""Sweeps through the CLI: a grid (one run dir per trial, named after its swept overrides), a rerun that skips
finished trials and resumes the interrupted one, Optuna minimising the eval loss, distributed trials through
`hydra/launcher=torchrun`, the sweep report, and the TensorBoard dashboard's HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import PY, REPO, TINY_LM, base_env, fork_cli, free_port, kill_tree, losses, read_metrics

pytestmark = pytest.mark.e2e
QUICK = [*TINY_LM, "model.n_positions=64", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.ckpt_every=2",
         "trainer.keep_checkpoints=5", "logger.log_every=1"]


def _sweep(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return fork_cli("llmtrain.train", ["-m", *args], cwd=cwd, timeout=300)


def _png_ok(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    """A 2×2 sweep: every trial in multirun/<name>/<its swept overrides>."""
    cwd = tmp_path_factory.mktemp("grid")
    res = _sweep([*QUICK, "optim.lr=1e-3,3e-3", "trainer.micro_batch_size=2,4"], cwd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return cwd / "multirun" / "gpt2_tiny"


def test_grid_sweep_and_report(grid: Path, capsys: pytest.CaptureFixture) -> None:
    from llmtrain.tracking.report import main as report_main

    names = sorted(p.name for p in grid.iterdir() if p.is_dir())
    assert names == ["optim.lr=0.001,trainer.micro_batch_size=2", "optim.lr=0.001,trainer.micro_batch_size=4",
                     "optim.lr=0.003,trainer.micro_batch_size=2", "optim.lr=0.003,trainer.micro_batch_size=4"]
    for name in names:
        assert sorted(losses(grid / name)) == [1, 2, 3, 4]
        rec = json.loads((grid / name / "run.json").read_text())
        assert rec["status"] == "complete" and f"trainer.micro_batch_size={name[-1]}" in rec["overrides"]
    capsys.readouterr()
    report_main([str(grid)])
    table = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| optim")]
    assert len(table) == 4
    evals = {n: [r["eval_loss"] for r in read_metrics(grid / n) if "eval_loss" in r][-1] for n in names}
    assert [ln.split(" | ")[0][2:] for ln in table] == sorted(names, key=evals.get)  # best first
    rows = (grid / "report.csv").read_text().splitlines()
    assert rows[0].startswith("trial,train_loss,eval_loss,tokens_per_s,wall_s,status") and len(rows) == 5
    assert _png_ok(grid / "sweep.png") and all(_png_ok(grid / n / "plots" / "loss.png") for n in names)


def test_rerun_skips_finished_trials_and_resumes_the_interrupted_one(grid: Path, tmp_path: Path) -> None:
    cwd = tmp_path / "rerun"
    shutil.copytree(grid.parent.parent, cwd)
    sweep = cwd / "multirun" / "gpt2_tiny"
    broken = sweep / "optim.lr=0.003,trainer.micro_batch_size=4"
    want = losses(broken)
    shutil.rmtree(broken / "final")  # as if killed after its step-2 checkpoint
    shutil.rmtree(broken / "checkpoints" / "step_00000004")
    res = _sweep([*QUICK, "optim.lr=1e-3,3e-3", "trainer.micro_batch_size=2,4"], cwd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("is complete (step 4 of 4") == 3
    assert f"resuming from {broken / 'checkpoints' / 'step_00000002'} at step 2" in res.stdout
    assert losses(broken) == want and (broken / "final").is_dir()  # bit for bit


def test_optuna_minimises_the_eval_loss(tmp_path: Path) -> None:
    res = _sweep([*QUICK, "hydra/sweeper=lr_search", "hydra.sweeper.n_trials=3"], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sweep = tmp_path / "multirun" / "gpt2_tiny"
    trials = [p for p in sweep.iterdir() if (p / "run.json").is_file()]
    assert len(trials) == 3
    evals = {p.name: [r["eval_loss"] for r in read_metrics(p) if "eval_loss" in r][-1] for p in trials}
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(evals.values()))
    winner = min(evals, key=evals.get)
    assert all(f"{k}={v}" in winner for k, v in best["best_params"].items())


def test_distributed_trials_through_the_torchrun_launcher(tmp_path: Path) -> None:
    res = _sweep([*QUICK, "hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=2", "strategy=ddp",
                  "optim.lr=1e-3,3e-3"], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sweep = tmp_path / "multirun" / "gpt2_tiny"
    for lr in ("0.001", "0.003"):
        trial = sweep / f"optim.lr={lr}"
        assert json.loads((trial / "run.json").read_text())["status"] == "complete"
        recs = [r for r in read_metrics(trial) if "loss" in r]
        assert len(recs) == 4 and all(r["samples"] == 4 * 2 for r in recs)  # micro 4 on each of 2 ranks
    assert res.stdout.count("strategy ddp × 2 on cpu") == 2
    assert res.stderr.count("on 2 processes: ") == 2


@pytest.mark.parametrize("launcher", ["basic", "torchrun"])
def test_a_bad_value_in_a_sweep_is_one_line(launcher: str, tmp_path: Path) -> None:
    res = _sweep([*QUICK, f"hydra/launcher={launcher}", "trainer.max_steps=2", "optim.lr=1e-3,-1"], tmp_path)
    assert res.returncode == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("llmtrain: error:")]
    assert errors == ["llmtrain: error: optim.lr: must be > 0 (got -1.0)"], res.stderr[-3000:]
    assert "Traceback" not in res.stdout + res.stderr


def test_report_of_a_missing_dir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llmtrain.tracking.report import main as report_main

    with pytest.raises(SystemExit) as ei:
        report_main([str(tmp_path / "nope")])
    assert ei.value.code == 2
    assert capsys.readouterr().err.strip() == f"llmtrain: error: sweep_dir: {tmp_path / 'nope'} does not exist"


def test_slurm_launcher_preset_composes() -> None:
    """No cluster here: the preset resolves to submitit's SLURM launcher with one task per GPU."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from llmtrain.config import conf_dir, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4


def test_ranks_from_slurm_without_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks that SLURM starts itself (submitit) find their rank and the rendezvous at the job's first node."""
    from llmtrain.distributed.env import read_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")  # recorded, so the values read_env writes are undone after the test
        monkeypatch.delenv(k)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho gpu03; echo gpu04\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[03-04]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    env = read_env()
    import os

    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    assert os.environ["MASTER_ADDR"] == "gpu03" and os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)


def test_dashboard_serves_the_runs(grid: Path) -> None:
    """llmtrain-dashboard on a free localhost port: its HTTP API lists the sweep's runs and their loss series."""
    port = free_port()
    proc = subprocess.Popen([PY, "-m", "llmtrain.tracking.dashboard", str(grid), "--port", str(port)], cwd=REPO,
                            env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, runs = time.monotonic() + 90, []
        while time.monotonic() < deadline:
            try:
                runs = json.loads(urllib.request.urlopen(f"{base}/data/runs", timeout=5).read())
                if len(runs) >= 4:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        trial = "optim.lr=0.001,trainer.micro_batch_size=2"
        name = next((r for r in runs if trial in r), None)
        assert name is not None, runs
        url = f"{base}/data/plugin/scalars/scalars?tag=loss&run={urllib.request.quote(name)}"
        series = json.loads(urllib.request.urlopen(url, timeout=10).read())
        want = losses(grid / trial)
        assert [int(s) for _, s, _ in series] == sorted(want)
        assert all(abs(v - want[int(s)]) <= 1e-6 * abs(want[int(s)]) for _, s, v in series)
    finally:
        kill_tree(proc, grace=5)
    assert f"at http://127.0.0.1:{port}/" in proc.stdout.read()
