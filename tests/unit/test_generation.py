"""Generation engine: greedy ≡ HF `generate` token for token (batch 1, uneven batches, up to the context end,
with and without a cache), batched ≡ one by one, seeded sampling, processors, stop strings, streaming,
context overflow, every source kind, perplexity eval, and the exported model in a transformers pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_LM, compose, random_gpt2_export, read_metrics

from llmtrain.errors import ConfigError
from llmtrain.generation import GenerationConfig, Generator
from llmtrain.generation.engine import _Rows
from llmtrain.generation.sampling import SamplingConfig, process, top_k_filter, top_p_filter
from llmtrain.train import run

pytestmark = pytest.mark.usefixtures("one_thread")
CTX = 64
STEPS = 300
TRAIN = [*TINY_LM, "model.n_embd=64", f"model.n_positions={CTX}", f"trainer.max_steps={STEPS}",
         "trainer.micro_batch_size=16", "optim.lr=3e-3", "trainer.eval_every=0", f"trainer.ckpt_every={STEPS}",
         "trainer.eval_batches=2", "logger.log_every=50", "data.tokenizer=bpe", "data.vocab_size=512",
         "data.embedded_max_bytes=400000", "trainer.sample_tokens=16", f"trainer.sample_every={STEPS // 2}",
         'trainer.sample_prompts=["def ", "x = "]', "trainer.sample_temperature=0"]
PROMPTS = ["def main(", "x", "class Foo:", "if x"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny GPT-2 trained long enough that greedy output is varied text, not one token repeated
    (a random model hides cache and position bugs)."""
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    run(compose([*TRAIN, f"hydra.run.dir={run_dir}"]), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def gen(trained: Path) -> Generator:
    return Generator.from_pretrained(trained / "final", device="cpu")


@pytest.fixture(scope="module")
def hf(trained: Path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(trained / "final").eval()


def _hf_greedy(hf, tok, prompts: list[str], n: int, use_cache: bool = True) -> list[str]:
    """HF generate over a left-padded batch (transformers' own padding and masking)."""
    rows = [tok.encode(p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.eos_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=tok.eos_token_id, use_cache=use_cache)
    return [tok.decode(o[width:].tolist()) for o in out]


def test_greedy_equals_hf_generate(gen: Generator, hf) -> None:
    n = 40
    ours = gen(PROMPTS, max_new_tokens=n, do_sample=False, stop_at_eos=False)
    assert all(len(set(gen.tok.encode(c.completion))) >= 6 for c in ours), [c.completion for c in ours]
    for p, c in zip(PROMPTS, ours, strict=True):  # batch 1 each
        assert c.completion == _hf_greedy(hf, gen.tok, [p], n)[0]
    # an uneven batch, transformers' left padding against ours, with and without its cache
    assert [c.completion for c in ours] == _hf_greedy(hf, gen.tok, PROMPTS, n)
    assert [c.completion for c in ours] == _hf_greedy(hf, gen.tok, PROMPTS, n, use_cache=False)
    # batched ≡ one by one, and any batch size
    assert [c.completion for c in ours] == [gen(p, max_new_tokens=n, do_sample=False, stop_at_eos=False)[0].completion
                                            for p in PROMPTS]
    assert [c.completion for c in gen(PROMPTS, max_new_tokens=n, do_sample=False, stop_at_eos=False,
                                      batch_size=3)] == [c.completion for c in ours]


def test_greedy_without_a_cache_and_to_the_context_end(gen: Generator, hf) -> None:
    """Our cached decoding ≡ recomputing the whole sequence each step; a prompt may fill the context."""
    prompt = "def main():\n    return "
    ids = gen.tok.encode(prompt)
    n = CTX - len(ids)  # exactly to the context end
    ours = gen(prompt, max_new_tokens=n, do_sample=False, stop_at_eos=False)[0]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(gen.model(torch.tensor([seq]))[0, -1].argmax()))
    assert gen.tok.encode(ours.completion) == seq[len(ids):] and ours.completion_tokens == n
    assert ours.completion == _hf_greedy(hf, gen.tok, [prompt], n)[0]
    with pytest.raises(ConfigError) as ei:  # one more token than fits: the error policy says so
        gen(prompt, max_new_tokens=n + 1, do_sample=False)
    assert ei.value.key == "max_new_tokens" and f"context of {CTX} tokens" in str(ei.value)
    slid = gen(prompt, max_new_tokens=3 * CTX, do_sample=False, stop_at_eos=False, overflow="slide")[0]
    assert slid.completion_tokens == 3 * CTX and slid.completion.startswith(ours.completion)


def test_seeded_sampling(gen: Generator) -> None:
    kw = dict(max_new_tokens=30, temperature=1.0, top_k=40, top_p=0.95, stop_at_eos=False)
    a = gen(PROMPTS, seed=3, num_samples=2, **kw)
    b = gen(PROMPTS, seed=3, num_samples=2, batch_size=1, **kw)  # another batching: the same texts
    c = gen(PROMPTS, seed=4, num_samples=2, **kw)
    assert [x.text for x in a] == [x.text for x in b]
    assert [x.text for x in a] != [x.text for x in c]
    assert a[0].text != a[1].text  # two samples of one prompt differ
    assert [(x.prompt_index, x.sample_index) for x in a[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_processors_keep_exactly_the_right_tokens() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

    probs = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]])
    logits = probs.log()
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.71)).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.01)).tolist() == [[True, False, False, False, False]]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, generator=g)
    ids = torch.randint(0, 50, (3, 7), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    for k, p in ((5, 1.0), (0, 0.8), (10, 0.5)):
        ours = process(x, SamplingConfig(temperature=0.7, top_k=k, top_p=p, repetition_penalty=1.3), seen)
        ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, x.clone()) / 0.7
        ref = TopPLogitsWarper(p)(ids, TopKLogitsWarper(k)(ids, ref) if k else ref)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
        torch.testing.assert_close(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])


