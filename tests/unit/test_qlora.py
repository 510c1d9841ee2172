"""QLoRA (`model.quantize=nf4` with LoRA): the blocks' linear weights held in 4 bits by bitsandbytes, adapters
trained on them; the export is the function that was trained (each weight dequantised as bitsandbytes does, the
adapters merged), resume is exact, the planner's bytes are bitsandbytes', and the refusals are one line each.

Training a 4-bit base is refused on a CPU; these tests run bitsandbytes' CPU path (LLMTRAIN_QUANTIZE_ON_CPU=1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY_LM, ckpt_state, compose, losses, transformers_gpt2_dir

from llmtrain import checkpoint as ckpt
from llmtrain.errors import ConfigError
from llmtrain.models.quantize import CPU_ENV, quantized_bytes
from llmtrain.train import run

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")
LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0"]
QLORA = [*LORA, "model.quantize=nf4"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return transformers_gpt2_dir(tmp_path_factory.mktemp("pretrained"))


@pytest.fixture
def on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_ENV, "1")


def ft(pretrained: Path, *extra: str) -> list[str]:
    return [*TINY_LM, f"model.pretrained={pretrained}", "trainer.eval_every=0", "optim.lr=1e-2",
            "scheduler.warmup_steps=0", *extra]


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """An nn.Linear weight [out, in] quantised and dequantised by bitsandbytes directly (NF4, blocks of 64, double
    quantisation)."""
    packed, qs = bnb.functional.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnb.functional.dequantize_4bit(packed, qs)


@pytest.mark.usefixtures("on_cpu")
def test_qlora_trains_adapters_on_a_4bit_base_and_exports_what_it_computed(pretrained: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    run_dir = tmp_path / "qlora"
    run(compose(ft(pretrained, *QLORA, "trainer.max_steps=6")), run_dir)
    run(compose(ft(pretrained, *LORA, "trainer.max_steps=1")), tmp_path / "lora")
    # the same first batch on the 4-bit base: a different loss from the full-precision base's, and a close one
    q1, l1 = losses(run_dir)[1], losses(tmp_path / "lora")[1]
    assert q1 != l1 and abs(q1 - l1) / l1 < 0.01, (q1, l1)
    saved = ckpt_state(ckpt.step_dir(run_dir, 6))  # the adapters only: the 4-bit base comes from the pretrained dir
    assert saved["model"] and all(".lora_" in k for k in saved["model"]), sorted(saved["model"])[:4]
    base, merged = _safetensors(pretrained / "model.safetensors"), _safetensors(run_dir / "final" / "model.safetensors")
    adapter = _safetensors(run_dir / "final" / "adapter" / "adapter_model.safetensors")
    adapted = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] + ".weight" for k in adapter}
    assert len(adapted) == 8  # every linear layer of both blocks: all of them were held in 4 bits
    dequantized = dict(base)
    for k in adapted:
        pre = "base_model.model." + k.removesuffix(".weight")
        delta = (adapter[f"{pre}.lora_B.weight"] @ adapter[f"{pre}.lora_A.weight"]) * (8 / 4)  # [out, in]
        dequantized[k] = nf4_roundtrip(base[k].T).T  # transformers' Conv1D stores [in, out]
        torch.testing.assert_close(merged[k], dequantized[k] + delta.T, rtol=0, atol=1e-6)
        assert (merged[k] - (base[k] + delta.T)).abs().max() > 1e-3  # not the full-precision base
    for k, w in base.items():  # embeddings, norms, biases: as they were
        if k not in adapted:
            assert torch.equal(merged[k], w), k
    # llmtrain-export from the checkpoint rebuilds the same 4-bit base: the same weights as the run's own final/
    from llmtrain.export import main as export

    export([str(run_dir), "--out", str(tmp_path / "exported")])
    again = _safetensors(tmp_path / "exported" / "model.safetensors")
    assert again.keys() == merged.keys() and all(torch.equal(again[k], merged[k]) for k in merged)
    # final/ computes what the adapter over the dequantised base computes
    plain = GPT2LMHeadModel.from_pretrained(pretrained)
    assert plain.load_state_dict(dequantized, strict=False).missing_keys == ["lm_head.weight"]  # tied
    peft_model = PeftModel.from_pretrained(plain, run_dir / "final" / "adapter").eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = GPT2LMHeadModel.from_pretrained(run_dir / "final").eval()(ids).logits, peft_model(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5


@pytest.mark.usefixtures("on_cpu")
def test_bf16_qlora_exported_from_its_checkpoint_equals_its_final(pretrained: Path, tmp_path: Path) -> None:
    """The base's embeddings and norms computed in bf16: llmtrain-export rebuilds them in the precision the
    checkpoint's manifest names, so its weights are the run's own final/'s."""
    from llmtrain.export import main as export

    run_dir = tmp_path / "run"
    run(compose(ft(pretrained, *QLORA, "trainer.precision=bf16", "trainer.max_steps=2")), run_dir)
    export([str(run_dir), "--out", str(tmp_path / "exported")])
    final = _safetensors(run_dir / "final" / "model.safetensors")
    again = _safetensors(tmp_path / "exported" / "model.safetensors")
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)
    wte = final["transformer.wte.weight"]
    assert torch.equal(wte, wte.bfloat16().float())  # stored as the run held it: bf16 values


