"""Prompt/completion data (`data=instruct`): loss on completion tokens only, packed rows equal to padded ones
(with the attention mask, not without), truncation, the token cache, chat templates, one-line input errors and
a short training run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import compose, losses, read_metrics

from llmtrain.data.instruct import (
    InstructDataConfig,
    InstructDataModule,
    encode_file,
    rows,
)
from llmtrain.data.tokenizers import byte_tokenizer
from llmtrain.errors import ConfigError
from llmtrain.models.base import DataInfo, get_model_spec
from llmtrain.models.gpt2 import GPT2ModelConfig, document_mask
from llmtrain.models.gpt2_native import GPT2, IGNORE_INDEX, GPT2Dims

pytestmark = pytest.mark.usefixtures("one_thread")
EOS = 256  # the byte tokenizer's <|endoftext|>
TOK = byte_tokenizer()
PAIRS = [("2+2=", "4"), ("the capital of France is ", "Paris"), ("x", "yz"), ("hello, ", "world!"),
         ("abc -> ", "ABC"), ("", "no prompt"), ("long prompt " * 3, "ok")]


def ids(s: str) -> list[int]:
    return TOK.encode(s)


def text(tokens: list[int]) -> str:
    return TOK.decode(tokens)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMTRAIN_CACHE", str(tmp_path / "cache"))


def jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def pairs_file(path: Path, pairs: list[tuple[str, str]] = PAIRS) -> Path:
    return jsonl(path, [{"prompt": p, "completion": c} for p, c in pairs])


def module(tmp_path: Path, **kw: Any) -> InstructDataModule:
    """All of `source` trains (val_source: a one-line file) unless kw says otherwise."""
    if "val_source" not in kw and "val_fraction" not in kw:
        kw["val_source"] = str(pairs_file(tmp_path / "val.jsonl", [("q", "a")]))
    if "source" not in kw:
        kw["source"] = str(pairs_file(tmp_path / "train.jsonl"))
    return InstructDataModule(InstructDataConfig(tokenizer="byte", **{"seq_len": 64, **kw}))


def tiny_gpt2() -> GPT2:
    torch.manual_seed(0)
    return GPT2(GPT2Dims(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()


def test_prompt_tokens_carry_no_loss(tmp_path: Path) -> None:
    dm = module(tmp_path)
    ds = dm.split("train")
    batch = ds.get(np.arange(len(ds)))  # padded to the longest example
    assert set(batch) == {"input_ids", "labels"} and len(ds) == len(PAIRS)
    for r, (p, c) in enumerate(PAIRS):
        toks = ids(p + c) + [EOS]
        n = len(toks) - 1
        assert batch["input_ids"][r, :n].tolist() == toks[:-1]
        assert (batch["input_ids"][r, n:] == EOS).all()  # right padding
        want = [IGNORE_INDEX] * max(0, len(p) - 1) + toks[max(1, len(p)):]  # targets: completion + EOS only
        assert batch["labels"][r, :n].tolist() == want
        assert (batch["labels"][r, n:] == IGNORE_INDEX).all()
    spec, model = get_model_spec("gpt2"), tiny_gpt2()
    with torch.no_grad():
        loss_sum, count = spec.loss(model, batch)
        # the same sum from the full logits, over the completion targets only
        logits = model(batch["input_ids"])  # [B, T, V]
        manual = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum")
        assert int(count) == sum(len(c) + (1 if p else 0) for p, c in PAIRS)  # no prompt: 1st token has no target
        assert int(count) == spec.count(batch)
        assert math.isclose(float(loss_sum), float(manual), rel_tol=1e-5)
        # a prompt token changed (as a target): the same labels, so with the same inputs the same loss
        r, p = 1, len(PAIRS[1][0])
        changed = [(q.replace("France", "Frxnce"), c) for q, c in PAIRS]
        (tmp_path / "other").mkdir()
        other = module(tmp_path / "other", source=str(pairs_file(tmp_path / "changed.jsonl", changed)))
        other_labels = other.split("train").get(np.arange(len(PAIRS)))["labels"]
        assert torch.equal(other_labels, batch["labels"])
        assert float(spec.loss(model, {**batch, "labels": other_labels})[0]) == float(loss_sum)
        # a completion token changed (as a target): a different loss
        completion_changed = {**batch, "labels": batch["labels"].clone()}
        completion_changed["labels"][r, p] = ids("Q")[0]
        assert float(spec.loss(model, completion_changed)[0]) != float(loss_sum)


def test_packed_equals_padded_only_with_the_document_mask(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    padded, packed = module(tmp_path), module(tmp_path, packing=True)
    out = capsys.readouterr().out
    assert "padded per batch" in out and f"packed into {len(packed.split('train'))} rows of 64" in out
    assert (packed.info.packed, packed.info.needed_vocab) == (True, 257) and padded.info.packed is False
    pb = packed.split("train").get(np.arange(len(packed.split("train"))))
    assert set(pb) == {"input_ids", "labels", "position_ids", "doc_ids"} and pb["input_ids"].shape[1] == 64
    assert len(pb["input_ids"]) < len(PAIRS)  # several examples share a row
    row0 = pb["doc_ids"][0]
    first = int((row0 == 1).sum())
    assert pb["position_ids"][0, :first].tolist() == list(range(first)) and pb["position_ids"][0, first] == 0
    assert (pb["labels"][pb["doc_ids"] == 0] == IGNORE_INDEX).all() and (pb["input_ids"][pb["doc_ids"] == 0] == EOS).all()
    ab = padded.split("train").get(np.arange(len(PAIRS)))
    spec, model = get_model_spec("gpt2"), tiny_gpt2()
    with torch.no_grad():
        s_pad, n_pad = spec.loss(model, ab)
        s_pack, n_pack = spec.loss(model, pb)
        assert int(n_pad) == int(n_pack)
        assert math.isclose(float(s_pack), float(s_pad), rel_tol=1e-5)
        # without the mask (plain causal attention across examples) the packed loss is wrong
        s_causal, _ = model(pb["input_ids"], pb["labels"], position_ids=pb["position_ids"])
        assert not math.isclose(float(s_causal), float(s_pad), rel_tol=1e-5)
        assert abs(float(s_causal - s_pad)) > 20 * abs(float(s_pack - s_pad))
    mask = document_mask(torch.tensor([[1, 1, 2, 2, 0]]))
    assert mask.shape == (1, 1, 5, 5)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                                         [0, 0, 0, 0, 1]]


def test_packed_data_needs_the_native_model() -> None:
    with pytest.raises(ConfigError) as ei:
        get_model_spec("gpt2").build(GPT2ModelConfig(impl="hf"), DataInfo(task="lm", vocab_size=257, packed=True))
    assert ei.value.key == "data.packing" and "model.impl=native" in ei.value.message


def test_truncate_keeps_the_completion_and_skip_drops(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    long_prompt, long_completion = "P" * 40, "C" * 30
    pairs = [("short ", "one"), (long_prompt, "tail"), ("p", long_completion), ("ok ", "two")]
    src = pairs_file(tmp_path / "long.jsonl", pairs)
    seq = 16
    dm = module(tmp_path, source=str(src), seq_len=seq)
    assert "4 train / 1 val examples (2 truncated)" in capsys.readouterr().out
    ds = dm.split("train")
    b = ds.get(np.arange(4))
    # left truncation: the last prompt tokens, then the whole completion and EOS
    kept = ids(long_prompt)[-(seq + 1 - 5):] + ids("tail") + [EOS]
    assert b["input_ids"][1].tolist() == kept[:-1] and len(kept) - 1 == seq
    assert [t for t in b["labels"][1].tolist() if t != IGNORE_INDEX] == ids("tail") + [EOS]
    # a completion longer than the row: its first seq_len + 1 tokens, no prompt
    assert b["input_ids"][2].tolist() == ids(long_completion)[:seq]
    assert b["labels"][2].tolist() == ids(long_completion)[1 : seq + 1]
    dm = module(tmp_path, source=str(src), seq_len=seq, too_long="skip")
    assert "2 train / 1 val examples (2 skipped)" in capsys.readouterr().out
    got = dm.split("train").get(np.arange(2))["input_ids"]
    assert got[0, :9].tolist() == ids("short one") and got[1, :6].tolist() == ids("ok two")
    # rows() directly: counts, and an untouched example when it fits
    enc = encode_file(src, InstructDataConfig(source=str(src)), byte_tokenizer(), "data.source")
    assert rows(enc, np.arange(4), seq, "truncate")[1:] == (2, 0)
    assert rows(enc, np.arange(4), seq, "skip")[1:] == (0, 2)
    assert rows(enc, np.arange(4), 64, "truncate")[1:] == (0, 0)


def test_tokens_are_cached_and_a_changed_source_is_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llmtrain.data.instruct as instruct

    src = pairs_file(tmp_path / "train.jsonl")
    module(tmp_path, source=str(src))
    cache_dir = tmp_path / "cache" / "instruct"
    files = sorted(cache_dir.glob("*.npz"))  # train and val
    assert len(files) == 2 and not list(cache_dir.glob(".*tmp*"))
    mtimes = {p: p.stat().st_mtime_ns for p in files}

    def no_reading(*a: Any, **k: Any) -> Any:
        raise AssertionError("the cache should have been read")

    monkeypatch.setattr(instruct, "read_records", no_reading)
    dm = module(tmp_path, source=str(src), packing=True)  # packing and seq_len are applied at load time
    assert len(dm.split("train")) >= 1
    assert {p: p.stat().st_mtime_ns for p in sorted(cache_dir.glob("*.npz"))} == mtimes
    monkeypatch.undo()
    monkeypatch.setenv("LLMTRAIN_CACHE", str(tmp_path / "cache"))
    pairs_file(src, [*PAIRS, ("new ", "example")])
    dm = module(tmp_path, source=str(src))
    assert len(dm.split("train")) == len(PAIRS) + 1 and len(list(cache_dir.glob("*.npz"))) == 3
    with np.load(sorted(cache_dir.glob("*.npz"), key=lambda p: p.stat().st_mtime_ns)[-1]) as z:
        assert z["tokens"].dtype == np.int32 and set(z.files) == {"tokens", "offsets", "targets"}


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


def example_of(enc: dict[str, np.ndarray], i: int) -> tuple[list[int], list[bool]]:
    a, b = int(enc["offsets"][i]), int(enc["offsets"][i + 1])
    return enc["tokens"][a:b].tolist(), enc["targets"][a:b].astype(bool).tolist()


def target_runs(tokens: list[int], targets: list[bool]) -> list[list[int]]:
    """The runs of consecutive target tokens (one per assistant turn)."""
    runs: list[list[int]] = []
    for t, (tok, on) in enumerate(zip(tokens, targets, strict=True)):
        if on:
            if t == 0 or not targets[t - 1]:
                runs.append([])
            runs[-1].append(tok)
    return runs


def test_chat_messages_plain_and_chat_template(tmp_path: Path) -> None:
    """Every assistant turn is a target (answer + end-of-turn), the rest is not: with llmtrain's plain template
    and with a tokenizer's own template (here one that ends every turn with EOS: no second EOS at the end)."""
    src = jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    tok = byte_tokenizer()
    enc = encode_file(src, InstructDataConfig(source=str(src), template="plain"), tok, "data.source")
    tokens, targets = example_of(enc, 0)
    assert text(tokens) == ("### System:\nbe brief\n\n### User:\nhi\n\n### Assistant:\nhello<|endoftext|>\n\n"
                            "### User:\n2+2?\n\n### Assistant:\n4<|endoftext|>")
    assert target_runs(tokens, targets) == [ids("hello") + [EOS], ids("4") + [EOS]]
    # a tokenizer dir with a chat template: template=auto renders with it, template=plain does not
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    cfg_path = tok_dir / "tokenizer_config.json"
    chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}"
                     "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "chat_template": chat_template}))
    dm = InstructDataModule(InstructDataConfig(source=str(src), val_source=str(src), tokenizer=str(tok_dir)))
    assert dm.info.tokenizer.chat_template == chat_template
    enc = encode_file(src, InstructDataConfig(source=str(src)), dm.info.tokenizer, "data.source")
    rendered = "<|endoftext|><system>be brief<|endoftext|><user>hi<|endoftext|><assistant>hello<|endoftext|>" \
               "<user>2+2?<|endoftext|><assistant>4<|endoftext|>"
    tokens, targets = example_of(enc, 0)
    assert tokens == dm.info.tokenizer.encode(rendered) and tokens.count(EOS) == 6
    assert target_runs(tokens, targets) == [ids("hello") + [EOS], ids("4") + [EOS]]
    enc = encode_file(src, InstructDataConfig(source=str(src), template="plain"), dm.info.tokenizer, "data.source")
    assert text(example_of(enc, 0)[0]).startswith("### System:\nbe brief\n\n")
    # without a chat template, template=auto is refused with one line naming data.template
    with pytest.raises(ConfigError) as ei:
        encode_file(src, InstructDataConfig(source=str(src)), tok, "data.source")
    assert ei.value.key == "data.template" and "chat.jsonl:1" in ei.value.message
    assert "data.template=plain" in ei.value.message and "\n" not in str(ei.value)


