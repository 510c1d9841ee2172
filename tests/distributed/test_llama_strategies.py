"""The Llama family under every strategy (2 CPU processes, gloo): ddp, fsdp (with activation checkpointing per
block), DeepSpeed ZeRO-2 and ZeRO-3 match one process with the same global batch over 12 steps, accumulation 2,
fp32, within 1e-6 relative.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import losses, max_rel, train_cli

pytestmark = pytest.mark.distributed

STEPS = 12
RTOL = 1e-6
TINY_LLAMA = ["experiment=llama_tiny", "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.n_embd=32",
              "model.intermediate_size=64", "model.n_positions=64", "data.tokenizer=byte", "data.seq_len=32",
              "data.embedded_max_bytes=200000", f"trainer.max_steps={STEPS}", "trainer.grad_accum_steps=2",
              "trainer.precision=fp32", "trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.sample_tokens=0",
              "logger.log_every=1", "logger.progress=false", "logger.tensorboard=false", "logger.plots=false"]
RUNS: dict[str, tuple[list[str], int]] = {
    "single": (["trainer.micro_batch_size=8"], 1),
    "ddp": (["strategy=ddp", "trainer.micro_batch_size=4"], 2),
    "fsdp_ckpt": (["strategy=fsdp", "trainer.micro_batch_size=4", "trainer.gradient_checkpointing=true"], 2),
    "zero2": (["strategy=deepspeed", "strategy.zero_stage=2", "trainer.micro_batch_size=4"], 2),
    "zero3": (["strategy=deepspeed", "strategy.zero_stage=3", "trainer.micro_batch_size=4"], 2),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama")
    zero3 = root / "zero3.json"  # partition every ZeRO-3 parameter (the tiny model's are below the threshold)
    zero3.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    out = {}
    for name, (overrides, nproc) in RUNS.items():
        extra = [f"strategy.deepspeed_config={zero3}"] if name == "zero3" else []
        train_cli([*TINY_LLAMA, *overrides, *extra], root / name, nproc=nproc, timeout=240)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", [n for n in RUNS if n != "single"])
def test_llama_parity_with_one_process(runs: dict[str, Path], name: str) -> None:
    got, want = losses(runs[name]), losses(runs["single"])
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    err = max_rel(got, want)
    print(f"\nllama {name} vs one process: max relative loss difference {err:.2e}")
    assert err <= RTOL
    assert want[STEPS] < want[1]  # it trains