@pytest.mark.usefixtures("on_cpu")
def test_qlora_resume_is_exact(pretrained: Path, tmp_path: Path) -> None:
    """The checkpoint holds the adapters; the 4-bit base is rebuilt and quantised again on resume, the same."""
    args = ft(pretrained, *QLORA, "model.lora.dropout=0.1", "trainer.grad_accum_steps=2", "trainer.ckpt_every=3",
              "scheduler.warmup_steps=2")  # the first 3 steps as a 6-step run takes them
    run(compose([*args, "trainer.max_steps=6"]), tmp_path / "ref")
    run(compose([*args, "trainer.max_steps=3"]), tmp_path / "run")
    run(compose([*args, "trainer.max_steps=6"]), tmp_path / "run")
    assert losses(tmp_path / "run") == losses(tmp_path / "ref") and len(losses(tmp_path / "ref")) == 6


@pytest.mark.usefixtures("on_cpu")
def test_qlora_under_ddp_matches_one_process(pretrained: Path, tmp_path: Path) -> None:
    """2 processes × batch 2 on the 4-bit base (each rank quantises the same weights the same way; the adapters'
    gradients all-reduced) follow 1 process × batch 4."""
    from helpers import train_cli

    args = ft(pretrained, *QLORA, "trainer.max_steps=4", "trainer.ckpt_every=4")
    run(compose([*args, "trainer.micro_batch_size=4"]), tmp_path / "single")
    train_cli([*args, "strategy=ddp", "trainer.micro_batch_size=2"], tmp_path / "ddp", nproc=2,
              env={CPU_ENV: "1"})
    ref, got = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert sorted(got) == [1, 2, 3, 4] and max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref) < 1e-5, (got, ref)