BAD_LINES = [
    (['{"prompt": "a", "completion": "b"}', "{not json"], "data.source", "bad.jsonl:2: not JSON"),
    (['{"prompt": "a", "answer": "b"}'], "data.source",
     "bad.jsonl:1: no 'completion' field (it has: prompt, answer); set data.completion_field"),
    (['{"prompt": "a", "completion": "b"}', "", '{"prompt": "a", "completion": "  "}'], "data.source",
     "bad.jsonl:3: empty completion"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], "data.source",
     "bad.jsonl:1: the last message must be the assistant's"),
    (['{"messages": "hi"}'], "data.source", "bad.jsonl:1: 'messages' must be a list of {role, content}"),
    (['{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}'], "data.source",
     "bad.jsonl:1: 'messages' must be a list of {role, content}"),
    (['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}'], "data.source",
     "bad.jsonl:1: empty completion"),
    (['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'], "data.template",
     "bad.jsonl:1: chat messages are rendered by the tokenizer's chat template and this tokenizer has none"),
    (["[1, 2]"], "data.source", "bad.jsonl:1: not a JSON object"),
    ([], "data.source", "holds no examples"),
]


@pytest.mark.parametrize("lines,key,message", BAD_LINES)
def test_bad_input_is_one_line_naming_key_and_line(tmp_path: Path, lines: list[str], key: str, message: str) -> None:
    src = jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ConfigError) as ei:
        module(tmp_path, source=str(src))
    assert ei.value.key == key and message in ei.value.message and "\n" not in str(ei.value)


