"""DPO (`data=preference`, `trainer.objective=dpo`): the batch layout and prompt masking, the loss and one weight's
gradient against the formula computed by hand, a made-up preference learnt with LoRA (reference: the adapters
disabled), and one-line refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_LM, compose, read_metrics, transformers_gpt2_dir

from llmtrain.data.preference import PreferenceDataConfig, PreferenceDataModule
from llmtrain.data.tokenizers import byte_tokenizer
from llmtrain.datainfo import IGNORE_INDEX
from llmtrain.errors import ConfigError
from llmtrain.models.gpt2_native import GPT2, GPT2Dims
from llmtrain.preference import DPOObjective
from llmtrain.train import run

pytestmark = pytest.mark.usefixtures("one_thread")
EOS = 256  # the byte tokenizer's <|endoftext|>
TOK = byte_tokenizer()
PAIRS = [("2+2=", "4", "5"), ("the sky is ", "blue", "green!"), ("", "no prompt", "none"),
         ("say hi: ", "hi", "hello there")]


def jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pairs_file(path: Path, pairs: list[tuple[str, str, str]] = PAIRS) -> Path:
    return jsonl(path, [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs])


def module(tmp_path: Path, pairs: list[tuple[str, str, str]] = PAIRS) -> PreferenceDataModule:
    src = str(pairs_file(tmp_path / "pairs.jsonl", pairs))
    return PreferenceDataModule(PreferenceDataConfig(source=src, val_source=src, tokenizer="byte", seq_len=64))


def tiny_gpt2() -> GPT2:
    torch.manual_seed(0)
    return GPT2(GPT2Dims(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2))


def test_pairs_are_chosen_then_rejected_rows_with_the_prompt_masked(tmp_path: Path) -> None:
    ds = module(tmp_path).split("train")
    batch = ds.get(np.arange(len(ds)))
    B = len(PAIRS)
    assert set(batch) == {"input_ids", "labels", "pair_index"} and batch["input_ids"].shape[0] == 2 * B
    assert batch["pair_index"].tolist() == list(range(B))  # each pair's number: val pairs come after train's
    assert module(tmp_path).split("val").get(np.array([1, 0]))["pair_index"].tolist() == [B + 1, B]
    for i, (p, c, r) in enumerate(PAIRS):
        for row, resp in ((i, c), (B + i, r)):
            toks = TOK.encode(p + resp) + [EOS]
            n = len(toks) - 1
            assert batch["input_ids"][row, :n].tolist() == toks[:-1]
            want = [IGNORE_INDEX] * max(0, len(p) - 1) + toks[max(1, len(p)):]  # the response and EOS only
            assert batch["labels"][row].tolist() == want + [IGNORE_INDEX] * (batch["labels"].shape[1] - n)


def hand_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probs of each row's targets, position by position from the full logits."""
    logp = torch.log_softmax(model(batch["input_ids"]).double(), dim=-1)  # [N, T, V]
    out = []
    for row in range(logp.shape[0]):
        total = torch.zeros((), dtype=torch.float64)
        for t, y in enumerate(batch["labels"][row].tolist()):
            if y != IGNORE_INDEX:
                total = total + logp[row, t, y]
        out.append(total)
    return torch.stack(out)


