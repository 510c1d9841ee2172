"""Benchmark evaluation: the built-in multiple-choice scorer equals a hand computation with transformers' GPT-2
logits; lm-eval through llmtrain's adapter scores the same items alike; bad tasks are one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, TINY_LM, compose, random_gpt2_export

pytestmark = pytest.mark.usefixtures("one_thread")
TASK_DIR = Path(__file__).parent / "lm_eval_task"
ITEMS = TASK_DIR / "items.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 export on the byte vocabulary, its weights scaled up so that endings score apart."""
    return random_gpt2_export(tmp_path_factory.mktemp("choice") / "model", n_positions=128)


def _by_hand(model_dir: Path) -> tuple[list[list[float]], float, float]:
    """Per-ending log-likelihoods from transformers' own GPT-2 logits, and acc / acc_norm as lm-eval defines them
    (argmax of the log-likelihood; of the log-likelihood over the ending's length in characters)."""
    from transformers import GPT2LMHeadModel

    from llmtrain.data.tokenizers import byte_tokenizer

    hf, tok = GPT2LMHeadModel.from_pretrained(model_dir).eval(), byte_tokenizer()
    lls, acc, norm = [], 0, 0
    items = [json.loads(ln) for ln in ITEMS.read_text().splitlines()]
    for it in items:
        ctx = it["context"].rstrip()  # trailing whitespace joins the ending, as lm-eval splits it
        row = []
        for e in it["endings"]:
            c, t = tok.encode(ctx), tok.encode(it["context"][len(ctx):] + " " + e)
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([c + t])).logits[0].double(), -1)
            row.append(sum(logp[len(c) - 1 + i, tok_id].item() for i, tok_id in enumerate(t)))
        lls.append(row)
        acc += int(np.argmax(row)) == it["label"]
        norm += int(np.argmax(np.array(row) / [len(e) for e in it["endings"]])) == it["label"]
    return lls, acc / len(items), norm / len(items)


def test_builtin_scorer_equals_a_hand_computation(model_dir: Path) -> None:
    from llmtrain.generation.choice import DELIMITER, encode_pair, read_items, score_items, score_pairs
    from llmtrain.generation.sources import load_source
    from llmtrain.precision import resolve

    lm, tok = load_source(str(model_dir))
    cpu, fp32 = torch.device("cpu"), resolve("fp32", torch.device("cpu"))
    lls, acc, acc_norm = _by_hand(model_dir)
    items = read_items(ITEMS)
    for it, want in zip(items, lls, strict=True):  # the endings' log-likelihoods, context masked
        got = [ll for ll, _ in score_pairs(lm, [encode_pair(tok, it["context"], DELIMITER + e)
                                                for e in it["endings"]], fp32, cpu)]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    out = score_items(lm, tok, items, fp32, cpu)
    assert out == {"acc": pytest.approx(acc), "acc_norm": pytest.approx(acc_norm), "n": 5}
    assert acc != acc_norm, (acc, acc_norm)  # the items tell the two metrics apart


