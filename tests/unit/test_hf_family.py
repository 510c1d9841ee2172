"""model=hf: causal LMs transformers ships and no native family reads (GPT-NeoX, Phi, OPT, Gemma; tiny random
ones saved by transformers' save_pretrained with a byte tokenizer): the loss inside the compiled forward and
equal to transformers' own, decoder layers found from the model, gradient checkpointing, LoRA per architecture
(nn.Linear and Conv1D layouts), export that transformers and peft load back, generation equal to `generate`,
and one-line refusals of what would run a dir's code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import compose, losses, read_metrics

from llmtrain.datainfo import IGNORE_INDEX, DataInfo
from llmtrain.errors import ConfigError
from llmtrain.models import hf
from llmtrain.models.base import get_model_spec
from llmtrain.train import run

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, EOS = 257, 256
COMMON = {"vocab_size": VOCAB, "bos_token_id": EOS, "eos_token_id": EOS, "max_position_embeddings": 64}
ARCHS: dict[str, dict[str, Any]] = {  # model_type -> config; the larger inits give varied greedy text
    "gpt_neox": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                 "rotary_pct": 0.5},
    "phi": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "initializer_range": 0.3},
    "opt": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 64,
            "word_embed_proj_dim": 32, "pad_token_id": None, "dropout": 0.0, "init_std": 0.3},
    "gemma": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_dim": 16, "intermediate_size": 64, "pad_token_id": None, "initializer_range": 0.3},
    "gemma2": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
               "head_dim": 16, "intermediate_size": 64, "pad_token_id": None, "final_logit_softcapping": 5.0},
}
# whether the loss runs the output layer itself, chunked: OPT's forward reads its base model's decoder directly and
# Gemma 2 soft-caps its logits, so their loss goes through the model's own logits
CHUNKED = {"gpt_neox": True, "phi": True, "opt": False, "gemma": True, "gemma2": False}
PROMPTS = ["def main(", "x", "class Foo:", "if x = 1"]


def _save(d: Path, model_type: str, **kw: Any) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmtrain.data.tokenizers import byte_tokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random model dir of each architecture (and GPT-2, whose projections are Conv1D), with its tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    out = {t: _save(root / t, t, **COMMON, **kw) for t, kw in ARCHS.items()}
    out["gpt2"] = _save(root / "gpt2", "gpt2", vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=EOS, eos_token_id=EOS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        initializer_range=0.3)
    return out


def hf_args(d: Path, *extra: str) -> list[str]:
    return ["model=hf", f"model.pretrained={d}", "data.tokenizer=byte", "data.seq_len=32",
            "data.embedded_max_bytes=200000", "trainer.micro_batch_size=4", "trainer.eval_batches=2",
            "trainer.sample_tokens=0", "trainer.precision=fp32", "trainer.eval_every=0", "logger.log_every=1",
            "logger.progress=false", "logger.plots=false", "optim.lr=3e-3", "scheduler.warmup_steps=0", *extra]


def _build(d: Path, *extra: str) -> tuple[Any, Any, torch.nn.Module]:
    from llmtrain.config import checked

    conf = checked(compose(hf_args(d, *extra)))
    spec = get_model_spec("hf")
    return spec, conf, spec.build(conf.model, DataInfo(task="lm", vocab_size=VOCAB))


def _batch(seed: int = 0, B: int = 2, T: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    labels = seq[:, 1:].clone()
    labels[0, :5] = IGNORE_INDEX  # a prompt without targets
    return {"input_ids": seq[:, :-1], "labels": labels}


def _transformers(d: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


def _own_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' own mean loss of the (already shifted) labels."""
    return model(input_ids=batch["input_ids"], labels=batch["labels"], shift_labels=batch["labels"]).loss


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from llmtrain.distributed.base import clean_key

    return {clean_key(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# the loss ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHS))
def test_loss_and_gradients_equal_transformers_own(dirs: dict[str, Path], arch: str) -> None:
    spec, _, model = _build(dirs[arch])
    assert getattr(model, hf.PLAIN_HEAD) is CHUNKED[arch]
    batch = _batch()
    s, n = spec.loss(model, batch)
    assert int(n) == int((batch["labels"] != IGNORE_INDEX).sum()) == spec.count(batch)
    (s / n).backward()
    ref = _transformers(dirs[arch])
    want = _own_loss(ref, batch)
    want.backward()
    torch.testing.assert_close(s / n, want, rtol=1e-6, atol=0)
    ours, theirs = _grads(model), _grads(ref)
    assert ours.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-6, msg=k)


def _recorded(model: torch.nn.Module, loss: Any, batch: dict[str, torch.Tensor]) -> tuple[list[Any], Any]:
    """torch.compile(model) with a backend that records what each graph returns; (those, loss(compiled, batch))."""
    outs: list[Any] = []

    def backend(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]) -> Any:
        def call(*args: Any) -> Any:
            out = gm(*args)
            outs.append(out)
            return out
        return call

    torch._dynamo.reset()
    return outs, loss(torch.compile(model, backend=backend), batch)


