"""What every llmtrain app shares with llmtrain-train: a misspelt `+key` refused naming the real key, a
missing required key on exactly one stderr line."""

from __future__ import annotations

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