def test_dpo_loss_and_gradient_equal_the_formula(tmp_path: Path) -> None:
    """Full fine-tuning: the reference is the starting model; the policy then moves, so the log-ratios differ."""
    ds = module(tmp_path).split("train")
    batch = ds.get(np.arange(len(ds)))
    beta, eps = 0.5, 0.1
    policy = tiny_gpt2()
    start = copy.deepcopy(policy).eval()
    objective = DPOObjective(policy, beta, eps)
    with torch.no_grad():  # the policy moves away from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.eval()  # no dropout: the same forward both ways
    loss_sum, count = objective.loss(policy, batch)
    loss = loss_sum / count
    w = policy.transformer.h[0].attn.c_attn.weight
    (grad,) = torch.autograd.grad(loss, w)
    # by hand
    pol, ref = hand_logps(policy, batch), hand_logps(start, batch).detach()
    B = len(PAIRS)
    z = beta * ((pol[:B] - pol[B:]) - (ref[:B] - ref[B:]))
    want = (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()
    (want_grad,) = torch.autograd.grad(want, w)
    assert int(count) == B and float(z.detach().abs().min()) > 1e-3  # the log-ratios are not trivially 0
    diff, gdiff = abs(float(loss.detach()) - float(want.detach())), float((grad.double() - want_grad).abs().max())
    print(f"dpo loss {float(loss.detach()):.9f} vs hand {float(want.detach()):.9f} (|diff| {diff:.2e}); grad max |diff| {gdiff:.2e} "
          f"(grad max {float(want_grad.abs().max()):.3e})")
    assert diff < 1e-6 and gdiff < 1e-6
    # the rewards logged: β·(π − ref) per side, summed over the step's pairs
    sums = objective.reduce(type("D", (), {"all_reduce": staticmethod(lambda t: t)})())
    rec = objective.record(sums, B)
    torch.testing.assert_close(rec["rewards/chosen"], float(beta * (pol[:B] - ref[:B]).detach().mean()), rtol=0, atol=1e-5)
    torch.testing.assert_close(rec["rewards/margins"], float(z.detach().mean()), rtol=0, atol=1e-5)


def test_lora_reference_is_the_model_with_its_adapters_disabled(tmp_path: Path) -> None:
    from llmtrain.models import adapters

    ds = module(tmp_path).split("train")
    batch = ds.get(np.arange(len(ds)))
    base = tiny_gpt2().eval()
    with torch.no_grad():
        want = hand_logps(base, batch)
    lora = adapters.LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["c_attn", "c_fc"])
    model = adapters.inject_lora(copy.deepcopy(base), lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.add_(0.1 * torch.randn_like(p))  # the adapters change the model's outputs
    objective = DPOObjective(model, 0.1, 0.0)
    assert objective.frozen is None  # no copy: the same model serves as its reference
    ref = objective.reference_logps(batch)
    torch.testing.assert_close(ref.double(), want, rtol=0, atol=1e-4)
    with torch.no_grad():
        policy = hand_logps(model, batch)
    assert float((policy - want).abs().max()) > 0.1  # the adapters are back on after the reference pass
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 on the byte vocabulary, saved as transformers saves it, with its tokenizer."""
    return transformers_gpt2_dir(tmp_path_factory.mktemp("pretrained"))


def dpo_args(pretrained: Path, source: Path, *extra: str) -> list[str]:
    return [*[o for o in TINY_LM if not o.startswith("data.")], "data=preference", f"data.source={source}",
            f"data.val_source={source}", f"model.pretrained={pretrained}", "trainer.objective=dpo",
            "trainer.eval_every=0", "scheduler.warmup_steps=0", *extra]


PROMPTS = ["color: ", "pick one: ", "answer: "]


def margins(model: torch.nn.Module, a: str, b: str) -> list[float]:
    """log p(a|prompt) − log p(b|prompt) (each answer then EOS) per prompt."""
    from llmtrain.data.preference import PairedExamples, encode_pairs

    enc, _, _ = encode_pairs([(p, a, b) for p in PROMPTS], TOK, 64, "truncate")
    batch = PairedExamples(enc, EOS).get(np.arange(len(PROMPTS)))
    with torch.no_grad():
        lp = hand_logps(model.eval(), batch)
    n = len(PROMPTS)
    return (lp[:n] - lp[n:]).tolist()


def test_lora_dpo_flips_a_made_up_preference(pretrained: Path, tmp_path: Path) -> None:
    """The base model prefers B to A (summed over the prompts); pairs preferring A flip that in a few dozen LoRA steps, and
    the logged rewards show it."""
    from llmtrain.models.gpt2_native import load_hf

    base = load_hf(pretrained)
    a, b = "cat", "dog"
    if sum(margins(base, a, b)) > 0:
        a, b = b, a
    before = margins(base, a, b)
    assert sum(before) < 0, before
    src = pairs_file(tmp_path / "pairs.jsonl", [(p, a, b) for p in PROMPTS])
    run(compose(dpo_args(pretrained, src, "model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8",
                         "model.lora.dropout=0", "optim.lr=1e-2", "trainer.max_steps=30",
                         "trainer.micro_batch_size=3", "trainer.dpo_beta=0.5")), tmp_path / "run")
    after = margins(load_hf(tmp_path / "run" / "final"), a, b)
    print(f"log p({a}) - log p({b}) per prompt: before {before}, after {after}")
    assert min(after) > 1.0, (before, after)
    recs = [r for r in read_metrics(tmp_path / "run") if "rewards/margins" in r]
    assert len(recs) == 30 and abs(recs[0]["rewards/margins"]) < 1e-6  # step 1: the policy is the reference
    assert recs[-1]["rewards/margins"] > 0.5 and recs[-1]["rewards/accuracy"] == 1.0
    assert recs[-1]["loss"] < 0.5 * recs[0]["loss"]
    evals = [r for r in read_metrics(tmp_path / "run") if "eval_loss" in r]  # the end-of-run evaluation: DPO's
    assert evals[-1]["eval_loss"] < 0.5 * np.log(2) and evals[-1]["accuracy"] == 1.0 and "perplexity" not in evals[-1]


@pytest.mark.parametrize("override,key", [
    (["trainer.objective=ppo"], "trainer.objective: must be one of lm, dpo"),
    (["trainer.objective=lm"], "trainer.objective: data=preference holds"),
    (["data=instruct"], "trainer.objective: dpo reads preference pairs"),
    (["strategy=fsdp", "strategy.tp=2"], "trainer.objective: dpo does not run under tensor parallelism"),
    (["trainer.dpo_beta=0"], "trainer.dpo_beta: must be > 0"),
], ids=["unknown", "preference-without-dpo", "dpo-without-preference", "tp", "beta"])
def test_refusals_are_one_line(pretrained: Path, tmp_path: Path, override: list[str], key: str,
                               capsys: pytest.CaptureFixture) -> None:
    src = pairs_file(tmp_path / "pairs.jsonl")
    args = dpo_args(pretrained, src, *override)
    if "data=instruct" in override:
        args = [o for o in args if o != "data=preference"]
    check_refused(args, tmp_path, key, capsys)


def check_refused(args: list[str], tmp_path: Path, start: str, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        run(compose(args), tmp_path / "run")
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("llmtrain: error")]
    assert ei.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"llmtrain: error: {start}"), err
    assert "Traceback" not in err


def test_dpo_with_a_regression_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    check_refused(["experiment=linear_regression", "trainer.objective=dpo"], tmp_path,
                  "trainer.objective: dpo trains a language model, but model family 'regression'", capsys)


def test_the_preset_needs_a_source(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    check_refused(["experiment=gpt2_dpo", "model.pretrained=null", "logger.progress=false"], tmp_path,
                  "data.source: set it to a .jsonl", capsys)


def test_a_missing_field_names_the_file_line_and_field(tmp_path: Path) -> None:
    src = jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(ConfigError) as ei:
        PreferenceDataModule(PreferenceDataConfig(source=str(src), val_source=str(src), tokenizer="byte"))
    assert str(ei.value).startswith("data.source: bad.jsonl:2: no 'rejected' field (it has: prompt, chosen)"), ei.value


def test_full_finetuning_resume_keeps_the_starting_model_as_reference(pretrained: Path, tmp_path: Path) -> None:
    """A run stopped at step 3 and resumed follows one never stopped: the reference is the pretrained model, not
    the weights the resumed run starts from."""
    from helpers import losses

    src = pairs_file(tmp_path / "pairs.jsonl")
    args = dpo_args(pretrained, src, "optim.lr=1e-2", "trainer.ckpt_every=3", "trainer.micro_batch_size=2",
                    "scheduler=constant")  # the same learning rates whatever max_steps is
    run(compose([*args, "trainer.max_steps=6"]), tmp_path / "ref")
    run(compose([*args, "trainer.max_steps=3"]), tmp_path / "run")
    run(compose([*args, "trainer.max_steps=6"]), tmp_path / "run")
    want = {r["step"]: r for r in read_metrics(tmp_path / "ref") if "rewards/margins" in r}
    got = {r["step"]: r for r in read_metrics(tmp_path / "run") if "rewards/margins" in r}
    assert losses(tmp_path / "run") == losses(tmp_path / "ref") and len(want) == 6
    assert [got[s]["rewards/margins"] for s in want] == [want[s]["rewards/margins"] for s in want]
    assert abs(want[6]["rewards/margins"]) > 1e-3


def test_dpo_under_ddp_matches_one_process(pretrained: Path, tmp_path: Path) -> None:
    """2 processes × 2 pairs follow 1 process × 4 pairs (full fine-tuning: each rank holds its frozen copy): the
    loss and the rewards are averaged over the global pair count."""
    from helpers import losses, train_cli

    pairs = [(f"q{i}: ", "yes" * (i % 3 + 1), "no" * (i % 2 + 1)) for i in range(8)]
    src = pairs_file(tmp_path / "pairs.jsonl", pairs)
    args = dpo_args(pretrained, src, "optim.lr=1e-3", "trainer.max_steps=3")
    run(compose([*args, "trainer.micro_batch_size=4"]), tmp_path / "single")
    train_cli([*args, "strategy=ddp", "trainer.micro_batch_size=2"], tmp_path / "ddp", nproc=2)
    ref, got = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert sorted(got) == [1, 2, 3] and max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref) < 1e-5, (got, ref)
    margin = {r["step"]: r["rewards/margins"] for r in read_metrics(tmp_path / "single") if "rewards/margins" in r}
    ddp_margin = {r["step"]: r["rewards/margins"] for r in read_metrics(tmp_path / "ddp") if "rewards/margins" in r}
    assert abs(margin[3]) > 1e-4 and abs(ddp_margin[3] - margin[3]) < 1e-5 * max(1.0, abs(margin[3]))


# chat `messages` pairs ------------------------------------------------------------------------------------------
def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# (prompt messages, chosen answer, rejected answer); the second prompt holds an earlier assistant turn (context)
CHATS = [
    ([msg("user", "2+2?")], "4", "five"),
    ([msg("system", "Be brief."), msg("user", "Hi!"), msg("assistant", "Hello."), msg("user", "3+3?")], "6",
     "seven, I think"),
]


def explicit(chats: list[tuple[list[dict[str, str]], str, str]] = CHATS) -> list[dict[str, Any]]:
    return [{"prompt": p, "chosen": [msg("assistant", c)], "rejected": [msg("assistant", r)]} for p, c, r in chats]


def implicit(chats: list[tuple[list[dict[str, str]], str, str]] = CHATS) -> list[dict[str, Any]]:
    return [{"chosen": [*p, msg("assistant", c)], "rejected": [*p, msg("assistant", r)]} for p, c, r in chats]


def chat_module(src: Path, tokenizer: str = "byte", seq_len: int = 256, template: str = "plain"
                ) -> PreferenceDataModule:
    return PreferenceDataModule(PreferenceDataConfig(source=str(src), val_source=str(src), tokenizer=tokenizer,
                                                     seq_len=seq_len, template=template))


def plain_ids(messages: list[dict[str, str]]) -> tuple[list[int], int]:
    """The byte ids of the plain template's rendering (`### {Role}:\\n{content}\\n\\n`, an assistant's content
    followed by EOS) through the last answer's EOS, and where that answer starts."""
    ids: list[int] = []
    for m in messages[:-1]:
        ids += TOK.encode(f"### {m['role'].capitalize()}:\n") + TOK.encode(m["content"])
        ids += ([EOS] if m["role"] == "assistant" else []) + TOK.encode("\n\n")
    ids += TOK.encode("### Assistant:\n")
    return ids + TOK.encode(messages[-1]["content"]) + [EOS], len(ids)


