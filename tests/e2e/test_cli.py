"""Through the CLI: a real run, one-line errors with exit 2, Hydra's own errors, the installed package."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    PY,
    REPO,
    TINY_LM,
    base_env,
    compose,
    fork_cli,
    free_port,
    losses,
    read_metrics,
    run_cmd,
    train_cli,
)

from llmtrain import checkpoint as ckpt
from llmtrain.train import run

pytestmark = pytest.mark.e2e


def test_train_cli_end_to_end(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    res = train_cli([*TINY_LM, "trainer.max_steps=4", "trainer.sample_tokens=24", "logger.progress=true"], run_dir,
                    env=base_env(tmp_path / "cache"))
    assert "--- sample at step 4 (24 tokens) ---" in res.stdout
    assert "step 4/4 · loss" in res.stderr  # progress as plain lines when stderr is not a terminal
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3, 4]
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    # after the last step every phase says what it does: evaluation, checkpoint, export, sampling
    said = res.stdout + res.stderr
    for phase in ("step 4: evaluating", "step 4: saving checkpoint", "llmtrain: exporting",
                  "llmtrain: exported step 4", "llmtrain: sampling 24 tokens"):
        assert phase in said, said[-3000:]


def test_ctrl_c_stops_after_the_step_and_resumes_exactly(tmp_path: Path, one_thread: None) -> None:
    """Ctrl-C: the step finishes, a checkpoint is written, exit 130 with one line on how to resume; the rerun
    continues with the losses of a run that was never stopped. A second Ctrl-C abandons the step at once."""
    args = [*TINY_LM, "trainer.max_steps=400", "trainer.ckpt_every=1000", "trainer.eval_every=0",
            "model.dropout=0.1", "trainer.grad_accum_steps=2"]
    env = base_env(tmp_path / "cache")
    ref, run_dir = tmp_path / "ref", tmp_path / "run"
    run(compose([*args, "trainer.max_steps=40"]), ref)  # in-process on one thread, as the CLI (OMP_NUM_THREADS=1)
    proc = _start_train(args, run_dir, env)
    _wait_for_step(run_dir, 5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err
    stop = [ln for ln in err.splitlines() if ln.startswith("llmtrain: stopped at step")]
    assert len(stop) == 1 and "rerun the same command to resume" in stop[0], err[-3000:]
    step = int(stop[0].split()[4])
    assert ckpt.list_checkpoints(run_dir)[-1].name == f"step_{step:08d}"
    assert max(losses(run_dir)) == step
    train_cli([*args, "trainer.max_steps=40"], run_dir, env=env)
    assert losses(run_dir) == losses(ref)  # bit for bit, also the steps after the stop
    # a second Ctrl-C while a long step runs: abandoned at once, the newest checkpoint stays valid
    slow = tmp_path / "slow"
    proc = _start_train([*args, "trainer.grad_accum_steps=256", "trainer.ckpt_every=1"], slow, env)  # ~1 s steps
    _wait_for_step(slow, 1)
    while not ckpt.list_checkpoints(slow):  # step 1 is saved: the loop is inside step 2 now
        time.sleep(0.01)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in out + err, err[-3000:]
    assert "llmtrain: aborted during step" in err and "rerun the same command to resume" in err, err[-2000:]
    newest = ckpt.resolve_resume("auto", slow)
    assert newest is not None and ckpt.is_complete(newest)


def _start_train(args: list[str], run_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "llmtrain.train", *args, f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run_dir: Path, step: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and any(s >= step for s in losses(run_dir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {run_dir} after {timeout}s")


def test_refused_run_writes_nothing(tmp_path: Path) -> None:
    """A bad value stops before anything is written: not even the default run dir or runs/ is left."""
    res = run_cmd([PY, "-m", "llmtrain.train", "optim.lr=0"], cwd=tmp_path, timeout=120,
                  env={**base_env(tmp_path / "cache"), "PYTHONPATH": str(REPO)})
    assert res.returncode == 2 and res.stderr.strip() == "llmtrain: error: optim.lr: must be > 0 (got 0.0)"
    assert list(tmp_path.iterdir()) == [tmp_path / "cache"] or not (tmp_path / "runs").exists()
    assert not (tmp_path / "runs").exists()


def test_hub_name_offline_fails_fast(tmp_path: Path) -> None:
    """No network: a hub name fails in seconds with one line, not after a minute of retries."""
    env = base_env(tmp_path / "cache")
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(k)
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache
    t0 = time.monotonic()
    res = train_cli([*TINY_LM, "data.tokenizer=gpt2"], tmp_path / "run", env=env, check=False, timeout=120)
    assert res.returncode == 2 and time.monotonic() - t0 < 30
    assert res.stderr.strip().splitlines() == [
        "llmtrain: error: data.tokenizer: cannot load tokenizer 'gpt2' (the Hugging Face Hub cannot be reached and "
        "the name is not in the local cache; use a local dir); a local dir, bpe or byte work offline"]


@pytest.mark.parametrize("override,line", [
    ("trainer.max_stepz=3", "trainer.max_stepz: no such key in trainer; did you mean trainer.max_steps?"),
    ("+trainer.max_step=3", "trainer.max_step: no such key in trainer; did you mean trainer.max_steps?"),
    ("model.n_layer=four", "model.n_layer: Value 'four' of type 'str' could not be converted to Integer"),
    ("model=gpt7", "model: no option 'gpt7'; choose one of cnn, gpt2_large"),
])
def test_hydra_errors_are_one_line(override: str, line: str, tmp_path: Path) -> None:
    """Hydra's own errors (typo, `+typo`, wrong type, unknown option): one line naming the key, exit 2."""
    res = fork_cli("llmtrain.train", [override, f"hydra.run.dir={tmp_path / 'r'}"], timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llmtrain: error: {line}"), res.stderr
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    train_cli([*TINY_LM, "trainer.max_steps=2", "trainer.eval_every=0"], run_dir)
    return run_dir


@pytest.mark.parametrize("override,line", [
    ("model.n_layer=3", "model.n_layer: is 3 but checkpoint"),
    ("trainer.resume=never", "trainer.resume: never, but"),
    ("trainer.max_stepz=9", "trainer.max_stepz: no such key in trainer; did you mean trainer.max_steps?"),
    ("+model.n_layerz=3", "model.n_layerz: no such key in model; did you mean model.n_layer?"),
    ("optim.lr=-1", "optim.lr: must be > 0"),
])
def test_refusals_through_the_cli_leave_the_run_byte_identical(finished: Path, override: str, line: str) -> None:
    """Refused through the real CLI (Hydra included): one stderr line naming the key, exit 2, and every byte of
    the existing run dir as it was."""
    before = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}
    res = train_cli([*TINY_LM, "trainer.max_steps=4", "trainer.eval_every=0", override], finished, check=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"llmtrain: error: {line}"), res.stderr
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()} == before


def test_help_lists_groups() -> None:
    res = fork_cli("llmtrain.train", ["--help"], timeout=120)
    assert res.returncode == 0
    for group in ("model:", "data:", "optim:", "strategy:", "experiment:", "trainer: debug, default"):
        assert group in res.stdout
    assert "schema" not in res.stdout  # the typed schemas are not options a user picks


def test_installed_package_runs_outside_the_repo(tmp_path: Path) -> None:
    """A non-editable install carries conf/ inside the package: the app works from anywhere."""
    site = tmp_path / "site"
    build = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--target", str(site), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (site / "llmtrain" / "conf" / "experiment" / "linear_regression.yaml").is_file()
    env = base_env(tmp_path / "cache")
    env["PYTHONPATH"] = str(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    res = run_cmd([PY, "-m", "llmtrain.train", "experiment=linear_regression", "trainer.max_steps=5",
                   "logger.progress=false", "hydra.run.dir=out"], env=env, cwd=work, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (work / "out" / "final").is_dir()
    assert str(site) in res.stdout or "llmtrain:" in res.stdout