def test_bad_settings(tmp_path: Path) -> None:
    good = str(pairs_file(tmp_path / "train.jsonl"))
    cases = [
        (dict(source=""), "data.source", "set it"),
        (dict(source=str(tmp_path / "missing.jsonl")), "data.source", "file not found"),
        (dict(source=good, too_long="cut"), "data.too_long", "truncate, skip"),
        (dict(source=good, template="chatml"), "data.template", "auto, plain"),
        (dict(source=good, tokenizer="bpe"), "data.tokenizer", "bpe"),
        (dict(source=good, tokenizer=None), "data.tokenizer", "model.pretrained"),
        (dict(source=good, val_source=str(jsonl(tmp_path / "v.jsonl", ["oops"]))), "data.val_source",
         "v.jsonl:1: not JSON"),
        (dict(source=good, seq_len=4, too_long="skip"), "data.seq_len", "data.too_long=skip"),
        (dict(source=str(pairs_file(tmp_path / "one.jsonl", [("a", "b")])), val_fraction=0.5), "data.val_fraction",
         "leaving none"),
    ]
    for kw, key, message in cases:
        kw = {"tokenizer": "byte", **kw}
        with pytest.raises(ConfigError) as ei:
            InstructDataModule(InstructDataConfig(**kw))
        assert ei.value.key == key and message in ei.value.message, (kw, ei.value)