def test_chat_pairs_plain_template_train_the_last_answer_only(tmp_path: Path) -> None:
    """data.template=plain, byte tokenizer: explicit- and implicit-prompt pairs give the same batch; each row is the
    plain rendering of prompt + response, and its only targets are the response and EOS (an earlier assistant turn
    in the prompt is context)."""
    batches = [chat_module(jsonl(tmp_path / f"{name}.jsonl", records)).split("train").get(np.arange(len(CHATS)))
               for name, records in (("explicit", explicit()), ("implicit", implicit()))]
    assert all(torch.equal(batches[0][k], batches[1][k]) for k in ("input_ids", "labels"))
    batch, B = batches[0], len(CHATS)
    assert batch["input_ids"].shape[0] == 2 * B
    for i, (prompt, c, r) in enumerate(CHATS):
        for row, resp in ((i, c), (B + i, r)):
            ids, start = plain_ids([*prompt, msg("assistant", resp)])
            n = len(ids) - 1
            assert batch["input_ids"][row, :n].tolist() == ids[:-1]
            labels = batch["labels"][row].tolist()
            assert labels[:n] == [IGNORE_INDEX] * (start - 1) + TOK.encode(resp) + [EOS]
            assert all(y == IGNORE_INDEX for y in labels[n:])  # padding
    ids, start = plain_ids([*CHATS[1][0], msg("assistant", "6")])  # the earlier "Hello." + EOS: context only
    assert ids[:start].count(EOS) == 1 and (batch["labels"][1, : start - 1] == IGNORE_INDEX).all()
    # too long: the prompt is cut from the left; the targets stay the answer and EOS
    short = chat_module(tmp_path / "explicit.jsonl", seq_len=12).split("train").get(np.arange(len(CHATS)))
    ids, _ = plain_ids([*CHATS[1][0], msg("assistant", "6")])
    assert short["input_ids"][1].tolist() == ids[-13:-1]
    assert [y for y in short["labels"][1].tolist() if y != IGNORE_INDEX] == TOK.encode("6") + [EOS]


