"""llmtrain-generate through the CLI: stdout holds exactly the samples, logs go to stderr; jsonl; stdin; stream."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import PY, REPO, base_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small GPT-2 export (random weights: the CLI contract does not need a trained model)."""
    from llmtrain.data.tokenizers import byte_tokenizer
    from llmtrain.models.gpt2_native import GPT2, GPT2Dims, save_hf

    out = tmp_path_factory.mktemp("gen_cli") / "model"
    tok = byte_tokenizer()
    torch.manual_seed(0)
    save_hf(GPT2(GPT2Dims(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                          eos_token_id=tok.eos_token_id)), out)
    tok.save_pretrained(out)
    return out


def _generate(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    """A real process: stdin and the stdout/stderr split are what is tested."""
    return subprocess.run([PY, "-m", "llmtrain.generate", *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO, env=base_env(), timeout=120)


def test_stdout_holds_exactly_the_text(model_dir: Path) -> None:
    from llmtrain.generation import Generator

    gen = Generator.from_pretrained(model_dir, device="cpu")
    prompt = 'def main(x, y="a b"):'
    want = gen(prompt, max_new_tokens=12, do_sample=False)[0].text
    res = _generate([f"source={model_dir}", f"prompt={prompt}", "max_new_tokens=12", "do_sample=false"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == want + "\n"
    assert all(ln.startswith("llmtrain: ") for ln in res.stderr.splitlines()), res.stderr
    streamed = _generate([f"source={model_dir}", f"prompt={prompt}", "max_new_tokens=12", "do_sample=false",
                          "stream=true"])
    assert streamed.returncode == 0 and streamed.stdout == res.stdout


def test_jsonl_from_stdin(model_dir: Path) -> None:
    res = _generate([f"source={model_dir}", "output=jsonl", "num_samples=2", "max_new_tokens=6", "top_k=5",
                     "seed=7"], stdin="first prompt\n\nsecond\n")
    assert res.returncode == 0, res.stderr
    recs = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [(r["prompt"], r["prompt_index"], r["sample_index"]) for r in recs] == [
        ("first prompt", 0, 0), ("first prompt", 0, 1), ("second", 1, 0), ("second", 1, 1)]
    for r in recs:
        assert r["prompt_tokens"] == len(r["prompt"].encode()) and r["finish_reason"] in ("length", "eos")
        assert r["completion_tokens"] == 6 or r["finish_reason"] == "eos"
