"""No command deletes what it did not write: pruning around damaged checkpoints, export targets and the run's
lock, one-line errors for unusable paths, `make clean` keeping results, the torch floor."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY_LM, compose, fork_cli, losses

from llmtrain import checkpoint as ckpt
from llmtrain.train import run

BASE = [*TINY_LM, "trainer.eval_every=0", "logger.tensorboard=false", "logger.plots=false", "scheduler=constant",
        "trainer.ckpt_every=10", "trainer.keep_checkpoints=2"]


def _cfg(run_dir: Path, *extra: str):
    return compose([*BASE, *extra, f"hydra.run.dir={run_dir}"])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _one_error(capsys: pytest.CaptureFixture, fn, *words: str, code: int = 2) -> str:
    with pytest.raises(SystemExit) as ei:
        fn()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("llmtrain: error:")]
    assert ei.value.code == code and len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 steps, a checkpoint every 10, the newest 2 kept (steps 30 and 40), final/ of step 40."""
    d = tmp_path_factory.mktemp("noloss") / "run"
    run(_cfg(d, "trainer.max_steps=40"), d)
    assert [p.name for p in ckpt.list_checkpoints(d)] == ["step_00000030", "step_00000040"]
    return d


# pruning ------------------------------------------------------------------------------------------------------
def test_damaged_checkpoints_are_set_aside_and_the_new_ones_kept(trained: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """Both kept checkpoints damaged: the rerun warns for each, keeps them as step_N.damaged, starts from step 0,
    and the checkpoints it writes survive its own pruning; the next rerun resumes from the newest of them and
    continues the original run's losses bit for bit."""
    d = tmp_path / "run"
    shutil.copytree(trained, d)
    for step in (30, 40):
        _flip(ckpt.step_dir(d, step) / "dcp" / "__0_0.distcp")
    run(_cfg(d, "trainer.max_steps=20"), d)
    err = capsys.readouterr().err
    warned = [ln for ln in err.splitlines() if "is not usable" in ln]
    assert len(warned) == 2 and all("kept as step_000000" in ln and ".damaged" in ln for ln in warned), err
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == [
        "step_00000010", "step_00000020", "step_00000030.damaged", "step_00000040.damaged"]
    assert ckpt.problem(ckpt.step_dir(d, 20), checksums=True) is None
    run(_cfg(d, "trainer.max_steps=30"), d)
    out = capsys.readouterr()
    assert f"resuming from {ckpt.step_dir(d, 20)} at step 20" in out.out, out.out + out.err
    want = losses(trained)
    assert {s: v for s, v in losses(d).items() if s > 20} == {s: want[s] for s in range(21, 31)}


def _fake_checkpoint(run_dir: Path, step: int) -> Path:
    from llmtrain.safeio import describe_files

    ck = ckpt.step_dir(run_dir, step)
    ck.mkdir(parents=True)
    torch.save({"step": step}, ck / ckpt.TRAINER_FILE)
    (ck / ckpt.MANIFEST).write_text(json.dumps({"format": ckpt.FORMAT, "step": step, "world_size": 1,
                                                 "files": describe_files(ck, [ckpt.TRAINER_FILE])}))
    return ck


def test_pruning_never_removes_a_checkpoint_newer_than_the_one_written(tmp_path: Path) -> None:
    """A run resumed from an earlier checkpoint of its dir writes step 20 while step 30 exists: pruning to one
    keeps 20 (just written) and 30 (newer), and removes only 10."""
    for step in (10, 20, 30):
        _fake_checkpoint(tmp_path, step)
    ckpt.prune(tmp_path, 1, newest=ckpt.step_dir(tmp_path, 20))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000020", "step_00000030"]


# export --------------------------------------------------------------------------------------------------------
def _export(*args: str):
    from llmtrain.export import main

    return lambda: main([str(a) for a in args])


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_export_refuses_inside_a_run_that_trains(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """While a job holds the run's lock, exporting into the run (its final/) is refused naming the holder;
    --out outside the run works."""
    from llmtrain.runlock import RunLock

    d = tmp_path / "run"
    shutil.copytree(trained, d)
    before = _snapshot(d / "final")
    with RunLock(d) as lock:
        lock.acquire()
        _one_error(capsys, _export(d, "--force"), "is in use by pid", "--out")
        assert _snapshot(d / "final") == before
        _export(d, ckpt.step_dir(d, 30), "--out", tmp_path / "elsewhere")()
    assert json.loads((tmp_path / "elsewhere" / "llmtrain_export.json").read_text())["step"] == 30


@pytest.mark.parametrize("target", ["run dir", "foreign dir", "export with a user file", "file"])
def test_export_never_replaces_what_it_did_not_write(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     target: str) -> None:
    """--out (even with --force) is refused when it is a run dir, a dir of other files, an export to which a
    file was added, or a file; the target is left as it was."""
    out = tmp_path / "out"
    if target == "run dir":
        shutil.copytree(trained, out)
    elif target == "foreign dir":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif target == "export with a user file":
        shutil.copytree(trained / "final", out)
        (out / "tokenizer" if (out / "tokenizer").is_dir() else out).joinpath("notes.txt").write_text("mine")
    else:
        out.write_text("mine")
    before = _snapshot(out) if out.is_dir() else out.read_bytes()
    words = {"run dir": "is a run dir", "foreign dir": "no export wrote", "export with a user file": "notes.txt",
             "file": "is a file"}[target]
    _one_error(capsys, _export(trained, ckpt.step_dir(trained, 30), "--out", out, "--force"), "--out", words)
    assert (_snapshot(out) if out.is_dir() else out.read_bytes()) == before


def test_export_force_replaces_an_earlier_export(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    _export(trained, ckpt.step_dir(trained, 30), "--out", out)()
    _one_error(capsys, _export(trained, "--out", out), "holds the export of step 30", "--force")
    _export(trained, "--out", out, "--force")()
    rec = json.loads((out / "llmtrain_export.json").read_text())
    assert rec["step"] == 40 and sorted(rec["files"]) == sorted(set(_snapshot(out)) - {"llmtrain_export.json"})


def test_a_run_refuses_to_start_over_a_foreign_file_in_its_final_dir(trained: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """The run replaces final/ when it ends: a file someone put there stops it at start, before any work."""
    d = tmp_path / "run"
    shutil.copytree(trained, d)
    (d / "final" / "notes.txt").write_text("mine")
    _one_error(capsys, lambda: run(_cfg(d, "trainer.max_steps=50"), d), "notes.txt")
    assert (d / "final" / "notes.txt").read_text() == "mine"
    assert [p.name for p in ckpt.list_checkpoints(d)] == ["step_00000030", "step_00000040"]


# paths Hydra cannot create ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["long name", "run dir is a file"])
def test_an_unusable_run_dir_is_one_line(tmp_path: Path, case: str) -> None:
    if case == "long name":
        args, words = ["name=" + "x" * 300], ("File name too long", "name=")
    else:
        (tmp_path / "afile").write_text("mine")
        args, words = [f"hydra.run.dir={tmp_path / 'afile'}"], ("afile", "hydra.run.dir")
    res = fork_cli("llmtrain.train", [*TINY_LM, "trainer.max_steps=1", *args], cwd=tmp_path, timeout=120)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("llmtrain: error:"), res.stderr
    assert all(w in lines[0] for w in words), lines[0]
    if case == "run dir is a file":
        assert (tmp_path / "afile").read_text() == "mine"


# make clean ---------------------------------------------------------------------------------------------------
def _make(cwd: Path, *target: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), *target], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_make_clean_keeps_results(tmp_path: Path) -> None:
    for d in ("runs/x/checkpoints", "multirun/s/0", ".pytest_cache", "build"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "runs/x/checkpoints/f").write_text("weights")
    assert _make(tmp_path, "clean").returncode == 0
    assert (tmp_path / "runs/x/checkpoints/f").is_file() and (tmp_path / "multirun/s/0").is_dir()
    assert not (tmp_path / ".pytest_cache").exists() and not (tmp_path / "build").exists()
    asked = _make(tmp_path, "delete-results")
    assert asked.returncode != 0 and "CONFIRM=yes" in asked.stdout and (tmp_path / "runs/x/checkpoints/f").is_file()
    assert _make(tmp_path, "delete-results", "CONFIRM=yes").returncode == 0
    assert not (tmp_path / "runs").exists() and not (tmp_path / "multirun").exists()


def test_torch_floor_has_the_weights_only_fixes() -> None:
    """torch.load(weights_only=True) could run code from a crafted file before 2.10 (see pyproject.toml)."""
    spec = re.search(r'"torch>=([\d.]+)"', (REPO / "pyproject.toml").read_text())
    assert spec is not None
    assert tuple(int(x) for x in spec.group(1).split(".")[:2]) >= (2, 10)