@pytest.mark.parametrize("eos", ["<|endoftext|>", "<|im_end|>"])
def test_chat_pairs_with_a_chat_template_train_the_last_answer_and_end_of_turn(eos: str, tmp_path: Path) -> None:
    """A ChatML tokenizer (SmolLM2-Instruct's template, data.template=auto): the labels of each row are one run, the
    final answer + <|im_end|> (then the tokenizer's EOS when that is not <|im_end|>); the earlier answer is not."""
    from test_chat import CHATML_SPECIALS, SMOLLM2, tokenizer

    tokenizer(CHATML_SPECIALS, eos, SMOLLM2).save_pretrained(tmp_path / "tok")
    dm = chat_module(jsonl(tmp_path / "chats.jsonl", explicit()), tokenizer=str(tmp_path / "tok"), template="auto")
    tok = dm.info.tokenizer
    batch, B = dm.split("train").get(np.arange(len(CHATS))), len(CHATS)
    for i, (_, c, r) in enumerate(CHATS):
        for row, resp in ((i, c), (B + i, r)):
            labels = batch["labels"][row].tolist()
            at = [t for t, y in enumerate(labels) if y != IGNORE_INDEX]
            assert at == list(range(at[0], at[-1] + 1))  # one run
            want = resp + "<|im_end|>" + ("" if eos == "<|im_end|>" else eos)
            assert tok.decode([labels[t] for t in at]) == want
            assert batch["input_ids"][row, at[0]].item() == tok.encode("\n")[0]  # after "<|im_start|>assistant\n"
    assert "Hello." in tok.decode(batch["input_ids"][1].tolist())  # the earlier answer: in the inputs only