def test_cli_writes_the_run_dir_table(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """tasks=<jsonl> on a run dir (here: a run whose final/ is the model): a table on stdout, eval/<task>.json."""
    import shutil

    from omegaconf import OmegaConf

    from llmtrain.generation.eval import run as eval_run

    run_dir = tmp_path / "run"
    shutil.copytree(model_dir, run_dir / "final")
    OmegaConf.save(compose([*TINY_LM, "model.n_positions=128"]), run_dir / "config.yaml")
    out = eval_run(compose([f"source={run_dir}", f"tasks={ITEMS}", "limit=3"], "eval"))
    assert out["items"]["n"] == 3
    assert json.loads((run_dir / "eval" / "items.json").read_text())["acc"] == out["items"]["acc"]
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[0].split() == ["task", "metric", "value"] and stdout[1].split()[:2] == ["items", "acc"]


def test_lm_eval_through_the_adapter_equals_the_builtin_scorer(model_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval")
    from llmtrain.generation.choice import read_items, score_items
    from llmtrain.generation.lm_eval_adapter import evaluate
    from llmtrain.generation.sources import load_source
    from llmtrain.precision import resolve

    monkeypatch.chdir(REPO)  # the task YAML's data_files is relative to the repo root
    lm, tok = load_source(str(model_dir))
    cpu, fp32 = torch.device("cpu"), resolve("fp32", torch.device("cpu"))
    ours = score_items(lm, tok, read_items(ITEMS), fp32, cpu)
    theirs = evaluate(lm, tok, "llmtrain_choice", cpu, fp32, batch_size=4, include_path=TASK_DIR)
    assert theirs["llmtrain_choice"]["acc"] == pytest.approx(ours["acc"])
    assert theirs["llmtrain_choice"]["acc_norm"] == pytest.approx(ours["acc_norm"])
    assert theirs["llmtrain_choice"]["n"] == 5


@pytest.mark.parametrize("line,message", [
    ('{"context": "a", "endings": ["b", "c"]}', "has no label"),
    ('{"context": "a", "endings": ["b", "c"], "label": 2}', "label must be an int in [0, 2)"),
    ('{"context": "a", "endings": [], "label": 0}', "endings must be a non-empty list"),
])
def test_a_bad_jsonl_is_one_line(line: str, message: str, model_dir: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    from llmtrain.generation.eval import run as eval_run

    bad = tmp_path / "bad.jsonl"
    bad.write_text(ITEMS.read_text().splitlines()[0] + "\n" + line + "\n")
    cfg = compose([f"source={model_dir}", f"tasks={bad}"], "eval")
    with pytest.raises(SystemExit) as ei:
        eval_run(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"llmtrain: error: tasks: {bad}:2: ") and message in err[0], err


def test_an_uncached_lm_eval_task_offline_is_one_line(model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("lm_eval")
    import time

    from llmtrain.generation.eval import run as eval_run

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)  # read when datasets was imported
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path)  # never cached, wherever it runs
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as ei:
        eval_run(compose([f"source={model_dir}", "tasks=hellaswag"], "eval"))
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("llmtrain: error: tasks: hellaswag: its data could not be loaded") and \
           "HF_DATASETS_OFFLINE" in err[0], err
    assert time.perf_counter() - t0 < 15


def test_adapter_rolling_and_generation(model_dir: Path) -> None:
    """loglikelihood_rolling of a text within the context is its log-likelihood after EOS; beyond the context
    it sums lm-eval's disjoint windows (every token scored once); generate_until is the engine's greedy text,
    cut at `until`."""
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    from llmtrain.generation import Generator
    from llmtrain.generation.lm_eval_adapter import LlmtrainLM
    from llmtrain.generation.sources import load_source

    lm, tok = load_source(str(model_dir))
    adapter = LlmtrainLM(lm, tok, "cpu", batch_size=3)
    short, long = "hello world", "hello world " * 30  # 11 and 360 tokens: the context is 128
    (rolled_short, rolled_long) = adapter.loglikelihood_rolling([SimpleNamespace(args=(short,)),
                                                                 SimpleNamespace(args=(long,))])
    assert rolled_short == pytest.approx(adapter.loglikelihood([SimpleNamespace(args=("", short))])[0][0], rel=1e-6)
    t = tok.encode(long)
    # lm-eval's disjoint windows: the first after EOS, then one token of context, the last one filled up to 128
    windows = [([tok.eos_token_id], t[:128]), (t[127:128], t[128:256]), (t[231:256], t[256:])]
    assert rolled_long == pytest.approx(sum(ll for ll, _ in adapter._score(windows)), rel=1e-6)
    gen = Generator(lm, tok, "cpu")
    full = gen("def main(", max_new_tokens=12, do_sample=False, stop_at_eos=True)[0].completion
    until = full[3:5]
    got = adapter.generate_until([SimpleNamespace(args=("def main(", {"until": [until], "max_gen_toks": 12}))])
    assert got == [full[:full.index(until)]]


def test_an_lm_eval_task_in_training_scores_as_lm_eval_does_on_the_export(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.bench_tasks=[<an lm-eval task YAML>]: its items built as lm-eval builds its requests, scored on the
    weights being trained; lm-eval itself, through the adapter, on the run's final/ (the same weights) agrees."""
    pytest.importorskip("lm_eval")
    from helpers import read_metrics

    from llmtrain.generation.choice import read_items
    from llmtrain.generation.lm_eval_adapter import evaluate, task_items
    from llmtrain.generation.sources import load_source
    from llmtrain.precision import resolve
    from llmtrain.train import run

    monkeypatch.chdir(REPO)  # the task YAML's data_files is relative to the repo root
    yaml_task = TASK_DIR / "llmtrain_choice.yaml"
    items = task_items(str(yaml_task))["llmtrain_choice"]
    assert [{k: v for k, v in it.items() if k != "delimiter"} for it in items] == read_items(ITEMS)
    assert {it["delimiter"] for it in items} == {" "}
    run_dir = tmp_path / "run"
    run(compose([*TINY_LM, "model.n_positions=128", "trainer.max_steps=3", "trainer.eval_every=0",
                 "trainer.bench_every=3", f"trainer.bench_tasks=[{yaml_task}]", "optim.lr=3e-2"]), run_dir)
    got = [r for r in read_metrics(run_dir) if "bench/llmtrain_choice/acc" in r]
    assert [r["step"] for r in got] == [3]
    lm, tok = load_source(str(run_dir / "final"))
    cpu = torch.device("cpu")
    want = evaluate(lm, tok, str(yaml_task), cpu, resolve("fp32", cpu), batch_size=4)["llmtrain_choice"]
    print(f"\nin training: {got[0]}; lm-eval on final/: {want}")
    assert got[0]["bench/llmtrain_choice/acc"] == pytest.approx(want["acc"], abs=1e-9)
    assert got[0]["bench/llmtrain_choice/acc_norm"] == pytest.approx(want["acc_norm"], abs=1e-9)


@pytest.mark.parametrize("text,message", [
    ("task: t\ndataset_path: json\nprocess_docs: !function utils.process_docs\n", "!function tags"),
    ("task: t\ninclude: other.yaml\n", "'include'"),
    ("dataset_path: json\n", "no 'task:' name"),
])
def test_a_task_yaml_that_could_run_code_is_refused(text: str, message: str, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    from llmtrain.errors import ConfigError
    from llmtrain.generation.lm_eval_adapter import task_ref

    (tmp_path / "utils.py").write_text("raise SystemExit('ran')\n")
    (tmp_path / "task.yaml").write_text(text)
    with pytest.raises(ConfigError) as ei:
        task_ref(str(tmp_path / "task.yaml"), "trainer.bench_tasks")
    assert ei.value.key == "trainer.bench_tasks" and message in ei.value.message and "\n" not in ei.value.message


def test_an_uncached_lm_eval_task_in_training_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("lm_eval")
    from llmtrain.train import run

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        run(compose([*TINY_LM, "trainer.max_steps=2", "trainer.bench_every=2", "trainer.bench_tasks=[hellaswag]"]),
            tmp_path / "run")
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("llmtrain: error")]
    assert ei.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("llmtrain: error: trainer.bench_tasks: hellaswag: its data could not be loaded"), err
