"""model=hf under DDP, FSDP2 (decoder layers sharded, activations checkpointed) and DeepSpeed ZeRO-2 over 2 CPU
processes (gloo): the losses, the exported weights and the greedy samples of one process. (Which modules FSDP
shards: tests/unit/test_hf_family.py.)

A tiny random Gemma (tied embeddings, grouped KV heads) saved by transformers stands in for any architecture no
native family reads. The runs are launched once per module (~10 s each) and shared by the tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import base_env, losses, max_rel, samples, train_cli

pytestmark = pytest.mark.distributed

STEPS = 8
FP32_RTOL = 1e-5  # fp32: ranks and accumulation only reorder float sums
RUNS: dict[str, tuple[list[str], int]] = {  # name -> (overrides, processes); global batch 8 in each
    "single": (["trainer.micro_batch_size=8"], 1),
    "ddp": (["strategy=ddp"], 2),
    "fsdp": (["strategy=fsdp", "trainer.gradient_checkpointing=true"], 2),
    "deepspeed": (["strategy=deepspeed", "strategy.zero_stage=2"], 2),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmtrain.data.tokenizers import byte_tokenizer

    d = tmp_path_factory.mktemp("gemma") / "model"
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gemma", vocab_size=257, bos_token_id=256, eos_token_id=256, pad_token_id=None,
                               hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                               head_dim=16, intermediate_size=64, max_position_embeddings=64, initializer_range=0.3)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


class Runs:
    def __init__(self, root: Path, model_dir: Path) -> None:
        self.root, self.model_dir, self.done = root, model_dir, {}

    def __call__(self, name: str) -> Path:
        if name not in self.done:
            overrides, nproc = RUNS[name]
            args = ["model=hf", f"model.pretrained={self.model_dir}", "data.tokenizer=byte", "data.seq_len=32",
                    "data.embedded_max_bytes=200000", "trainer.micro_batch_size=4", "trainer.precision=fp32",
                    f"trainer.max_steps={STEPS}", "trainer.eval_every=0", f"trainer.ckpt_every={STEPS}",
                    "logger.log_every=1", "logger.progress=false", "logger.plots=false", "optim.lr=3e-3",
                    "scheduler.warmup_steps=0", "trainer.sample_tokens=8", "trainer.sample_temperature=0",
                    'trainer.sample_prompts=["def ","x = "]', *overrides]
            train_cli(args, self.root / name, nproc=nproc, timeout=240, env=base_env())
            self.done[name] = self.root / name
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Runs:
    return Runs(tmp_path_factory.mktemp("hf_strategies"), model_dir)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed"])
def test_two_processes_train_as_one(runs: Runs, name: str) -> None:
    """Same seed and global batch: every loss within 1e-5 of one process's; the greedy samples at the end the
    same; final/ (the sharded weights gathered) loads in transformers with one process's logits."""
    from transformers import AutoModelForCausalLM

    ref, got = losses(runs("single")), losses(runs(name))
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    err = max_rel(got, ref)
    print(f"\n{name} vs single: max relative loss difference {err:.2e}")
    assert err <= FP32_RTOL, (got, ref)
    assert samples(runs(name)) == samples(runs("single")) and len(samples(runs(name))) == 2
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(runs(name) / "final").eval()(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(runs("single") / "final").eval()(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-4
