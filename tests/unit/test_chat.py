"""Chat fine-tuning: conversations rendered by the tokenizer's own chat template, the loss on every assistant
turn (answer + end-of-turn token) checked token by token against transformers' assistant mask (templates with
`{% generation %}` markers, and the same templates without them, where the mask is derived from prefixes), the
tokenizer's EOS at the end (never twice), one-line refusals, and a tiny model that learns a made-up mapping from
chats and answers it through `llmtrain-generate chat=true`."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import TINY_LM, base_env, compose, fork_cli

from llmtrain.data.chat import (
    PLAIN_TEMPLATE,
    assistant_spans,
    encode,
    end_of_turn_id,
    generation_prompt,
    render,
    target_mask,
)
from llmtrain.data.instruct import InstructDataConfig, InstructDataModule
from llmtrain.data.tokenizers import Tokenizer, byte_tokenizer, train_bpe
from llmtrain.datainfo import IGNORE_INDEX
from llmtrain.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

# SmolLM2-Instruct's template (ChatML, a default system message), and the same with generation markers around
# the assistant's answer and its <|im_end|> (the newline after it is scaffolding)
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
           "<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2_MARKED = SMOLLM2.replace(
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
    "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}")
# Zephyr's template: role tokens, every turn ended by the EOS (</s>) and a newline
ZEPHYR = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + "
          "eos_token + '\n' }}{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token "
          "+ '\n' }}{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token "
          "+ '\n' }}{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
          "{% endfor %}")
ZEPHYR_MARKED = ZEPHYR.replace(
    "{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}",
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}")

CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]
ZEPHYR_SPECIALS = ["</s>", "<|user|>", "<|assistant|>", "<|system|>"]
# (template, its marked twin, added special tokens, EOS): SmolLM2-Instruct's EOS is <|im_end|>; a base model's
# tokenizer with the same template keeps <|endoftext|>; Zephyr's end-of-turn is the EOS
CASES = {
    "chatml-eos-endoftext": (SMOLLM2, SMOLLM2_MARKED, CHATML_SPECIALS, "<|endoftext|>"),
    "chatml-eos-im_end": (SMOLLM2, SMOLLM2_MARKED, CHATML_SPECIALS, "<|im_end|>"),
    "zephyr": (ZEPHYR, ZEPHYR_MARKED, ZEPHYR_SPECIALS, "</s>"),
}
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Hi there, how are you?"},
    {"role": "assistant", "content": " Fine, thanks!"},
    {"role": "user", "content": "What is 2+2?\nOnly the number."},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And in words, en français?"},
    {"role": "assistant", "content": "quatre (four)"},
]
CORPUS = ["Hi there, how are you? Fine, thanks! What is the number two plus two? four quatre, en français. "
          "You answer briefly, only the number in words."] * 8


@functools.cache
def _bpe_json() -> str:
    return train_bpe(CORPUS, 320).backend_tokenizer.to_str()


def tokenizer(specials: list[str], eos: str, template: str | None) -> Tokenizer:
    """A byte-level BPE (merges: words and their leading spaces are single tokens) with the template's special
    tokens added."""
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(_bpe_json())
    backend.add_special_tokens(specials)
    return Tokenizer(backend, eos, {"chat_template": template} if template else {})


def mask_of(tok: Any, template: str, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    text, spans = assistant_spans(template, tok, messages)
    enc = encode(tok, [text])[0]
    return enc.ids, [int(m) for m in target_mask(enc.offsets, spans)]


def runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The runs of consecutive masked tokens."""
    out: list[list[int]] = []
    for t, (i, m) in enumerate(zip(ids, mask, strict=True)):
        if m:
            if t == 0 or not mask[t - 1]:
                out.append([])
            out[-1].append(i)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_assistant_mask_equals_transformers_token_by_token(case: str, tmp_path: Path) -> None:
    """transformers' apply_chat_template(return_assistant_tokens_mask=True) on the marked template, against
    llmtrain's mask from the same markers and from the unmarked template (derived by rendering prefixes)."""
    from transformers import AutoTokenizer

    template, marked, specials, eos = CASES[case]
    tok = tokenizer(specials, eos, marked)
    tok.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    out = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    want_ids, want_mask = list(out["input_ids"]), list(out["assistant_masks"])
    assert render(template, tok, CONVERSATION) == render(marked, tok, CONVERSATION) == hf.decode(want_ids)
    assert sum(want_mask) > 0
    for source in (marked, template):
        ids, mask = mask_of(tok, source, CONVERSATION)
        assert ids == want_ids
        assert mask == want_mask, [(tok.decode([i]), m, w) for i, m, w in zip(ids, mask, want_mask, strict=True)]
    end = "<|im_end|>" if "im_end" in template else "</s>"
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs(ids, mask)] == [a + end for a in answers]  # answers + end-of-turn only