def test_stop_strings_eos_and_streaming(gen: Generator) -> None:
    free = gen("def main(", max_new_tokens=40, do_sample=False, stop_at_eos=False)[0]
    stop = free.completion[5:8]  # a string the greedy text is known to contain
    cut = gen("def main(", max_new_tokens=40, do_sample=False, stop_at_eos=False, stop=[stop, "@@never@@"])[0]
    assert cut.finish_reason == "stop" and cut.completion == free.completion[:free.completion.find(stop)]
    pieces: list[str] = []
    streamed = gen("def main(", max_new_tokens=40, do_sample=False, stop_at_eos=False, stop=[stop],
                   on_text=lambda i, j, piece: pieces.append(piece))[0]
    assert pieces[-1] is None and "".join(pieces[:-1]) == streamed.completion == cut.completion
    assert "".join(gen.stream("def main(", max_new_tokens=40, do_sample=False, stop_at_eos=False)) == free.completion
    eos = gen.tok.eos_token
    ending = gen(eos, max_new_tokens=60, do_sample=False)  # after <|endoftext|> the model starts a document...
    assert ending[0].finish_reason in ("eos", "length")


def test_streaming_holds_back_partial_characters() -> None:
    """Byte tokens split 'é' and '世' over several tokens: no piece may show half a character."""
    from llmtrain.data.tokenizers import byte_tokenizer

    tok = byte_tokenizer()
    text = "héllo, 世界! ok"
    pieces: list[str | None] = []
    rows = _Rows(tok, 1, GenerationConfig(stop=["ok"]), lambda i, p: pieces.append(p))
    for t in tok.encode(text):
        rows.push([t], tok.eos_token_id)
    rows.results()
    shown = [p for p in pieces if p is not None]
    assert all("\ufffd" not in p for p in shown) and "".join(shown) == "héllo, 世界! "
    assert rows.finish == ["stop"] and pieces[-1] is None


def test_every_source_kind(trained: Path, gen: Generator, tmp_path: Path) -> None:
    want = gen(PROMPTS, max_new_tokens=20, do_sample=False, stop_at_eos=False)
    run_copy = tmp_path / "run"
    shutil.copytree(trained, run_copy)
    from_run = Generator.from_pretrained(run_copy, device="cpu")  # its final/
    shutil.rmtree(run_copy / "final")
    from_ckpt = Generator.from_pretrained(run_copy, device="cpu")  # its newest checkpoint, in memory
    from transformers import GPT2LMHeadModel

    hf_dir = tmp_path / "hf"
    GPT2LMHeadModel.from_pretrained(trained / "final").save_pretrained(hf_dir)  # transformers' own files
    gen.tok.save_pretrained(hf_dir)
    from_hf = Generator.from_pretrained(hf_dir, device="cpu")
    for g in (from_run, from_ckpt, from_hf):
        assert [c.text for c in g(PROMPTS, max_new_tokens=20, do_sample=False, stop_at_eos=False)] == \
               [c.text for c in want]
    for bad, key in ((tmp_path / "nothing", "source"), (trained / "checkpoints", "source")):
        with pytest.raises(ConfigError) as ei:
            Generator.from_pretrained(bad)
        assert ei.value.key == key


