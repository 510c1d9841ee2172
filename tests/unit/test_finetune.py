"""Fine-tuning from a pretrained GPT-2 (a small one saved with transformers' save_pretrained stands in):
LoRA through peft (only adapters train, merged export = PEFT model, exact resume), freezing, keep_best and
early stopping, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_LM, ckpt_state, compose, losses, transformers_gpt2_dir

from llmtrain import checkpoint as ckpt
from llmtrain.train import run
from llmtrain.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 on the byte vocabulary, saved as transformers saves it, with its tokenizer."""
    return transformers_gpt2_dir(tmp_path_factory.mktemp("pretrained"))


def ft(pretrained: Path, *extra: str) -> list[str]:
    return [*TINY_LM, f"model.pretrained={pretrained}", "trainer.eval_every=0", "optim.lr=1e-2",
            "scheduler.warmup_steps=0", *extra]


LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"]


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_lora_trains_only_adapters_and_exports_the_merged_model(pretrained: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    run_dir = tmp_path / "run"
    run(compose(ft(pretrained, *LORA, "model.lora.dropout=0", "trainer.max_steps=6")), run_dir)
    # checkpoints hold the adapters (and their optimizer state) only
    saved = ckpt_state(ckpt.step_dir(run_dir, 6))
    assert saved["model"] and all(".lora_" in k for k in saved["model"]), sorted(saved["model"])[:4]
    assert len(saved["optim"]["state"]) == len(saved["model"]) == 2 * 4 * 2  # A, B × 4 layers × 2 blocks
    # every weight LoRA does not touch is bit-identical to the pretrained one; adapted ones moved by scale·B·A
    base, merged = _safetensors(pretrained / "model.safetensors"), _safetensors(run_dir / "final" / "model.safetensors")
    adapter = _safetensors(run_dir / "final" / "adapter" / "adapter_model.safetensors")
    adapted = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] + ".weight" for k in adapter}
    assert len(adapted) == 8
    for k, w in base.items():
        if k in adapted:
            pre = "base_model.model." + k.removesuffix(".weight")
            delta = (adapter[f"{pre}.lora_B.weight"] @ adapter[f"{pre}.lora_A.weight"]) * (8 / 4)  # [out, in]
            assert delta.abs().max() > 0
            torch.testing.assert_close(merged[k] - w, delta.T, rtol=1e-4, atol=1e-6)  # Conv1D: [in, out]
        else:
            assert torch.equal(merged[k], w), k
    # the merged export and the PEFT adapter over the base give the same logits
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    full = GPT2LMHeadModel.from_pretrained(run_dir / "final").eval()
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(pretrained), run_dir / "final" / "adapter")
    with torch.no_grad():
        a, b = full(ids).logits, peft_model.eval()(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5
    cfg = json.loads((run_dir / "final" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["fan_in_fan_out"] is True and cfg["base_model_name_or_path"] == str(pretrained)


def test_lora_resume_is_exact(pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Dropout in the adapters and accumulation: a run stopped at step 3 and resumed matches one never stopped,
    past warmup into the decay of the schedule."""
    args = ft(pretrained, *LORA, "model.lora.dropout=0.1", "trainer.grad_accum_steps=2", "trainer.ckpt_every=3",
              "scheduler.warmup_steps=2")
    run(compose([*args, "trainer.max_steps=6"]), tmp_path / "ref")
    run(compose([*args, "trainer.max_steps=3"]), tmp_path / "run")
    capsys.readouterr()
    run(compose([*args, "trainer.max_steps=6"]), tmp_path / "run")
    assert "at step 3" in capsys.readouterr().out
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
    assert len(losses(tmp_path / "ref")) == 6


def test_frozen_parameters_stay_and_get_no_optimizer_state(pretrained: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run(compose(ft(pretrained, "model.freeze=[transformer.wte.*,transformer.h.0.*]", "trainer.max_steps=3")),
        run_dir)
    base, out = _safetensors(pretrained / "model.safetensors"), _safetensors(run_dir / "final" / "model.safetensors")
    frozen = [k for k in base if k.startswith(("transformer.wte.", "transformer.h.0."))]
    assert frozen and all(torch.equal(out[k], base[k]) for k in frozen)
    assert not torch.equal(out["transformer.h.1.mlp.c_fc.weight"], base["transformer.h.1.mlp.c_fc.weight"])
    saved = ckpt_state(ckpt.step_dir(run_dir, 3))
    assert not any(k.startswith(("transformer.wte.", "transformer.h.0.")) for k in saved["model"])
    trainable = [k for k in saved["model"] if k != "lm_head.weight"]
    assert len(saved["optim"]["state"]) == len(trainable) == 12 + 2 + 1  # block 1, ln_f, wpe


def _scripted_evals(monkeypatch: pytest.MonkeyPatch, seq: dict[int, float]) -> None:
    """Evaluation returns a scripted eval loss per step (the rest of the run is real)."""

    def evaluate(self: Trainer) -> dict:
        rec = {"step": self.step, "eval_loss": seq[self.step]}
        self.logger.log(rec)
        return rec

    monkeypatch.setattr(Trainer, "evaluate", evaluate)


def test_keep_best_and_early_stopping_survive_resume(pretrained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    _scripted_evals(monkeypatch, {1: 3.0, 2: 2.0, 3: 2.5, 4: 1.5, 5: 1.6, 6: 1.7, 7: 1.8, 8: 1.9, 9: 2.0, 10: 2.1})
    args = ft(pretrained, "trainer.eval_every=1", "trainer.ckpt_every=1", "trainer.keep_checkpoints=20",
              "trainer.keep_best=true", "trainer.early_stop_patience=3")
    run_dir = tmp_path / "run"
    run(compose([*args, "trainer.max_steps=5"]), run_dir)  # best at step 4; one evaluation without a better one
    assert json.loads((run_dir / "best" / "llmtrain_export.json").read_text())["step"] == 4
    capsys.readouterr()
    run(compose([*args, "trainer.max_steps=10"]), run_dir)  # 6, 7: the third evaluation without improvement
    out = capsys.readouterr().out
    assert "step 7: early stop: eval_loss has not improved on 1.5000 (step 4) for 3 evaluations" in out
    assert max(losses(run_dir)) == 7 and read_step(run_dir / "final") == 7
    best = json.loads((run_dir / "best" / "llmtrain_export.json").read_text())
    assert best["step"] == 4 and best["eval_loss"] == 1.5
    # best/ holds the weights of step 4's checkpoint
    step4 = ckpt_state(ckpt.step_dir(run_dir, 4))["model"]
    exported = _safetensors(run_dir / "best" / "model.safetensors")
    torch.testing.assert_close(exported["transformer.h.1.mlp.c_fc.weight"],
                               step4["transformer.h.1.mlp.c_fc.weight"].T, rtol=0, atol=0)
    # the rerun finds the run complete
    run(compose([*args, "trainer.max_steps=10"]), run_dir)
    assert "is complete (step 7 of 10 (stopped early)" in capsys.readouterr().out


def read_step(d: Path) -> int | None:
    from llmtrain.export import read_export_step

    return read_export_step(d)


@pytest.mark.parametrize("override,key", [
    ("model.lora.r=0", "model.lora.r"),
    ("model.lora.target_modules=[q_proj]", "model.lora.target_modules"),
    ("strategy=fsdp", "model.lora.enabled"),
    ("optim=adamw8bit", "optim.name"),
])
def test_lora_refusals_are_one_line(pretrained: Path, tmp_path: Path, override: str, key: str,
                                    capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        run(compose(ft(pretrained, *LORA, override, "trainer.max_steps=2")), tmp_path / "run")
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("llmtrain: error")]
    assert ei.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"llmtrain: error: {key}: "), err
    assert "Traceback" not in err


def test_freeze_pattern_that_matches_nothing(pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        run(compose(ft(pretrained, "model.freeze=[transformer.embed.*]", "trainer.max_steps=2")), tmp_path / "run")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ei.value.code == 2 and err.startswith("llmtrain: error: model.freeze: pattern 'transformer.embed.*' "
                                                 "matches no parameter"), err


def test_lora_under_ddp_matches_one_process(pretrained: Path, tmp_path: Path) -> None:
    """2 processes × batch 2 with LoRA (frozen base, adapters all-reduced) follow 1 process × batch 4, and the
    checkpoint holds the adapters only."""
    from helpers import train_cli

    args = ft(pretrained, *LORA, "model.lora.dropout=0", "trainer.max_steps=5", "trainer.ckpt_every=5")
    run(compose([*args, "trainer.micro_batch_size=4"]), tmp_path / "single")
    train_cli([*args, "strategy=ddp", "trainer.micro_batch_size=2"], tmp_path / "ddp", nproc=2)
    ref, got = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert sorted(got) == [1, 2, 3, 4, 5]
    assert max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref) < 1e-5, (got, ref)
    saved = ckpt_state(ckpt.step_dir(tmp_path / "ddp", 5))
    assert all(".lora_" in k for k in saved["model"])


def _val_loss(model: torch.nn.Module, data) -> float:
    from llmtrain.models.gpt2 import GPT2Spec

    ds = data.split("val")
    with torch.no_grad():
        s, n = GPT2Spec().loss(model.eval(), ds.get(np.arange(len(ds))))
    return float(s) / float(n)


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_finetuning_learns_a_mapping_the_base_cannot_know(pretrained: Path, tmp_path: Path, mode: str) -> None:
    """Random 3-letter codes for 12 names (evaluated on the same pairs): the fine-tuned model's eval loss on the
    completions falls far below the pretrained model's."""
    from llmtrain.data.base import build_data
    from llmtrain.models.gpt2_native import load_hf

    rng = np.random.default_rng(0)
    names = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"]
    data = tmp_path / "codes.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"code of {n}: ", "completion": "".join(rng.choice(list("xyzqv"), 3))})
                            + "\n" for n in names))
    extra = ["data.packing=true", "data.seq_len=48", "trainer.micro_batch_size=2"] if mode == "packed" else []
    args = [*[o for o in TINY_LM if not o.startswith("data.")], "data=instruct", f"data.source={data}",
            f"data.val_source={data}", f"model.pretrained={pretrained}", "trainer.max_steps=60", "trainer.eval_every=0",
            "scheduler.warmup_steps=0", "optim.lr=1e-2", *extra]
    cfg = compose(args)
    run(cfg, tmp_path / "run")
    dm = build_data(cfg.data, model_tokenizer=str(pretrained))
    base, tuned = _val_loss(load_hf(pretrained), dm), _val_loss(load_hf(tmp_path / "run" / "final"), dm)
    assert base > 4.0 and tuned < 0.5 * base, (base, tuned)


@pytest.mark.parametrize("extra", [["model.freeze=[transformer.wte.*,transformer.h.0.*]"], LORA],
                         ids=["frozen", "lora"])
def test_generate_and_eval_from_a_run_without_final(pretrained: Path, tmp_path: Path, extra: list[str],
                                                    capsys: pytest.CaptureFixture) -> None:
    """A run dir with checkpoints but no final/ yet: its checkpoint holds the trainable weights only; the
    model generated from and evaluated is the one final/ holds (frozen weights rebuilt, LoRA merged)."""
    from omegaconf import OmegaConf

    from llmtrain.generation import Generator
    from llmtrain.generation.eval import EvalConfig
    from llmtrain.generation.eval import run as eval_run

    run_dir = tmp_path / "run"
    cfg = compose(ft(pretrained, *extra, "trainer.max_steps=3"))
    run(cfg, run_dir)
    final = tmp_path / "final"
    (run_dir / "final").rename(final)
    want, got = Generator.from_pretrained(final, device="cpu"), Generator.from_pretrained(run_dir, device="cpu")
    ref = want.model.state_dict()
    assert sorted(got.model.state_dict()) == sorted(ref)
    for k, v in got.model.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)
    prompts = ["def ", "x = "]
    assert [c.text for c in got(prompts, max_new_tokens=12, do_sample=False)] == \
           [c.text for c in want(prompts, max_new_tokens=12, do_sample=False)]

    def evaluate(source: Path) -> dict:
        ecfg = OmegaConf.structured(EvalConfig)
        ecfg.source, ecfg.batch_size, ecfg.batches, ecfg.data = str(source), 4, 2, cfg.data
        return eval_run(ecfg)

    assert evaluate(run_dir) == evaluate(final)
    assert capsys.readouterr().out.count("eval_loss=") == 2