@pytest.mark.parametrize("case", list(CASES))
def test_training_rows_and_the_eos(case: str, tmp_path: Path) -> None:
    """data=instruct on chats: the labels are every assistant turn (answer + end-of-turn) and the tokenizer's
    EOS once at the end: appended when the end-of-turn token is not the EOS, not repeated when it is."""
    template, _, specials, eos = CASES[case]
    tok = tokenizer(specials, eos, template)
    tok.save_pretrained(tmp_path / "tok")
    src = tmp_path / "chats.jsonl"
    src.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"messages": CONVERSATION[1:3]}) + "\n")
    dm = InstructDataModule(InstructDataConfig(source=str(src), val_source=str(src), tokenizer=str(tmp_path / "tok"),
                                               seq_len=256))
    tok = dm.info.tokenizer
    assert tok.eos_token == eos and dm.info.eos_token_id == tok.backend_tokenizer.token_to_id(eos)
    batch = dm.split("train").get(np.arange(2))
    end = "<|im_end|>" if "im_end" in template else "</s>"
    for r, conv in enumerate((CONVERSATION, CONVERSATION[1:3])):
        ids, labels = batch["input_ids"][r].tolist(), batch["labels"][r].tolist()
        n = sum(1 for x in labels if x != IGNORE_INDEX)
        full = render(template, tok, conv)
        # the row: the rendering through the last assistant token (its scaffolding after it dropped), then EOS
        # only when the last token is not the EOS already
        through = full[: full.rindex(end) + len(end)]
        tokens = tok.encode(through) + ([] if end == eos else [tok.eos_token_id])
        assert tokens[-1] == tok.eos_token_id and tokens[-2] != tok.eos_token_id  # one EOS at the end
        assert ids[: len(tokens) - 1] == tokens[:-1] and labels[len(tokens) - 2] == tokens[-1]
        assert all(x == IGNORE_INDEX for x in labels[len(tokens) - 1:])  # padding: no targets
        target = [x if x != IGNORE_INDEX else None for x in labels]
        got = [tok.decode(run) for run in _label_runs(target)]
        answers = [m["content"] + end for m in conv if m["role"] == "assistant"]
        if end != eos:
            answers[-1] += eos
        assert got == answers and n == sum(len(tok.encode(a)) for a in answers)


def _label_runs(labels: list[int | None]) -> list[list[int]]:
    out: list[list[int]] = []
    prev = None
    for x in labels:
        if x is not None:
            if prev is None:
                out.append([])
            out[-1].append(x)
        prev = x
    return out


