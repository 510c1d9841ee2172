"""The native Llama family (Llama, Qwen2, Mistral, Qwen3 layouts) against transformers on tiny random models:
logits, loss and every gradient (fp32, 1e-5) in both directions of the weight conversion; sharded and bf16
dirs; a pretrained dir trained by llmtrain and read back by transformers; greedy decoding (left padding,
sliding window) equal to transformers' `generate`; the static decode step; presets with the published shapes;
one-line refusals."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import compose

from llmtrain.models.llama import convert
from llmtrain.models.llama.convert import dims_from_hf_config, hf_config, load_hf, save_hf
from llmtrain.models.llama.model import Llama

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 260  # the byte tokenizer's 257 ids, and a few more
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def _configs() -> dict:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        # tied, llama3 RoPE scaling (θ 500000)
        "llama": LlamaConfig(**SMALL, tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
        # untied, bias on q/k/v/o and the MLP
        "llama_bias": LlamaConfig(**SMALL, tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
        # q/k/v bias, tied, a 7-slot window on its second layer only
        "qwen2": Qwen2Config(**SMALL, tie_word_embeddings=True, use_sliding_window=True, sliding_window=7,
                             max_window_layers=1),
        # untied, a 6-slot window on every layer
        "mistral": MistralConfig(**SMALL, tie_word_embeddings=False, sliding_window=6),
        # q/k norm per head, head_dim 24 (not hidden/heads), bias, a 5-slot window on its second layer
        "qwen3": Qwen3Config(**SMALL, head_dim=24, tie_word_embeddings=True, attention_bias=True,
                             use_sliding_window=True, sliding_window=5, max_window_layers=1),
    }


ARCHS = ("llama", "llama_bias", "qwen2", "mistral", "qwen3")


def _perturb(model: torch.nn.Module) -> None:
    """Norm weights and biases off their init values (ones, zeros), which would hide a misplaced one."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each architecture's tiny random model, saved by transformers with the byte tokenizer beside it."""
    from transformers import AutoModelForCausalLM

    from llmtrain.data.tokenizers import byte_tokenizer

    out = {}
    for name, cfg in _configs().items():
        d = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(cfg)
        _perturb(hf)
        hf.save_pretrained(d)
        byte_tokenizer().save_pretrained(d)
        out[name] = d
    return out


def _batch(n: int = 3, t: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, t), generator=g)
    labels = torch.randint(0, VOCAB, (n, t), generator=g)
    labels[0, 10:] = -100  # no target there
    return ids, labels


def assert_same_model(ours: Llama, hf: torch.nn.Module) -> dict[str, float]:
    """Logits, summed loss and every parameter's gradient of `ours` equal `hf`'s (fp32, rel and abs 1e-5);
    returns the largest differences (abs for logits and gradients, rel for the loss)."""
    ids, labels = _batch()
    ours.zero_grad()
    hf.zero_grad()
    want = hf(ids).logits  # [B, T, V]
    got = ours(ids)
    assert got.shape == want.shape == (3, 24, VOCAB)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ref = F.cross_entropy(want.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    loss, count = ours(ids, labels=labels)
    assert int(count) == int((labels != -100).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    ref.backward()
    loss.backward()
    hp, op = dict(hf.named_parameters()), dict(ours.named_parameters())
    assert set(op) == set(hp) - ({"lm_head.weight"} if ours.dims.tie_word_embeddings else set())
    worst = 0.0
    for name, p in op.items():
        torch.testing.assert_close(p.grad, hp[name].grad, rtol=1e-5, atol=1e-5, msg=name)
        worst = max(worst, (p.grad - hp[name].grad).abs().max().item())
    return {"logits": (got - want).abs().max().item(), "loss": ((loss - ref).abs() / ref.abs()).item(),
            "grad": worst}


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_to_native_equals_transformers(hf_dirs: dict[str, Path], arch: str) -> None:
    """A transformers dir loaded natively: same logits, loss and gradients as transformers on it."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dirs[arch]).eval()
    ours = load_hf(hf_dirs[arch]).eval()
    assert ours.dims.model_type == hf.config.model_type
    assert_same_model(ours, hf)


@pytest.mark.parametrize("arch", ARCHS)
def test_native_to_hf_equals_native(hf_dirs: dict[str, Path], arch: str, tmp_path: Path) -> None:
    """A freshly initialised native model of each layout, exported: transformers loads it as that architecture
    with the same logits, loss and gradients, and reads back the same config."""
    from transformers import AutoModelForCausalLM

    d = dims_from_hf_config(convert.read_config(hf_dirs[arch]))
    torch.manual_seed(1)
    ours = Llama(d).eval()
    _perturb(ours)
    save_hf(ours, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == convert.ARCHITECTURES[d.model_type]
    assert dims_from_hf_config(hf.config.to_dict()) == d
    assert_same_model(ours, hf)
    if d.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def test_sharded_and_bf16_dirs_load(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A dir sharded with an index (transformers' and ours) and a bf16 one load; training starts from fp32
    copies of the bf16 weights."""
    from transformers import AutoModelForCausalLM

    from llmtrain.models.llama.spec import LlamaModelConfig, LlamaSpec

    hf = AutoModelForCausalLM.from_pretrained(hf_dirs["mistral"]).eval()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / convert.SAFE_INDEX).is_file()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    assert_same_model(load_hf(tmp_path / "sharded").eval(), hf)

    ours = load_hf(hf_dirs["qwen2"])
    save_hf(ours, tmp_path / "ours", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "ours" / convert.SAFE_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids), rtol=1e-6, atol=1e-6)

    bf16 = AutoModelForCausalLM.from_pretrained(hf_dirs["llama"], dtype=torch.bfloat16)
    bf16.save_pretrained(tmp_path / "bf16")
    assert load_hf(tmp_path / "bf16").model.embed_tokens.weight.dtype == torch.bfloat16
    built = LlamaSpec().build(LlamaModelConfig(pretrained=str(tmp_path / "bf16")), _info())
    assert {p.dtype for p in built.parameters()} == {torch.float32}
    assert_same_model(built.eval(), bf16.float().eval())