def test_val_fraction_holds_out_a_fixed_sample(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pairs = [(f"q{i} ", f"a{i}") for i in range(20)]
    src = pairs_file(tmp_path / "many.jsonl", pairs)
    a = InstructDataModule(InstructDataConfig(source=str(src), tokenizer="byte", val_fraction=0.1))
    b = InstructDataModule(InstructDataConfig(source=str(src), tokenizer="byte", val_fraction=0.1))
    assert "18 train / 2 val examples" in capsys.readouterr().out
    va, vb = (m.split("val").get(np.arange(2))["input_ids"] for m in (a, b))
    assert torch.equal(va, vb)


def test_training_on_completions(tmp_path: Path) -> None:
    """A short run: every step's targets are the completion tokens (+ EOS) of its batch, the loss falls."""
    from llmtrain.train import run

    pairs = [(f"{w} -> ", w.upper()) for w in ("ab", "cd", "ef", "gh", "ij", "kl", "mn", "op")]
    train = pairs_file(tmp_path / "train.jsonl", pairs)
    val = pairs_file(tmp_path / "val.jsonl", pairs[:4])
    overrides = ["experiment=gpt2_tiny", "data=instruct", f"data.source={train}", f"data.val_source={val}",
                 "data.tokenizer=byte", "data.seq_len=16", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
                 "model.n_positions=16", "trainer.micro_batch_size=8", "trainer.max_steps=30",
                 "trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.eval_batches=1", "trainer.sample_tokens=0",
                 "logger.log_every=1", "logger.progress=false", "scheduler.warmup_steps=2", "optim.lr=1e-2"]
    cfg = compose(overrides)
    assert cfg.data.kind == "instruct"
    last = run(cfg, tmp_path / "run")
    steps = [m for m in read_metrics(tmp_path / "run") if "targets" in m]
    assert steps and all(m["targets"] == sum(len(c) + 1 for _, c in pairs) for m in steps)  # the whole set per step
    loss = losses(tmp_path / "run")
    assert loss[30] < 0.5 * loss[1] and math.isfinite(last["eval_loss"])