GOOD = {"prompt": "a", "chosen": "b", "rejected": "c"}
USER, ANSWER = [msg("user", "q")], [msg("assistant", "a")]


@pytest.mark.parametrize("record,template,want", [
    ({"prompt": [{"content": "q"}], "chosen": ANSWER, "rejected": ANSWER}, "plain",
     "data.source: bad.jsonl:2: 'prompt' message 0 must be {role, content} (strings)"),
    ({"chosen": [*USER, {"role": "assistant"}], "rejected": [*USER, *ANSWER]}, "plain",
     "data.source: bad.jsonl:2: 'chosen' message 1 must be {role, content} (strings)"),
    ({"chosen": [*USER, *ANSWER], "rejected": [msg("user", "other"), *ANSWER]}, "plain",
     "data.source: bad.jsonl:2: 'chosen' and 'rejected' must share every message before their last (the prompt); "
     "they differ at message 0"),
    ({"chosen": [*ANSWER, *USER], "rejected": [*USER, *ANSWER]}, "plain",
     "data.source: bad.jsonl:2: the last 'chosen' message must be the assistant's (the response), not 'user'"),
    ({"prompt": USER, "chosen": ANSWER, "rejected": USER}, "plain",
     "data.source: bad.jsonl:2: the last 'rejected' message must be the assistant's"),
    ({"prompt": "q", "chosen": ANSWER, "rejected": ANSWER}, "plain",
     "data.source: bad.jsonl:2: 'prompt' is a str but 'chosen' and 'rejected' are lists of messages"),
    ({"prompt": USER, "chosen": "a", "rejected": "b"}, "plain",
     "data.source: bad.jsonl:2: 'prompt' is a list of messages but 'chosen' and 'rejected' are not"),
    ({"prompt": USER, "chosen": ANSWER, "rejected": "b"}, "plain",
     "data.source: bad.jsonl:2: 'chosen' and 'rejected' must both be lists of messages or both strings "
     "(got a list and a str)"),
    ({"prompt": USER, "chosen": ANSWER, "rejected": ANSWER}, "auto",
     "data.template: bad.jsonl:2: chat messages are rendered by the tokenizer's chat template and this tokenizer "
     "has none; set data.template=plain"),
    (GOOD, "jinja", "data.template: must be one of auto, plain (got 'jinja')"),
], ids=["no-role", "no-content", "prompts-differ", "last-not-assistant", "explicit-response-not-assistant",
        "string-prompt", "list-prompt-string-responses", "mixed-responses", "no-template", "bad-template"])
