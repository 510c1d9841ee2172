"""Tracking: TensorBoard events hold what metrics.jsonl holds, wandb offline runs (config, history, resume
into the same run), the loss plot, MFU's FLOP count and peak table, eval metrics, and bad logger options."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from helpers import TINY_LM, compose, read_metrics

from llmtrain.tracking.flops import lookup_peak_tflops, mfu, peak_flops
from llmtrain.train import run

pytestmark = pytest.mark.usefixtures("one_thread")
SHORT = [*TINY_LM, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.ckpt_every=2"]


def _png(path: Path) -> tuple[int, int]:
    """(width, height) of a valid PNG file."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_tensorboard_holds_the_logged_scalars_and_the_plot(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run(compose([*SHORT, f"hydra.run.dir={run_dir}"]), run_dir)  # logger.tensorboard defaults to true
    recs = read_metrics(run_dir)
    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "step_time_s", "data_wait_s",
            "eval_loss", "perplexity"} <= tags
    for tag in ("loss", "lr", "eval_loss"):
        want = [(r["step"], r[tag]) for r in recs if tag in r]
        got = [(e.step, e.value) for e in ea.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert all(abs(a - b) <= 1e-6 * abs(b) for (_, a), (_, b) in zip(got, want, strict=True))  # float32
    assert "mfu" not in tags  # no peak is known for a CPU
    w, h = _png(run_dir / "plots" / "loss.png")
    assert (w, h) == (800, 450)
    evals = [r for r in recs if "eval_loss" in r]
    assert all(r["perplexity"] == pytest.approx(__import__("math").exp(r["eval_loss"])) for r in evals)


def test_mfu_from_a_given_peak(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose([*SHORT, "logger.peak_tflops=0.002", "logger.tensorboard=false", f"hydra.run.dir={run_dir}"])
    run(cfg, run_dir)
    from llmtrain.models.gpt2_native import load_hf

    fpt = load_hf(run_dir / "final").dims.flops_per_token(cfg.data.seq_len)
    for r in (r for r in read_metrics(run_dir) if "loss" in r):
        assert r["mfu"] == pytest.approx(fpt * r["tokens_per_s"] / 2e9)
        assert r["step_time_s"] > 0 and 0 <= r["data_wait_s"] < r["step_time_s"]


def test_flops_per_token_is_6n_plus_attention() -> None:
    from llmtrain.models.gpt2_native import GPT2, GPT2Dims

    for d, seq in ((GPT2Dims(vocab_size=50257), 1024), (GPT2Dims(vocab_size=300, n_positions=64, n_embd=32,
                                                                n_layer=2, n_head=2), 32)):
        with torch.device("meta"):
            m = GPT2(d)
        n = sum(p.numel() for p in m.parameters()) - m.transformer.wpe.weight.numel()  # tied head counted once
        assert d.flops_per_token(seq) == 6 * n + 12 * d.n_layer * seq * d.n_embd
    assert GPT2Dims(vocab_size=50257).flops_per_token(1024) == pytest.approx(0.855e9, rel=1e-3)  # GPT-2 124M


def test_peak_lookup() -> None:
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert lookup_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert lookup_peak_tflops("NVIDIA H200", "fp16") == 989.4
    assert lookup_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 156.0  # TF32
    assert lookup_peak_tflops("NVIDIA L4", "bf16") == 121.0
    assert lookup_peak_tflops("Tesla T4", "bf16") is None  # no bf16 on a T4
    assert lookup_peak_tflops("Some GPU", "bf16") is None
    assert peak_flops(torch.device("cpu"), "fp32") is None and peak_flops(torch.device("cpu"), "fp32", 2.0) == 2e12
    assert mfu(1e9, 1e5, 1e15, 2) == pytest.approx(0.05)


def _wandb_records(path: Path) -> list:
    """Records of a wandb run file (32 KiB blocks of [crc32 | length | type] framed protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, out, buf, pos = path.read_bytes(), [], b"", 7  # after the ':W&B' header
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a whole record, or its last piece
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _wandb_run(path: Path) -> tuple[str, dict, list[dict]]:
    run_id, config, history = "", {}, []
    for rec in _wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id = rec.run.run_id
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return run_id, config, history


def test_wandb_offline_run_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_dir = tmp_path / "run"
    args = [*SHORT, "logger.wandb=true", "logger.wandb_mode=offline", "logger.wandb_project=proj",
            'logger.wandb_tags=["a","b"]', "logger.tensorboard=false", f"hydra.run.dir={run_dir}"]
    run(compose(args), run_dir)
    run(compose([*args, "trainer.max_steps=6"]), run_dir)  # resumed from step 4: the same wandb run
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    runs = [_wandb_run(f) for f in files]
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert [r[0] for r in runs] == [run_id, run_id]
    cfg = runs[0][1]
    assert cfg["model"]["n_layer"] == 2 and cfg["trainer"]["max_steps"] == 4 and cfg["name"] == "gpt2_tiny"
    history = runs[0][2] + runs[1][2]
    logged = {(h["step"], h.get("loss"), h.get("eval_loss")) for h in history if "step" in h}
    want = {(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(run_dir)}
    assert want == logged  # the same records under the same names, steps 1-6


@pytest.mark.parametrize("override,key", [
    ("logger.wandb_mode=cloud", "logger.wandb_mode"),
    ("logger.peak_tflops=0", "logger.peak_tflops"),
    ("+logger.mlflow=true", "logger.mlflow"),
])
def test_bad_logger_options_are_one_line(override: str, key: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as ei:
        run(compose([*SHORT, "logger.wandb=true", override]), tmp_path / "run")
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(err) == 1 and err[0].startswith(f"llmtrain: error: {key}: "), err
    assert not (tmp_path / "run").exists()


def test_wandb_online_without_login_fails_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    for k in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(SystemExit) as ei:
        run(compose([*SHORT, "logger.wandb=true"]), tmp_path / "run")
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(err) == 1 and "logger.wandb_mode: online, but there is no wandb login" in err[0]
    assert not (tmp_path / "run").exists()


def test_progress_without_a_terminal_is_plain_lines(capsys: pytest.CaptureFixture) -> None:
    from llmtrain.tracking.progress import Progress

    p = Progress(total=10, start=0, enabled=True)  # pytest's captured stderr is not a terminal
    for step in range(1, 4):
        p.advance()
        p.metrics({"step": step, "loss": 2.0 / step, "lr": 1e-3, "tokens_per_s": 12345.0})
    p.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines()[0].startswith("step 1/10 · loss 2.0000 · lr 1.00e-03 · 12.3k tok/s · eta ")


def test_report_counts_run_dirs_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """wandb's <run>/wandb/run-*/files/config.yaml and a stray config.yaml are not trials; run dirs with
    metrics.jsonl or run.json are, at any depth."""
    from llmtrain.tracking.report import report, trial_dirs

    sweep = tmp_path / "sweep"
    for i, name in enumerate(["optim.lr=0.1", "optim.lr=0.01", "nested/optim.lr=0.001"]):
        d = sweep / name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text("name: x\n")
        if i == 1:  # refused or stopped before its first step: a run record, no metrics
            (d / "run.json").write_text(json.dumps({"status": "failed", "overrides": [name]}) + "\n")
        else:
            (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0 - i}) + "\n")
        files = d / "wandb" / "run-20250101_000000-abcd1234" / "files"
        files.mkdir(parents=True)
        (files / "config.yaml").write_text("wandb_version: 1\n")
        (files / "metrics.jsonl").write_text("")  # not a run even beside what a run dir holds
    (sweep / "notes").mkdir()
    (sweep / "notes" / "config.yaml").write_text("a: 1\n")  # not a run
    want = [sweep / "nested" / "optim.lr=0.001", sweep / "optim.lr=0.01", sweep / "optim.lr=0.1"]
    assert trial_dirs(sweep) == want
    rows = report(sweep)
    assert sorted(r["trial"] for r in rows) == sorted(str(d.relative_to(sweep)) for d in want)
    assert "3 trials" in capsys.readouterr().err


def test_report_and_plot_show_the_benchmarks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A trial that scored trainer.bench_tasks: its last score per task is a column of the report (and of
    report.csv); a trial without them shows a dash; the run's loss plot grows a panel for them."""
    import csv

    from llmtrain.tracking.plots import loss_plot
    from llmtrain.tracking.report import report

    sweep = tmp_path / "sweep"
    for name, recs in (("a", [{"step": 1, "loss": 2.0}, {"step": 2, "bench/items/acc": 0.25},
                              {"step": 4, "loss": 1.5, "bench/items/acc": 0.5}]),
                       ("b", [{"step": 1, "loss": 1.8}])):
        d = sweep / name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text("name: x\n")
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    report(sweep)
    out = capsys.readouterr().out.splitlines()
    assert "bench/items/acc" in out[0].split(" | ")
    row_a = next(ln for ln in out if ln.startswith("| a |"))
    assert " 0.5 " in row_a and " — " in next(ln for ln in out if ln.startswith("| b |"))
    with open(sweep / "report.csv") as f:
        assert [r["bench/items/acc"] for r in csv.DictReader(f)] == ["0.5", ""]  # a (lower loss) first
    small = loss_plot(sweep / "b").stat().st_size
    assert loss_plot(sweep / "a").stat().st_size > small  # two panels


def test_dashboard_on_a_port_in_use_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import socket

    from llmtrain.tracking.dashboard import main as dashboard_main

    (tmp_path / "runs").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        capsys.readouterr()
        with pytest.raises(SystemExit) as ei:
            dashboard_main([str(tmp_path / "runs"), "--port", str(port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"llmtrain: error: --port: port {port} on 127.0.0.1 is in use"), err


def test_wandb_mode_from_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    """WANDB_MODE=offline without a login and logger.wandb_mode left at online: the login check and the
    wandb run both go offline, and the run trains; an unknown WANDB_MODE is one line before training."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    args = [*SHORT, "logger.wandb=true", "logger.tensorboard=false", "trainer.max_steps=2"]
    assert compose(args).logger.wandb_mode == "online"
    run(compose(args), run_dir)
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history = _wandb_run(files[0])[2]
    assert sorted(h["step"] for h in history if "loss" in h) == [1, 2]
    monkeypatch.setenv("WANDB_MODE", "cloud")
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        run(compose(args), tmp_path / "other")
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(err) == 1 and err[0].startswith("llmtrain: error: WANDB_MODE: "), err


def test_torchrun_trials_learn_their_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hydra/launcher=torchrun runs each trial in Hydra's RUN mode, which knows no sweep: the launcher passes
    the sweep's name in LLMTRAIN_SWEEP to every trial (torchrun stubbed here), and sweep_group (wandb's
    group) reads it there, or the sweep dir's name in a multirun."""
    import subprocess
    from types import SimpleNamespace

    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from hydra_plugins.llmtrain_launcher import torchrun_launcher
    from llmtrain.config import conf_dir, register_configs
    from llmtrain.tracking.sinks import SWEEP_ENV, sweep_group

    sweep_dir = tmp_path / "multirun" / "lr_sweep"

    def load_sweep_config(_config, overrides: list[str]):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            return hcompose(config_name="config", return_hydra_config=True,
                            overrides=[*TINY_LM, *overrides, f"hydra.sweep.dir={sweep_dir}",
                                       f"hydra.sweep.subdir=lr_{overrides[0].split('=')[1]}"])

    calls: list[tuple[list[str], dict]] = []

    def fake_run(cmd: list[str], env: dict, timeout=None) -> subprocess.CompletedProcess:
        calls.append((cmd, env))
        return subprocess.CompletedProcess(cmd, 0)

    register_configs()
    GlobalHydra.instance().clear()
    config = load_sweep_config(None, ["optim.lr=0.1"])
    GlobalHydra.instance().clear()
    monkeypatch.setattr(torchrun_launcher.subprocess, "run", fake_run)
    monkeypatch.delenv(SWEEP_ENV, raising=False)
    launcher = torchrun_launcher.TorchrunLauncher(nproc_per_node=2)
    launcher.setup(hydra_context=SimpleNamespace(config_loader=SimpleNamespace(load_sweep_config=load_sweep_config)),
                   task_function=lambda cfg: None, config=config)
    try:
        rets = launcher.launch([["optim.lr=0.1"], ["optim.lr=0.01"]], initial_job_idx=0)
    finally:
        GlobalHydra.instance().clear()
    assert len(rets) == 2 and [env[SWEEP_ENV] for _, env in calls] == ["lr_sweep", "lr_sweep"]
    assert [cmd[-1] for cmd, _ in calls] == [f"hydra.run.dir='{sweep_dir / d}'" for d in ("lr_0.1", "lr_0.01")]
    assert SWEEP_ENV not in __import__("os").environ  # only the trials' environment has it
    hc = OmegaConf.create({"mode": RunMode.RUN, "sweep": {"dir": "multirun/x"}})
    assert sweep_group(hc) is None  # a run outside a sweep
    monkeypatch.setenv(SWEEP_ENV, calls[0][1][SWEEP_ENV])
    assert sweep_group(hc) == "lr_sweep"  # a trial torchrun started
    assert sweep_group(OmegaConf.create({"mode": RunMode.MULTIRUN, "sweep": {"dir": "multirun/other"}})) == "other"