def test_end_of_turn_and_generation_prompt() -> None:
    chatml = tokenizer(CHATML_SPECIALS, "<|endoftext|>", SMOLLM2)
    zephyr = tokenizer(ZEPHYR_SPECIALS, "</s>", ZEPHYR)
    byte = byte_tokenizer()
    assert end_of_turn_id(chatml, SMOLLM2) == chatml.backend_tokenizer.token_to_id("<|im_end|>")
    assert end_of_turn_id(zephyr, ZEPHYR) == zephyr.eos_token_id
    assert end_of_turn_id(byte, PLAIN_TEMPLATE) == byte.eos_token_id
    assert generation_prompt(SMOLLM2, chatml, "Hi?", "Be brief.") == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert generation_prompt(PLAIN_TEMPLATE, byte, "Hi?") == "### User:\nHi?\n\n### Assistant:\n"


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path: Path) -> None:
    """Without markers, a template that renders a turn differently once later turns follow (here: earlier
    answers dropped, as reasoning templates drop earlier thoughts) cannot be split: one line naming data.template."""
    template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok = tokenizer(CHATML_SPECIALS, "<|endoftext|>", template)
    tok.save_pretrained(tmp_path / "tok")
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    with pytest.raises(ConfigError) as ei:
        InstructDataModule(InstructDataConfig(source=str(src), val_source=str(src), tokenizer=str(tmp_path / "tok")))
    assert ei.value.key == "data.template" and ei.value.message.startswith("c.jsonl:1: ")
    assert "{% generation %}" in ei.value.message and "\n" not in str(ei.value)
    broken = tokenizer(CHATML_SPECIALS, "<|endoftext|>", "{{ raise_exception('only user turns') }}")
    broken.save_pretrained(tmp_path / "broken")
    with pytest.raises(ConfigError) as ei:
        InstructDataModule(InstructDataConfig(source=str(src), val_source=str(src), tokenizer=str(tmp_path / "broken")))
    assert ei.value.key == "data.template" and "only user turns" in ei.value.message


def test_chat_template_jinja_file_and_the_sandbox(tmp_path: Path) -> None:
    """A dir whose template sits in chat_template.jinja (newer transformers) is read; a template reaching for
    Python internals fails in the sandbox."""
    from llmtrain.data.tokenizers import load_pretrained_tokenizer

    tokenizer(CHATML_SPECIALS, "<|im_end|>", None).save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(SMOLLM2)
    tok = load_pretrained_tokenizer(str(tmp_path))
    assert tok.chat_template == SMOLLM2 and tok.eos_token == "<|im_end|>"
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ValueError, match="the chat template fails"):
        render(evil, tok, CONVERSATION)


# a model learns a made-up mapping from chats, and answers it through llmtrain-generate chat=true -----------------
NAMES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
SYSTEM = "Reply with the code only."


@pytest.fixture(scope="module")
def chat_pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 saved as transformers saves it, with a ChatML byte-level tokenizer (EOS <|endoftext|>,
    <|im_start|>/<|im_end|> added)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("chat_pretrained")
    backend = byte_tokenizer().backend_tokenizer
    backend.add_special_tokens(CHATML_SPECIALS)
    tok = Tokenizer(backend, "<|endoftext|>", {"chat_template": SMOLLM2})
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=2,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_a_chat_model_learns_a_mapping_and_answers_through_the_cli(chat_pretrained: Path, tmp_path: Path) -> None:
    """Made-up 3-letter codes for 8 names, taught through single- and two-turn chats (every answer a target):
    greedy `llmtrain-generate chat=true system=...` answers each name with its code alone, stopping at the
    template's end-of-turn token (<|im_end|>, not this tokenizer's EOS)."""
    from llmtrain.train import run

    rng = np.random.default_rng(0)
    codes = {n: "".join(rng.choice(list("xyzqvwk"), 3)) for n in NAMES}

    def turn(name: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"code of {name}?"}, {"role": "assistant", "content": codes[name]}]

    system = [{"role": "system", "content": SYSTEM}]
    pairs = zip(NAMES, NAMES[1:] + NAMES[:1], strict=True)
    chats = [system + turn(n) for n in NAMES] + [system + turn(a) + turn(b) for a, b in pairs]  # 1 and 2 turns
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    args = [*[o for o in TINY_LM if not o.startswith("data.")], "data=instruct", f"data.source={data}",
            f"data.val_source={data}", "data.seq_len=128", f"model.pretrained={chat_pretrained}",
            "trainer.micro_batch_size=16", "trainer.max_steps=120", "trainer.eval_every=0", "trainer.ckpt_every=0",
            "scheduler.warmup_steps=5", "optim.lr=1e-2"]
    run_dir = tmp_path / "run"
    run(compose(args), run_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"code of {n}?\n" for n in NAMES))
    res = fork_cli("llmtrain.generate", [f"source={run_dir}", f"prompts_file={prompts}", "chat=true",
                                         f"system={SYSTEM}", "do_sample=false", "max_new_tokens=12", "output=jsonl"],
                   env=base_env(tmp_path / "cache"))
    assert res.returncode == 0, res.stderr[-3000:]
    got = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [(g["prompt"], g["completion"], g["finish_reason"]) for g in got] == \
           [(f"code of {n}?", codes[n], "eos") for n in NAMES], (got, codes)
    res = fork_cli("llmtrain.generate", [f"source={run_dir}", "prompt=code of golf?", "chat=true", f"system={SYSTEM}",
                                         "do_sample=false", "max_new_tokens=12"], env=base_env(tmp_path / "cache"))
    assert res.returncode == 0 and res.stdout == codes["golf"] + "\n", (res.stdout, res.stderr[-2000:])