def test_chat_pair_refusals_are_one_line(record: dict[str, Any], template: str, want: str, tmp_path: Path) -> None:
    src = jsonl(tmp_path / "bad.jsonl", [GOOD, record])
    with pytest.raises(ConfigError) as ei:
        chat_module(src, template=template)
    assert str(ei.value).startswith(want) and "\n" not in str(ei.value), ei.value


def test_data_template_composes_under_data_preference() -> None:
    cfg = compose(["data=preference", "data.template=plain"])
    assert cfg.data.template == "plain" and compose(["data=preference"]).data.template == "auto"


# trainer.dpo_reference=precomputed ------------------------------------------------------------------------------
def test_precomputed_reference_is_the_starting_model_and_no_copy_is_kept(tmp_path: Path) -> None:
    """prepare() scores every train and val pair with the model as built; after the policy moves, the reference
    log-probs looked up by pair number are still the starting model's (a reference that followed the policy, or
    the wrong rows, would not be)."""
    import contextlib
    from types import SimpleNamespace

    from llmtrain.distributed.dist import Dist

    data = module(tmp_path)
    policy = tiny_gpt2()
    start = copy.deepcopy(policy).eval()
    objective = DPOObjective(policy, 0.5, 0.0, precomputed=True)
    assert objective.frozen is None
    strategy = SimpleNamespace(model=policy, device=torch.device("cpu"), dist=Dist(), data_shard=lambda: (0, 1),
                               autocast=contextlib.nullcontext)
    objective.prepare(strategy, data, 3, SimpleNamespace(write=lambda msg: None))  # 4 pairs: batches of 3 and 1
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for split, order in (("train", [2, 0, 3]), ("val", [1, 3])):
        batch = data.split(split).get(np.array(order))
        got, want = objective.reference_logps(batch), hand_logps(start, batch).float()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        assert (got - hand_logps(policy, batch).float()).abs().max() > 1e-2


def test_precomputed_reference_trains_as_the_model_reference(pretrained: Path, tmp_path: Path) -> None:
    """Full fine-tuning, 4 steps of 2 micro-batches and an evaluation: every logged value of a run with
    precomputed reference log-probs equals the run whose frozen copy scores each batch (to float rounding: the
    rows are padded to other lengths)."""
    src = pairs_file(tmp_path / "pairs.jsonl")
    args = dpo_args(pretrained, src, "optim.lr=1e-2", "trainer.max_steps=4", "trainer.grad_accum_steps=2",
                    "trainer.micro_batch_size=1", "trainer.eval_every=4", "scheduler=constant")
    run(compose(args), tmp_path / "model")
    run(compose([*args, "trainer.dpo_reference=precomputed"]), tmp_path / "pre")
    want, got = read_metrics(tmp_path / "model"), read_metrics(tmp_path / "pre")
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "eval_loss",
            "accuracy")
    assert [sorted(k for k in r if k in keys) for r in got] == [sorted(k for k in r if k in keys) for r in want]
    for a, b in zip(got, want, strict=True):
        for k in (k for k in keys if k in b):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, a, b)
    assert abs(want[3]["rewards/margins"]) > 1e-2  # the policy has left the reference
