"""`python -m llmtrain.prepare` through the CLI: a prepared dir with counts, and a one-line error."""

from __future__ import annotations

import json

import pytest
from helpers import PY, base_env, run_cmd

pytestmark = pytest.mark.e2e


def test_prepare_cli_writes_a_dataset_and_reports_counts(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("to be or not to be\n" * 200)
    (tmp_path / "docs" / "b.jsonl").write_text(json.dumps({"text": "that is the question"}) + "\n")
    out = tmp_path / "prepared"
    cmd = [PY, "-m", "llmtrain.prepare", f"data.source={tmp_path / 'docs'}", "data.tokenizer=byte",
           f"data.out_dir={out}", "data.val_fraction=0.1"]
    res = run_cmd(cmd, timeout=120, env=base_env(tmp_path / "cache"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == 200 * 19 + 1 + 20 + 1  # bytes + one EOS per document
    assert f"train_tokens={meta['train_tokens']} val_tokens={meta['val_tokens']}" in res.stdout
    assert meta["vocab_size"] == 257 and meta["documents"] == 2 and (out / "tokenizer" / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "prepared"]  # nothing else written (cwd, cache)


def test_prepare_cli_bad_input_is_one_line_exit_2_and_no_dataset(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"content": "wrong field"}\n')
    out = tmp_path / "prepared"
    cmd = [PY, "-m", "llmtrain.prepare", f"data.source={tmp_path / 'bad.jsonl'}", "data.tokenizer=byte",
           f"data.out_dir={out}"]
    res = run_cmd(cmd, timeout=120, env=base_env(tmp_path / "cache"))
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "data.text_field" in errors[0] and "bad.jsonl:2" in errors[0], res.stderr
    assert "Traceback" not in res.stderr and not out.exists() and not list(tmp_path.glob(".prepared*"))
