"""Through the CLI: a real run, one-line errors with exit 2, Hydra's own errors, the installed package."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import PY, REPO, TINY_LM, base_env, read_metrics, run_cmd, train_cli

pytestmark = pytest.mark.e2e


def test_train_cli_end_to_end(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    res = train_cli([*TINY_LM, "trainer.max_steps=4", "trainer.sample_tokens=24", "logger.progress=true"], run_dir,
                    env=base_env(tmp_path / "cache"))
    assert "--- sample (24 tokens) ---" in res.stdout
    assert "train: 100%" in res.stderr  # the progress bar
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3, 4]
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "step_00000004" / "manifest.json").is_file()


def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory) -> Path:
    """A finished run that bad invocations must leave untouched."""
    d = tmp_path_factory.mktemp("existing")
    (d / "config.yaml").write_text("name: old\n")
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return d


@pytest.mark.parametrize("override,key", [
    ("optim.lr=0", "optim.lr"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
    ("data.seq_len=4096", "data.seq_len"),
    ("data.source=/no/such/corpus.txt", "data.source"),
    ("data.tokenizer=/no/such/tokenizer_dir", "data.tokenizer"),
    ("model.family=gpt5", "model.family"),
])
def test_semantic_error_one_line_exit_2(override: str, key: str, existing_run: Path, tmp_path: Path) -> None:
    before = _snapshot(existing_run)
    res = train_cli([*TINY_LM, override], existing_run, check=False, timeout=120, env=base_env(tmp_path / "c"))
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    assert len(lines) == 1 and lines[0].startswith(f"llmtrain: error: {key}: "), res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert _snapshot(existing_run) == before


@pytest.mark.parametrize("override", ["trainer.max_stepz=3", "model.n_layer=four", "model=gpt7"])
def test_hydra_errors_exit_nonzero(override: str, tmp_path: Path) -> None:
    res = run_cmd([PY, "-m", "llmtrain.train", override, f"hydra.run.dir={tmp_path / 'r'}"], timeout=120)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_help_lists_groups() -> None:
    res = run_cmd([PY, "-m", "llmtrain.train", "--help"], timeout=120)
    assert res.returncode == 0
    for group in ("model:", "data:", "optim:", "strategy:", "experiment:"):
        assert group in res.stdout


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