def _info():
    from llmtrain.datainfo import DataInfo

    return DataInfo(task="lm", vocab_size=257, eos_token_id=256, needed_vocab=257)


# training from a Hugging Face dir and back --------------------------------------------------------------
def _train_args(pretrained: Path, *extra: str) -> list[str]:
    return ["experiment=llama_tiny", f"model.pretrained={pretrained}", f"data.tokenizer={pretrained}",
            "data.seq_len=32", "data.embedded_max_bytes=100000", "trainer.micro_batch_size=4", "trainer.max_steps=10",
            "trainer.eval_every=10", "trainer.eval_batches=1", "trainer.ckpt_every=10", "trainer.sample_tokens=0",
            "logger.log_every=5", "logger.progress=false", "logger.plots=false", "optim.lr=1e-2",
            "scheduler.warmup_steps=0", "trainer.precision=fp32", *extra]


def test_trained_export_reproduces_the_eval_loss_in_transformers(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    """HF dir → llmtrain trains 10 steps → final/ is that architecture's dir again: transformers (model and
    tokenizer) gives llmtrain's eval loss on the same batch, and llmtrain reads it back through the family."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtrain.data.base import build_data
    from llmtrain.data.tokenizers import byte_tokenizer
    from llmtrain.restore import load_export
    from llmtrain.rundir import read_config
    from llmtrain.train import run

    run_dir = tmp_path / "run"
    run(compose(_train_args(hf_dirs["qwen2"])), run_dir)
    final = run_dir / "final"
    evals = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval_loss" in ln]
    assert evals[-1]["step"] == 10
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["layer_types"][1] == "sliding_attention"
    hf = AutoModelForCausalLM.from_pretrained(final).eval()
    base = AutoModelForCausalLM.from_pretrained(hf_dirs["qwen2"])
    assert not torch.equal(hf.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    tok = AutoTokenizer.from_pretrained(final)
    text = "def f(x):\n    return x"
    assert tok.encode(text, add_special_tokens=False) == byte_tokenizer().encode(text)
    data = build_data(read_config(run_dir, "run").data)
    batch = data.split("val").get(np.arange(4))  # the first eval batch (eval_batches=1, micro-batch 4)
    with torch.no_grad():
        logits = hf(batch["input_ids"]).logits
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
    want = loss.item() / int((batch["labels"] != -100).sum())
    assert evals[-1]["eval_loss"] == pytest.approx(want, rel=1e-5)
    spec, again = load_export(final, "source")
    assert spec.name == "llama"
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(batch["input_ids"]), logits, rtol=1e-5, atol=1e-5)


def test_lora_adapter_export_applies_to_the_transformers_base(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    """LoRA on the seven projections: final/ (merged) and final/adapter over the base dir, loaded by transformers
    and peft, give the same logits (the adapter is saved for nn.Linear weights, not GPT-2's Conv1D)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmtrain.train import run

    base = hf_dirs["llama_bias"]
    run(compose(_train_args(base, "model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8",
                            "model.lora.dropout=0", "trainer.max_steps=4", "trainer.eval_every=0",
                            "trainer.ckpt_every=4")), tmp_path / "run")
    final = tmp_path / "run" / "final"
    adapter_cfg = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["fan_in_fan_out"] is False
    assert sorted(adapter_cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"])
    ids, _ = _batch()
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        a, b, c = merged(ids).logits, peft_model(input_ids=ids).logits, plain(ids).logits
    assert (a - c).abs().max() > 1e-4  # the adapters moved the model
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# generation ---------------------------------------------------------------------------------------------
def word_tokenizer(n: int):
    """Token i is the word `w<i>` (the last: <|endoftext|>): text ↔ ids without loss, so completions compare
    as ids."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from llmtrain.data.tokenizers import EOS, Tokenizer

    vocab = {f"w{i}": i for i in range(n - 1)} | {EOS: n - 1}
    backend = Backend(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend)


PROMPTS = ["w5 w7 w9 w11 w13 w15 w17 w19", "w3 w4", "w200"]


def _hf_greedy(path: Path, tok, new: int) -> list[list[int]]:
    """transformers' generate on a left-padded batch of PROMPTS (no stop at EOS)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    rows = [tok.encode(p) for p in PROMPTS]
    P = max(map(len, rows))
    ids = torch.tensor([[0] * (P - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    return out[:, P:].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_equals_transformers(hf_dirs: dict[str, Path], arch: str) -> None:
    """llmtrain's engine (KV cache of the grouped heads, left padding, the sliding window while decoding) gives
    transformers' greedy tokens for a batch of prompts of different lengths."""
    from llmtrain.generation.engine import Generator

    tok = word_tokenizer(VOCAB)
    gen = Generator(load_hf(hf_dirs[arch]), tok)
    got = [tok.encode(c.completion) for c in gen(PROMPTS, do_sample=False, max_new_tokens=14, stop_at_eos=False)]
    assert got == _hf_greedy(hf_dirs[arch], tok, 14)


def test_static_decode_step_equals_eager(hf_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """compile=true's decode step (one static-shape graph over the whole cache, padded rows and the window
    masked) traces without a graph break and gives the eager tokens (dynamo's eager backend: no C++ build)."""
    from llmtrain.generation.engine import Generator

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    tok, model = word_tokenizer(VOCAB), load_hf(hf_dirs["mistral"])
    kw = dict(do_sample=False, max_new_tokens=10, stop_at_eos=False)
    eager = Generator(model, tok)(PROMPTS, **kw)
    static = Generator(model, tok, compile=True)(PROMPTS, **kw)
    assert [c.completion for c in static] == [c.completion for c in eager]
    assert all(c.completion_tokens == 10 for c in static)


def test_packed_examples_attend_within_themselves(hf_dirs: dict[str, Path]) -> None:
    """Two examples packed in one row (positions restarting, document mask, a window shorter than each) score
    as each example alone."""
    from llmtrain.models.llama.spec import LlamaSpec

    model = load_hf(hf_dirs["mistral"]).eval()
    ids, labels = _batch(1, 24)
    packed = {"input_ids": ids, "labels": labels, "doc_ids": torch.tensor([[0] * 10 + [1] * 14]),
              "position_ids": torch.tensor([list(range(10)) + list(range(14))])}
    with torch.no_grad():
        total, count = LlamaSpec().loss(model, packed)
        a, na = model(ids[:, :10], labels=labels[:, :10])
        b, nb = model(ids[:, 10:], labels=labels[:, 10:])
    assert int(count) == int(na + nb)
    torch.testing.assert_close(total, a + b, rtol=1e-5, atol=1e-5)


# presets ------------------------------------------------------------------------------------------------
# The published config.json files, as the hub serves them (transformers 4's spelling: rope_theta, rope_scaling),
# the keys that shape the model; where each was checked: see the presets' comments and the family's docs.
PUBLISHED = {
    "smollm2_135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
                         tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000,
                         rms_norm_eps=1e-5, rope_scaling=None, hidden_act="silu", attention_bias=False,
                         mlp_bias=False),
    "qwen2_5_0_5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         sliding_window=32768, use_sliding_window=False, max_window_layers=24, hidden_act="silu"),
    "llama3_2_1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
                        tie_word_embeddings=True, max_position_embeddings=131072, rope_theta=500000.0,
                        rms_norm_eps=1e-5, rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                         "original_max_position_embeddings": 8192,
                                                         "rope_type": "llama3"},
                        hidden_act="silu", attention_bias=False, mlp_bias=False),
    "llama3_8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, rope_scaling=None,
                      hidden_act="silu", attention_bias=False),
}
PARAMS = {"smollm2_135m": 134_515_008, "qwen2_5_0_5b": 494_032_768, "llama3_2_1b": 1_235_814_400,
          "llama3_8b": 8_030_261_248}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_presets_have_the_published_shapes(preset: str) -> None:
    """Each preset is the model its published config.json describes (read as a pretrained dir's would be), with
    the published parameter count; transformers builds the same parameters from the config it exports as."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmtrain.config import checked
    from llmtrain.models.llama import spec as llama_spec

    cfg = checked(compose([f"model={preset}", "data=text"]))
    d = llama_spec.dims(cfg.model, _info())
    assert d == dims_from_hf_config(PUBLISHED[preset])
    with torch.device("meta"):
        ours = Llama(d)
        theirs = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config(d)))
    assert sum(p.numel() for p in ours.parameters()) == PARAMS[preset]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    embedding = 0 if d.tie_word_embeddings else d.vocab_size * d.hidden_size  # a lookup, not a matmul
    attention = 12 * d.num_hidden_layers * 512 * d.num_attention_heads * d.head_dim
    assert d.flops_per_token(512) == 6 * (PARAMS[preset] - embedding) + attention


def test_llama_tiny_trains_and_samples(tmp_path: Path) -> None:
    """experiment=llama_tiny (BPE on the embedded corpus), shortened: the loss falls, final/ is a Llama dir and
    the end-of-run sample comes from the trained weights."""
    from llmtrain.train import run

    run_dir = tmp_path / "run"
    run(compose(["experiment=llama_tiny", "data.embedded_max_bytes=100000", "data.vocab_size=300",
                 "data.seq_len=32", "trainer.max_steps=12", "trainer.micro_batch_size=8", "trainer.eval_every=0",
                 "trainer.ckpt_every=12", "trainer.sample_tokens=6", "logger.log_every=1", "logger.progress=false",
                 "logger.plots=false"]), run_dir)
    losses = [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert losses[-1] < losses[0] - 0.5
    assert json.loads((run_dir / "final" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (run_dir / "samples.txt").read_text().startswith("def ")


# refusals -----------------------------------------------------------------------------------------------
def _one_line_exit_2(capsys: pytest.CaptureFixture, fn, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        fn(*args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("llmtrain: error: "), err
    return err


def test_gqa_shape_that_does_not_divide_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llmtrain.train import run

    run_dir = tmp_path / "run"
    err = _one_line_exit_2(capsys, run, compose(["experiment=llama_tiny", "model.n_kv_head=3"]), run_dir)
    assert "model.n_kv_head: n_head=4 is not a multiple of n_kv_head=3; use one of 1, 2, 4" in err
    err = _one_line_exit_2(capsys, run, compose(["experiment=llama_tiny", "model.n_head=3", "model.n_kv_head=1"]), run_dir)
    assert "model.n_head: n_embd=128 is not divisible by n_head=3" in err and "model.head_dim" in err
    assert not run_dir.exists()


def test_unsupported_dirs_are_one_line(hf_dirs: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    """A GPT-NeoX dir (model=llama_tiny refuses it before any work; the family that reads it is named), a
    config whose heads do not group, a hub name offline: one line, exit 2, nothing written."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from llmtrain.train import run

    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)).save_pretrained(tmp_path / "neox")
    run_dir = tmp_path / "run"
    err = _one_line_exit_2(capsys, run, compose(_train_args(tmp_path / "neox")), run_dir)
    assert "model.pretrained" in err and "'gpt_neox' is not one the llama family reads" in err
    with pytest.raises(convert.NotLlama):
        load_hf(tmp_path / "neox")

    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((hf_dirs["llama"] / "config.json").read_text()) | {"num_key_value_heads": 3}
    (bad / "config.json").write_text(json.dumps(cfg))
    err = _one_line_exit_2(capsys, run, compose(_train_args(bad)), run_dir)
    assert "num_attention_heads=4 is not a multiple of num_key_value_heads=3" in err

    t0 = time.monotonic()
    err = _one_line_exit_2(capsys, run, compose(["model=smollm2_135m", "model.pretrained=HuggingFaceTB/SmolLM2-135M",
                                                 "trainer.max_steps=1"]), run_dir)
    assert time.monotonic() - t0 < 30 and "model.pretrained: cannot load 'HuggingFaceTB/SmolLM2-135M'" in err
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_model_dir_without_a_tokenizer_is_one_line(hf_dirs: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """Generating from (or fine-tuning with the tokenizer of) a model dir that holds none: one line."""
    import shutil

    from llmtrain.generation.cli import run as generate
    from llmtrain.train import run

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(hf_dirs["llama"] / f, bare / f)
    err = _one_line_exit_2(capsys, generate, compose([f"source={bare}", "prompt=w1"], "generate"))
    assert "source:" in err and "holds no tokenizer" in err
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": "a", "completion": "b"}) + "\n" for _ in range(8)))
    run_dir = tmp_path / "run"
    err = _one_line_exit_2(capsys, run, compose(["model=llama_tiny", f"model.pretrained={bare}", "data=instruct",
                                                 f"data.source={jsonl}", "trainer.max_steps=1"]), run_dir)
    assert "data.tokenizer:" in err and "holds no tokenizer" in err
    assert not (run_dir / "final").exists() and not list(run_dir.glob("checkpoints*"))