@pytest.mark.parametrize("family", ["hf", "gpt2"])
def test_the_loss_is_part_of_the_compiled_graph(dirs: dict[str, Path], family: str) -> None:
    """trainer.compile compiles the model; the loss it returns (sum, count) is the one compiled graph's output,
    not computed from logits outside it (model=hf, and GPT-2's model.impl=hf, which shares the loss)."""
    if family == "hf":
        spec, _, model = _build(dirs["gpt_neox"])
    else:
        from transformers import GPT2LMHeadModel

        spec = get_model_spec("gpt2")
        model = hf.prepare(GPT2LMHeadModel.from_pretrained(dirs["gpt2"]))
    batch = _batch()
    outs, (s, n) = _recorded(model, spec.loss, batch)
    assert len(outs) == 1 and len(outs[0]) == 2, [tuple(getattr(o, "shape", ())) for o in outs[0]]
    assert outs[0][0] is s and outs[0][1] is n  # [(), ()]: no [B, T, V] logits leave the graph
    torch.testing.assert_close(s / n, _own_loss(_transformers(dirs["gpt_neox" if family == "hf" else "gpt2"]), batch),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("arch", ["gpt_neox", "opt"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(dirs: dict[str, Path], arch: str) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from llmtrain.distributed.base import apply_activation_checkpointing

    spec, _, model = _build(dirs[arch])
    batch = _batch()
    s, n = spec.loss(model, batch)
    (s / n).backward()
    plain = _grads(model)
    model.zero_grad(set_to_none=True)
    apply_activation_checkpointing(model, spec.block_classes(model))
    assert sum(isinstance(m, CheckpointWrapper) for m in model.modules()) == 2  # each decoder layer
    s2, n2 = spec.loss(model, batch)
    (s2 / n2).backward()
    assert torch.equal(s, s2)
    ckpt = _grads(model)
    assert ckpt.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-6, atol=0, msg=k)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_decoder_layers_are_found_from_the_model(dirs: dict[str, Path], arch: str) -> None:
    """FSDP's and activation checkpointing's block classes: the model's own _no_split_modules, resolved inside it."""
    spec, _, model = _build(dirs[arch])
    classes = spec.block_classes(model)
    assert [c.__name__ for c in classes] == list(model._no_split_modules)
    assert sum(isinstance(m, classes) for m in model.modules()) == 2


def test_decoder_layers_without_no_split_modules(dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """An architecture that names none: the class of its largest list of like modules."""
    _, _, model = _build(dirs["gpt_neox"])
    monkeypatch.setattr(type(model), "_no_split_modules", None)
    assert [c.__name__ for c in hf.block_classes_of(model)] == ["GPTNeoXLayer"]


def test_fsdp_shards_the_decoder_layers_the_model_names(dirs: dict[str, Path]) -> None:
    """strategy=fsdp (one rank) with activation checkpointing: each decoder layer, inside its checkpoint wrapper,
    is an FSDP unit of its own, the root holds the rest (the tied embedding and head once); the loss is the plain
    model's."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule

    from llmtrain.distributed import Dist, SetupArgs, StrategyConfig, StrategyName, build_strategy
    from llmtrain.distributed.env import destroy_process_group
    from llmtrain.precision import Precision

    spec, _, model = _build(dirs["gemma"])
    batch = _batch()
    with torch.no_grad():
        want, _ = spec.loss(model, batch)
    strategy = build_strategy(StrategyConfig(name=StrategyName.fsdp), Dist(), torch.device("cpu"))
    try:
        strategy.setup(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                       SetupArgs(precision=Precision.fp32, gradient_checkpointing=True, compile=False,
                                 block_classes=spec.block_classes(model), micro_batch_size=2, grad_accum_steps=1,
                                 grad_clip=1.0))
        layers = list(model.model.layers)
        assert len(layers) == 2 and all(isinstance(m, CheckpointWrapper) and isinstance(m, FSDPModule) for m in layers)
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        assert units == [model, *layers]
        assert model.lm_head.weight is model.model.embed_tokens.weight
        with torch.no_grad():
            got, _ = spec.loss(strategy.model, batch)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    finally:
        strategy.close()
        destroy_process_group()


# training, export, eval ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("hf_run") / "run"
    run(compose([*hf_args(dirs["gpt_neox"], "trainer.max_steps=30", "trainer.ckpt_every=30", "trainer.eval_every=30"),
                 f"hydra.run.dir={run_dir}"]), run_dir)
    return run_dir


def test_training_lowers_the_loss_from_transformers_own_first_loss(dirs: dict[str, Path], trained: Path) -> None:
    from llmtrain.data.base import build_data

    got = losses(trained)
    assert sorted(got) == list(range(1, 31))
    assert np.mean([got[s] for s in range(26, 31)]) < 0.8 * got[1], got
    cfg = compose(hf_args(dirs["gpt_neox"]))
    loader = build_data(cfg.data).loader("train", 4, seed=cfg.trainer.seed, shuffle=True, rank=0, world_size=1,
                                         device=torch.device("cpu"))
    with torch.no_grad():
        want = _own_loss(_transformers(dirs["gpt_neox"]).train(), next(loader)).item()
    assert got[1] == pytest.approx(want, rel=1e-6)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_export_loads_in_transformers_with_the_trained_logits(dirs: dict[str, Path], trained: Path) -> None:
    """final/ is a transformers dir (safetensors, the architecture's own class, the tokenizer): it holds the last
    checkpoint's weights, which moved from the pretrained ones."""
    from transformers import AutoModelForCausalLM

    from llmtrain import checkpoint as ckpt
    from llmtrain.restore import checkpoint_state, plain_model
    from llmtrain.rundir import read_config

    final = trained / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert json.loads((final / "config.json").read_text())["architectures"] == ["GPTNeoXForCausalLM"]
    exported = AutoModelForCausalLM.from_pretrained(final)
    assert type(exported).__module__.startswith("transformers.")
    cfg = read_config(trained, "run")
    spec, data, state = checkpoint_state(cfg, ckpt.step_dir(trained, 30))
    ids = _batch()["input_ids"]
    want = _logits(plain_model(spec, cfg.model, data.info, state), ids)
    torch.testing.assert_close(_logits(exported, ids), want, rtol=0, atol=0)
    assert not torch.allclose(_logits(_transformers(dirs["gpt_neox"]), ids), want, atol=1e-3)


def test_export_is_sharded_past_the_limit(dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, conf, model = _build(dirs["phi"])
    monkeypatch.setattr(hf, "MAX_SHARD_SIZE", "40KB")
    spec.export(model, conf.model, None, tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "out" / "model.safetensors").exists()
    ids = _batch()["input_ids"]
    torch.testing.assert_close(_logits(_transformers(tmp_path / "out"), ids), _logits(model, ids), rtol=0, atol=0)


def test_eval_scores_the_export_as_the_trainer_did(trained: Path) -> None:
    """llmtrain-eval over the export (the protocol's nll: the chunked loss) on the trainer's eval blocks gives the
    trainer's eval loss."""
    from llmtrain.generation.eval import run as eval_run

    want = next(r["eval_loss"] for r in read_metrics(trained) if "eval_loss" in r)
    got = eval_run(compose([f"source={trained / 'final'}", "data.tokenizer=byte", "data.seq_len=32",
                            "data.embedded_max_bytes=200000", "batch_size=4", "batches=2"], "eval"))
    assert got["eval_loss"] == pytest.approx(want, rel=1e-5)


# LoRA ----------------------------------------------------------------------------------------------------------
LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0",
        "trainer.max_steps=4", "trainer.ckpt_every=4", "optim.lr=1e-2"]


@pytest.mark.parametrize(("arch", "targets", "fan_in_fan_out"), [
    ("gpt_neox", ["query_key_value"], False),  # peft's targets for GPT-NeoX; nn.Linear
    ("gpt2", ["c_attn"], True),  # transformers' GPT-2 through model=hf: Conv1D, [in, out]
    ("phi", ["dense", "fc2"], False),  # overridden by model.lora.target_modules
])
def test_lora_trains_adapters_and_the_merged_export_equals_the_peft_model(
        dirs: dict[str, Path], tmp_path: Path, arch: str, targets: list[str], fan_in_fan_out: bool) -> None:
    from helpers import ckpt_state
    from peft import PeftModel

    from llmtrain import checkpoint as ckpt

    extra = [f"model.lora.target_modules=[{','.join(targets)}]"] if arch == "phi" else []
    run_dir = tmp_path / "run"
    run(compose([*hf_args(dirs[arch], *LORA, *extra), f"hydra.run.dir={run_dir}"]), run_dir)
    saved = ckpt_state(ckpt.step_dir(run_dir, 4))["model"]
    adapted = sorted({k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in saved})
    assert all(".lora_" in k for k in saved) and adapted == sorted(targets), sorted(saved)[:4]
    acfg = json.loads((run_dir / "final" / "adapter" / "adapter_config.json").read_text())
    assert acfg["fan_in_fan_out"] is fan_in_fan_out and sorted(acfg["target_modules"]) == sorted(targets)
    ids = _batch()["input_ids"]
    merged = _logits(_transformers(run_dir / "final"), ids)
    base = _transformers(dirs[arch])
    peft_model = PeftModel.from_pretrained(base, run_dir / "final" / "adapter")
    want = _logits(peft_model, ids)
    assert ((merged - want).norm() / want.norm()).item() < 1e-5
    assert not torch.allclose(_logits(_transformers(dirs[arch]), ids), want, atol=1e-4)  # the adapters moved it


def test_lora_targets_per_architecture(dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """peft's defaults for the model type; for a type peft does not know, every linear layer in the decoder
    layers."""
    from peft.utils import constants

    spec = get_model_spec("hf")
    conf = {a: _build(dirs[a])[1].model for a in ("gpt_neox", "opt", "gpt2")}
    assert spec.lora_targets(conf["gpt_neox"]) == ["query_key_value"]
    assert spec.lora_targets(conf["opt"]) == ["q_proj", "v_proj"]
    assert [spec.adapter_fan_in_fan_out(c) for c in conf.values()] == [False, False, True]
    monkeypatch.delitem(constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "gpt_neox")
    assert spec.lora_targets(conf["gpt_neox"]) == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]


# generation ------------------------------------------------------------------------------------------------------
def _greedy(model: torch.nn.Module, tok: Any, prompts: list[str], n: int) -> list[str]:
    """transformers' generate over a left-padded batch."""
    rows = [tok.encode(p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[EOS] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = model.eval().generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=EOS)
    return [tok.decode(o[width:].tolist()) for o in out]


@pytest.mark.parametrize("arch", ["gpt_neox", "phi", "opt", "gpt2"])
def test_greedy_equals_transformers_generate(dirs: dict[str, Path], arch: str) -> None:
    """Through the protocol (DynamicCache, attention_mask and position_ids for the left padding): a batch, each
    prompt alone, other batch sizes. GPT-2 (learned absolute positions) is driven through model=hf's adapter here;
    its dirs generate through the gpt2 family."""
    from llmtrain.data.tokenizers import Tokenizer
    from llmtrain.generation import Generator

    if arch == "gpt2":
        gen = Generator(hf.HFCausalLM(hf.load_pretrained(dirs[arch], "model")), Tokenizer.from_dir(dirs[arch]))
    else:
        gen = Generator.from_pretrained(dirs[arch], device="cpu")
    assert isinstance(gen.model, hf.HFCausalLM)
    n = 24
    ours = [c.completion for c in gen(PROMPTS, max_new_tokens=n, do_sample=False, stop_at_eos=False)]
    assert all(len(set(gen.tok.encode(c))) >= 4 for c in ours), ours  # varied text: a cache bug would show
    ref = _transformers(dirs[arch])
    assert ours == _greedy(ref, gen.tok, PROMPTS, n)  # the left-padded batch
    assert ours == [_greedy(ref, gen.tok, [p], n)[0] for p in PROMPTS]  # and each prompt alone
    assert ours == [c.completion for c in gen(PROMPTS, max_new_tokens=n, do_sample=False, stop_at_eos=False,
                                                 batch_size=3)]


def test_generate_cli_from_a_run_and_compiled(trained: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """llmtrain-generate source=<run> (its final/) prints transformers' greedy text for a left-padded batch; with
    compile=true too: transformers' static cache under one fullgraph-compiled step (dynamo's capture checked, its
    one graph run eagerly: inductor's code generation is torch's own and takes a minute here)."""
    from llmtrain.data.tokenizers import Tokenizer
    from llmtrain.generation.cli import run as generate

    prompts = ["def main(", "x"]
    (trained.parent / "prompts.txt").write_text("\n".join(prompts) + "\n")
    want = _greedy(_transformers(trained / "final"), Tokenizer.from_dir(trained / "final"), prompts, 6)
    compile_ = torch.compile
    graphs: list[torch.fx.GraphModule] = []

    def eager_backend(fn: Any, **kw: Any) -> Any:
        assert kw["fullgraph"] is True and kw["dynamic"] is False

        def backend(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]) -> Any:
            graphs.append(gm)
            return gm.forward
        return compile_(fn, **{**kw, "mode": None, "backend": backend})

    monkeypatch.setattr(torch, "compile", eager_backend)
    for extra in ([], ["compile=true"]):
        capsys.readouterr()
        generate(compose([f"source={trained}", f"prompts_file={trained.parent / 'prompts.txt'}", "max_new_tokens=6",
                          "do_sample=false", "stop_at_eos=false", "output=jsonl", *extra], "generate"))
        out = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
        assert [r["completion"] for r in out] == want, (extra, out)
    assert len(graphs) == 1  # every step of the batch ran the one graph: the cache's shapes never changed


# refusals --------------------------------------------------------------------------------------------------------
REMOTE_CODE = "import pathlib\npathlib.Path({marker!r}).touch()\n"


def _refused(capsys: pytest.CaptureFixture, fn: Any, *words: str, marker: Path | None = None) -> str:
    """fn() exits non-zero with exactly one error line holding `words`, no traceback, and no marker file."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        fn()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("llmtrain: error:")]
    assert ei.value.code not in (0, None) and len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]
    assert marker is None or not marker.exists(), "the dir's code ran"
    return lines[0]


def _remote_dir(d: Path, marker: Path, model_type: str, base: Path | None = None) -> Path:
    """A model dir asking for its own code (auto_map), which would create `marker` when imported."""
    import shutil

    if base is not None:
        shutil.copytree(base, d)
    d.mkdir(exist_ok=True)
    (d / "evil.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    meta = json.loads((d / "config.json").read_text()) if base is not None else {}
    meta.update(model_type=model_type, auto_map={"AutoConfig": "evil.Cfg", "AutoModelForCausalLM": "evil.Model"})
    (d / "config.json").write_text(json.dumps(meta))
    return d


def _train(d: Path, run_dir: Path, *extra: str) -> Any:
    return lambda: run(compose([*hf_args(d, "trainer.max_steps=1", *extra), f"hydra.run.dir={run_dir}"]), run_dir)


def _generate(source: Path, *extra: str) -> Any:
    from llmtrain.generation.cli import run as generate

    return lambda: generate(compose([f"source={source}", "prompt=x", "max_new_tokens=2", *extra], "generate"))


@pytest.mark.parametrize("command", ["train", "generate"])
def test_an_architecture_that_needs_remote_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           command: str) -> None:
    marker = tmp_path / "pwned"
    d = _remote_dir(tmp_path / "model", marker, "evil_lm")
    fn = _train(d, tmp_path / "run") if command == "train" else _generate(d)
    line = _refused(capsys, fn, str(d), "needs its own Python code (auto_map", "never runs", marker=marker)
    assert "trust_remote_code" not in line


def test_auto_map_over_a_known_type_loads_transformers_own_class(dirs: dict[str, Path], tmp_path: Path) -> None:
    """A dir of a type transformers ships that also names its own code: transformers' class is built, the dir's code
    is never imported."""
    marker = tmp_path / "pwned"
    d = _remote_dir(tmp_path / "model", marker, "gpt_neox", base=dirs["gpt_neox"])
    _, _, model = _build(d)
    assert type(model).__module__ == "transformers.models.gpt_neox.modeling_gpt_neox" and not marker.exists()


def test_weights_that_would_run_code_are_refused(dirs: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    import os
    import shutil

    class Payload:
        def __reduce__(self) -> Any:
            return os.system, (f"touch {marker}",)

    marker = tmp_path / "pwned"
    d = tmp_path / "model"
    shutil.copytree(dirs["gpt_neox"], d)
    (d / "model.safetensors").unlink()
    torch.save({"gpt_neox.embed_in.weight": Payload()}, d / "pytorch_model.bin")
    _refused(capsys, _train(d, tmp_path / "run"), str(d), "is refused", marker=marker)
    _refused(capsys, _generate(d), str(d), "is refused", marker=marker)


@pytest.mark.parametrize(("meta", "words"), [
    ({"model_type": "no_such_lm"}, ["'no_such_lm'", "does not know"]),
    ({"model_type": "vit"}, ["'vit'", "no causal-LM class"]),
])
def test_a_type_transformers_cannot_train_as_a_causal_lm(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         meta: dict[str, str], words: list[str]) -> None:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(meta))
    _refused(capsys, _train(d, tmp_path / "run"), "model.pretrained", *words)


def test_refusals_of_the_family_config(dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [a for a in hf_args(dirs["gpt_neox"]) if not a.startswith("model.pretrained=")]
    _refused(capsys, lambda: run(compose(args), tmp_path / "a"), "model.pretrained: is required")
    _refused(capsys, _train(dirs["gpt_neox"], tmp_path / "b", "model.attn_implementation=flash"),
             "model.attn_implementation: unknown attention 'flash'")


@pytest.fixture(scope="module")
def no_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OpenAI GPT: no cache, no attention mask, no compiled decoding step in transformers."""
    return _save(tmp_path_factory.mktemp("openai") / "m", "openai-gpt", vocab_size=VOCAB, n_positions=64, n_embd=32,
                 n_layer=2, n_head=2, initializer_range=0.3)


def test_an_architecture_without_a_cache_decodes_by_running_the_tokens_again(no_cache_dir: Path) -> None:
    from llmtrain.generation import Generator

    gen = Generator.from_pretrained(no_cache_dir, device="cpu")
    ref = _transformers(no_cache_dir)
    alone = [gen(p, max_new_tokens=8, do_sample=False, stop_at_eos=False)[0].completion for p in PROMPTS]
    assert alone == [_greedy(ref, gen.tok, [p], 8)[0] for p in PROMPTS]
    assert [c.completion for c in gen(PROMPTS, max_new_tokens=8, do_sample=False, stop_at_eos=False)] == alone


def test_what_an_architecture_cannot_decode_is_one_line(no_cache_dir: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiled step where transformers has none; no left-padded batch for a forward without attention_mask."""
    from llmtrain.generation import Generator
    from llmtrain.generation.cli import run as generate

    _refused(capsys, lambda: generate(compose([f"source={no_cache_dir}", "prompt=x", "max_new_tokens=2",
                                               "compile=true"], "generate")),
             "compile: transformers has no compiled decoding step for 'openai-gpt' models; use compile=false")
    gen = Generator.from_pretrained(no_cache_dir, device="cpu")
    monkeypatch.setattr(gen.model, "params", gen.model.params - {"attention_mask"})
    assert gen(PROMPTS[0], max_new_tokens=2)  # one prompt: nothing to mask
    with pytest.raises(ConfigError, match="batch_size: 'openai-gpt' models take no attention mask"):
        gen(PROMPTS, max_new_tokens=2)
