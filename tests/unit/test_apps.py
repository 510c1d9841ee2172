"""What every llmtrain app shares with llmtrain-train: a misspelt `+key` refused naming the real key, a
missing required key on exactly one stderr line, and no INFO lines from HTTP libraries."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from helpers import fork_cli

GENERATE, EVAL, PREPARE = "llmtrain.generate", "llmtrain.generation.eval", "llmtrain.prepare"


def _one_error_line(res, key: str) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, (res.returncode, res.stderr)
    assert lines[0].startswith(f"llmtrain: error: {key}: "), lines
    return lines[0]


@pytest.mark.parametrize("module,argv,key,real", [
    (GENERATE, ["source=/no/such/model", "prompt=x", "+max_new_token=3"], "max_new_token", "max_new_tokens"),
    (GENERATE, ["source=/no/such/model", "prompt=x", "+temprature=0.5"], "temprature", "temperature"),
    (EVAL, ["source=/no/such/model", "+batch_sise=4"], "batch_sise", "batch_size"),
    (EVAL, ["source=/no/such/model", "+data.seq_length=8"], "data.seq_length", "data.seq_len"),
    (PREPARE, ["data.source=/no/such/corpus.txt", "+forse=true"], "forse", "force"),
    (PREPARE, ["data.source=/no/such/corpus.txt", "+data.vocab=300"], "data.vocab", "data.vocab_size"),
])
def test_unknown_keys_refused_by_every_app(module: str, argv: list[str], key: str, real: str,
                                           tmp_path: Path) -> None:
    """Hydra takes `+key=value` on the apps' typed roots too; each app refuses it before loading anything
    (the source and corpus named do not exist: their own errors would come later)."""
    line = _one_error_line(fork_cli(module, argv, cwd=tmp_path, logs=tmp_path / "logs"), key)
    assert "no such key" in line and f"did you mean {real}?" in line and "(--help lists the config)" in line


@pytest.mark.parametrize("module,argv", [(GENERATE, ["prompt=x"]), (EVAL, ["data.source=corpus.txt"])])
def test_missing_source_is_exactly_one_line(module: str, argv: list[str], tmp_path: Path) -> None:
    """No `Error executing job with overrides: ...` line from Hydra before ours."""
    line = _one_error_line(fork_cli(module, argv, cwd=tmp_path, logs=tmp_path / "logs"), "source")
    assert line == "llmtrain: error: source: is required; give source=... (--help lists the config)"


@pytest.fixture
def saved_logging():
    """Hydra's job_logging reconfigures the process's logging: put it back afterwards."""
    root = logging.getLogger()
    loggers = {name: (lg.level, lg.disabled, lg.propagate, list(lg.handlers))
               for name, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    before = (root.level, list(root.handlers))
    yield
    for name, (level, disabled, propagate, handlers) in loggers.items():
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.disabled, lg.propagate, lg.handlers = disabled, propagate, handlers
    root.setLevel(before[0])
    root.handlers = before[1]


@pytest.mark.parametrize("module,argv", [
    ("llmtrain.prepare", ["data.source=corpus.txt"]),
    ("llmtrain.train", ["trainer=debug"]),
    ("llmtrain.generation.cli", ["source=model", "prompt=x"]),
    ("llmtrain.generation.eval", ["source=model"]),
])
def test_http_libraries_log_warnings_only(module: str, argv: list[str], tmp_path: Path, saved_logging,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside the job, after Hydra set up logging (the root at INFO for train and prepare), the loggers of
    httpx & co. are at WARNING: no `HTTP Request: GET https://huggingface.co/...` line per hub request."""
    import importlib

    from hydra.core.global_hydra import GlobalHydra

    from llmtrain.cli import CHATTY_LOGGERS

    mod = importlib.import_module(module)
    seen: dict[str, int] = {}

    def fake_run(*_args, **_kwargs) -> dict:
        seen.update({name: logging.getLogger(name).getEffectiveLevel() for name in CHATTY_LOGGERS})
        seen["root"] = logging.getLogger().getEffectiveLevel()
        return {}

    for name in CHATTY_LOGGERS:  # as a fresh process has them
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    monkeypatch.setattr(mod, "run", fake_run)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.chdir(tmp_path)
    GlobalHydra.instance().clear()
    mod.main()
    GlobalHydra.instance().clear()
    assert set(seen) == {*CHATTY_LOGGERS, "root"}, seen
    assert all(seen[name] >= logging.WARNING for name in CHATTY_LOGGERS), seen
    if module in ("llmtrain.prepare", "llmtrain.train"):
        assert seen["root"] == logging.INFO  # what would have let them through