def test_transformers_pipeline_loads_the_export(trained: Path, gen: Generator) -> None:
    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(trained / "final"), device="cpu")
    out = pipe("def main(", max_new_tokens=20, do_sample=False, pad_token_id=gen.eos)[0]["generated_text"]
    assert out == gen("def main(", max_new_tokens=20, do_sample=False, stop_at_eos=False)[0].text


def test_eval_equals_the_trainer_eval_loss(trained: Path, capsys: pytest.CaptureFixture) -> None:
    from llmtrain.generation.eval import run as eval_run

    cfg = compose(TRAIN)
    recorded = [r["eval_loss"] for r in read_metrics(trained) if "eval_loss" in r][-1]
    out = eval_run(_eval_cfg(trained / "final", cfg, batches=2))
    assert out["eval_loss"] == pytest.approx(recorded, rel=1e-6) and out["tokens"] == 2 * 16 * cfg.data.seq_len
    assert capsys.readouterr().out.startswith(f"eval_loss={out['eval_loss']:.6g} perplexity=")


def _eval_cfg(source: Path, train_cfg, batches: int):
    from omegaconf import OmegaConf

    from llmtrain.generation.eval import EvalConfig

    cfg = OmegaConf.structured(EvalConfig)
    cfg.source, cfg.batch_size, cfg.batches = str(source), 16, batches
    cfg.data = train_cfg.data
    return cfg