def test_planned_4bit_bytes_are_what_bitsandbytes_stores() -> None:
    """A Llama-3-8B MLP weight: codes, 8-bit scales and their fp32 scales as quantize_4bit makes them."""
    w = torch.randn(14336, 4096 // 16)  # a slice: the same bytes per weight, a 16th of the memory
    packed, qs = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    stored = packed.nbytes + qs.absmax.nbytes + qs.state2.absmax.nbytes + 4  # + the scales' offset (one fp32)
    assert abs(quantized_bytes(w.numel()) - stored) / stored < 1e-3, (quantized_bytes(w.numel()), stored)
    assert 0.51 < stored / w.numel() < 0.52


def test_plan_llama3_8b_qlora_fits_a_24gb_gpu_where_lora_does_not() -> None:
    from llmtrain import plan

    args = ["model=llama3_8b", "model.lora.enabled=true", "trainer.gradient_checkpointing=true"]
    gpu = plan.Cluster(gpu="rtx4090")
    q = plan.shape_of(compose([*args, "model.quantize=nf4"]))
    C, kv, inter, L = 4096, 1024, 14336, 32
    assert q.n_quantized == L * (2 * C * C + 2 * C * kv + 3 * C * inter)  # q, o; k, v; gate, up, down
    single = plan.plan(q, gpu)[0]
    assert single.strategy == "single" and single.fits and single.memory.total / plan.GIB < 12
    assert [r.strategy for r in plan.plan(q, gpu)] == ["single", "ddp"]
    lora = plan.shape_of(compose(args))
    assert not plan.plan(lora, gpu)[0].fits
    with pytest.raises(ConfigError, match="model.quantize=nf4"):
        plan.choose(lora, gpu)


@pytest.mark.parametrize("extra, key, words", [
    ([], "model.quantize", "trains on a CUDA GPU"),  # this machine has none
    (["model.lora.enabled=false"], "model.quantize", "model.lora.enabled=true"),
    (["model.quantize=int8"], "model.quantize", "nf4, fp4"),
    (["strategy=fsdp"], "model.quantize", "single or ddp"),
])
def test_refusals(pretrained: Path, tmp_path: Path, extra: list[str], key: str, words: str,
                  capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        run(compose(ft(pretrained, *QLORA, "trainer.max_steps=1", *extra)), tmp_path / "run")
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("llmtrain: error")]
    assert ei.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"llmtrain: error: {key}: "), err
    assert words in lines[0] and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bf16_compute_keeps_the_frozen_rest_in_bf16_and_the_adapters_in_fp32() -> None:
    """Mixed precision: the 4-bit layers compute in bf16, the embeddings and norms are stored in bf16 (frozen: no
    fp32 copy), the adapters train in fp32; a bf16 autocast step gives them finite gradients."""
    from types import SimpleNamespace

    from llmtrain.models import adapters, quantize
    from llmtrain.models.gpt2 import GPT2Spec
    from llmtrain.models.gpt2_native import GPT2, GPT2Dims

    torch.manual_seed(0)
    model = GPT2(GPT2Dims(vocab_size=257, n_positions=64, n_embd=64, n_layer=2, n_head=2))
    lora = adapters.LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["c_attn", "c_fc"])
    cfg = SimpleNamespace(quantize="nf4", lora=lora)
    model = adapters.inject_lora(quantize.apply(model, cfg, GPT2Spec(), torch.bfloat16), lora)
    quantize.materialize(model)
    kinds = {n: (type(p).__name__, p.dtype) for n, p in model.named_parameters()}
    assert kinds["transformer.wte.weight"] == ("Parameter", torch.bfloat16)
    assert kinds["transformer.h.0.attn.c_attn.base_layer.weight"] == ("Params4bit", torch.uint8)
    assert kinds["transformer.h.0.attn.c_proj.weight"] == ("Params4bit", torch.uint8)  # not adapted, still 4 bits
    assert {d for n, (_, d) in kinds.items() if ".lora_" in n} == {torch.float32}
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1)[:-1], ids.flatten()[1:]).backward()
    grads = [p.grad for n, p in model.named_parameters() if ".lora_B" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.isfinite().all() and g.abs().max() > 0
                         for g in grads)


@pytest.mark.usefixtures("on_cpu")
def test_a_model_without_linear_layers_in_its_blocks_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """transformers' GPT-2 stores its projections as Conv1D, which bitsandbytes does not quantise."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        run(compose([*TINY_LM, "model.impl=hf", *QLORA, "trainer.max_steps=1"]), tmp_path / "run")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("llmtrain: error")]
    assert ei.value.code == 2 and len(lines) == 1 and "hold no nn.Linear" in lines[0], lines
    assert "model.impl=native" in lines[0] and not (tmp_path / "run" / "checkpoints").exists()