def test_generate_chat_refusals(chat_pretrained: Path, tmp_path: Path) -> None:
    """chat=true on a tokenizer without a chat template, and system= without chat: one line each."""
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ("config.json", "model.safetensors"):
        (plain / f).write_bytes((chat_pretrained / f).read_bytes())
    tok = Tokenizer.from_dir(chat_pretrained)
    Tokenizer(tok.backend_tokenizer, tok.eos_token, {}).save_pretrained(plain)
    env = base_env(tmp_path / "cache")
    for argv, key in (([f"source={plain}", "prompt=hi", "chat=true"], "chat"),
                      ([f"source={chat_pretrained}", "prompt=hi", "system=be brief"], "system")):
        res = fork_cli("llmtrain.generate", argv, env=env)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"llmtrain: error: {key}: "), lines
    res = fork_cli("llmtrain.generate", [f"source={plain}", "prompt=hi", "chat=true", "template=plain",
                                         "max_new_tokens=2", "do_sample=false", "output=jsonl"], env=env)
    assert res.returncode == 0 and json.loads(res.stdout)["prompt"] == "hi", res.stderr[-2000:]


def test_llama_finetune_preset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """experiment=llama_finetune on a tiny Llama dir with a ChatML tokenizer (EOS <|im_end|>, as SmolLM2-Instruct's):
    LoRA by default (adapters only train, final/ merged plus adapter/), full fine-tuning by model.lora.enabled=false;
    final/ carries the chat template that llmtrain-generate chat=true renders."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmtrain.generation import Generator
    from llmtrain.train import run

    d = tmp_path / "tiny_llama"
    backend = byte_tokenizer().backend_tokenizer
    backend.add_special_tokens(CHATML_SPECIALS)
    tok = Tokenizer(backend, "<|im_end|>", {"chat_template": SMOLLM2})
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True, bos_token_id=tok.eos_token_id,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(d)
    tok.save_pretrained(d)
    src = tmp_path / "chats.jsonl"
    src.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    short = [f"model.pretrained={d}", f"data.source={src}", f"data.val_source={src}", "data.seq_len=256",
             "trainer.max_steps=2", "trainer.eval_every=2", "trainer.eval_batches=1", "trainer.ckpt_every=0",
             "trainer.micro_batch_size=1", "logger.progress=false", "logger.plots=false"]
    cfg = compose(["experiment=llama_finetune", *short])
    assert (cfg.model.family, cfg.model.lora.enabled, cfg.data.kind, cfg.data.template) == ("llama", True, "instruct",
                                                                                            "auto")
    capsys.readouterr()
    run(cfg, tmp_path / "lora")
    start = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("llmtrain: llama"))
    assert " trainable)" in start, start  # "llama (26.9K params, 7.2K trainable)"
    assert (tmp_path / "lora" / "final" / "adapter").is_dir()
    run(compose(["experiment=llama_finetune", *short, "model.lora.enabled=false", "optim.lr=2e-5"]), tmp_path / "full")
    start = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("llmtrain: llama"))
    assert "trainable" not in start and not (tmp_path / "full" / "final" / "adapter").exists()
    gen = Generator.from_pretrained(tmp_path / "lora", device="cpu")
    assert gen.tok.chat_template == SMOLLM2 and gen.tok.eos_token == "<|im_end|>"