@pytest.mark.parametrize("override,key", [
    ("top_p=1.5", "top_p"), ("temperature=-1", "temperature"), ("num_samples=0", "num_samples"),
    ("max_new_tokens=0", "max_new_tokens"), ("precision=fp8", "precision"), ("device=tpu", "device"),
    ("source=/no/such/dir", "source"), ("max_new_tokens=1000", "max_new_tokens"),
])
def test_bad_generate_input_is_one_line(override: str, key: str, trained: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    from llmtrain.generation.cli import run as gen_run

    cfg = compose([f"source={trained}", "prompt=x", override], "generate")
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        gen_run(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(err) == 1 and err[0].startswith(f"llmtrain: error: {key}: "), err


def test_samples_during_training(trained: Path) -> None:
    """trainer.sample_every writes samples.jsonl; the end-of-run sample is the same code at the last step."""
    recs = [json.loads(ln) for ln in (trained / "samples.jsonl").read_text().splitlines()]
    half = STEPS // 2
    assert [(r["step"], r["prompt"]) for r in recs] == [(half, "def "), (half, "x = "), (STEPS, "def "), (STEPS, "x = ")]
    assert all(r["text"].startswith(r["prompt"]) and len(r["text"]) > len(r["prompt"]) for r in recs)
    assert (trained / "samples.txt").read_text() == recs[2]["text"] + "\n\n" + recs[3]["text"] + "\n"
    # greedy: the end-of-run samples are what the exported model generates
    final = Generator.from_pretrained(trained / "final", device="cpu")
    assert [c.text for c in final(["def ", "x = "], max_new_tokens=16, do_sample=False, stop_at_eos=True)] == \
           [recs[2]["text"], recs[3]["text"]]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """A tiny random GPT-2 export on the byte vocabulary (loss bookkeeping needs no trained model). Its weights
    are scaled up: at the usual init greedy decoding repeats one token whatever the context, which would hide
    a masking or cache bug."""
    return random_gpt2_export(tmp_path_factory.mktemp("random") / "model", n_positions=64)


def _eval_app(overrides: list[str]) -> dict:
    """llmtrain-eval's run on the config its command line composes."""
    from llmtrain.generation.eval import run as eval_run

    return eval_run(compose(overrides, "eval"))


def test_eval_scores_every_block_in_any_batch_size(random_model: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """93 val blocks in batches of 8 (the last one of 5) all count; a batch larger than the split is one
    batch; the mean equals the loss of all blocks at once; a prepared dir gives what its raw text gives."""
    from llmtrain.data.prepared import prepare
    from llmtrain.data.shards import read_meta
    from llmtrain.data.text import TextDataConfig, TokenBlocks
    from llmtrain.models.gpt2_native import load_hf

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox\n" for i in range(52)))  # 1498 bytes + EOS
    data = [f"data.source={corpus}", "data.seq_len=8", "data.val_fraction=0.5"]
    out = _eval_app([f"source={random_model}", *data, "batch_size=8", "batches=0"])
    prepared = prepare(TextDataConfig(source=str(corpus), tokenizer=str(random_model), seq_len=8, val_fraction=0.5,
                                      out_dir=str(tmp_path / "prepared")), quiet=True)
    meta = read_meta(prepared)
    blocks = TokenBlocks([prepared / s["file"] for s in meta["shards"]["val"]], meta["dtype"], 8)
    assert len(blocks) == 93 and out["blocks"] == 93 and out["tokens"] == 93 * 8
    model = load_hf(random_model).eval()
    with torch.no_grad():
        batch = blocks.get(np.arange(93))
        loss_sum, count = model(batch["input_ids"], labels=batch["labels"])
    assert out["eval_loss"] == pytest.approx(float(loss_sum) / float(count), rel=1e-6)
    assert "93 blocks of 8 tokens in 12 batches of up to 8" in capsys.readouterr().err
    whole = _eval_app([f"source={random_model}", *data, "batch_size=1000"])  # beyond the split's 93 blocks
    assert whole["blocks"] == 93 and whole["eval_loss"] == pytest.approx(out["eval_loss"], rel=1e-6)
    part = _eval_app([f"source={random_model}", *data, "batch_size=8", "batches=3"])
    assert part["blocks"] == 24 and part["tokens"] == 24 * 8
    from_prepared = _eval_app([f"source={random_model}", f"data.source={prepared}", "data.seq_len=8",
                               "batch_size=8"])
    assert from_prepared == out


def _generate_app(overrides: list[str]) -> list:
    """llmtrain-generate's run on the config its command line composes."""
    from llmtrain.generation.cli import run as gen_run

    return gen_run(compose(overrides, "generate"))


@pytest.mark.parametrize("prompt,max_new,key", [("x" * 64, 1, "prompt"), ("x" * 70, 5, "prompt"),
                                                ("x" * 63, 2, "max_new_tokens")])
def test_a_prompt_beyond_the_context_names_prompt(random_model: Path, prompt: str, max_new: int, key: str,
                                                  capsys: pytest.CaptureFixture) -> None:
    """The prompt alone leaving no room for a token is the prompt's fault; one that fits but not with
    max_new_tokens more is max_new_tokens' (context: 64 byte tokens)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        _generate_app([f"source={random_model}", f"prompt={prompt}", f"max_new_tokens={max_new}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(err) == 1 and err[0].startswith(f"llmtrain: error: {key}: "), err
    assert "context of 64 tokens" in err[0]


def test_generate_from_a_prompts_file(random_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One prompt per non-empty line, in order; stdout holds each sample and a newline."""
    prompts = ["def main(", "x = 1", "class A:"]
    path = tmp_path / "prompts.txt"
    path.write_text(f"{prompts[0]}\n\n{prompts[1]}\n{prompts[2]}\n")
    want = Generator.from_pretrained(random_model, device="cpu")(prompts, max_new_tokens=6, do_sample=False)
    capsys.readouterr()
    out = _generate_app([f"source={random_model}", f"prompts_file={path}", "max_new_tokens=6", "do_sample=false"])
    assert [c.prompt for c in out] == prompts and [c.text for c in out] == [c.text for c in want]
    assert capsys.readouterr().out == "".join(c.text + "\n" for c in want)


def test_compiled_decoding_equals_eager(random_model: Path, tmp_path: Path) -> None:
    """compile=true (one static-shape decode graph, padded rows masked) gives the eager greedy text."""
    prompts = ["def main(", "x"]  # uneven: the shorter row is left-padded
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    args = [f"source={random_model}", f"prompts_file={path}", "max_new_tokens=8", "do_sample=false",
            "stop_at_eos=false", "device=cpu"]
    eager = _generate_app(args)
    compiled = _generate_app([*args, "compile=true"])
    assert [c.completion_tokens for c in compiled] == [8, 8]
    assert all(len(set(c.completion)) > 2 for c in eager)  # varied text, not one token repeated
    assert [c.text for c in compiled] == [c.text for c in eager]
