"""DPO with full fine-tuning under strategy=fsdp and deepspeed (ZeRO-2, ZeRO-3) on 2 CPU processes (gloo): each
step's loss and rewards and the final weights equal one process with the same global batch. The reference is a
frozen copy of the starting weights, sharded as the model is (fsdp, ZeRO-3) or whole on every rank (ZeRO-2): a
reference that moved with the policy, or a copy of other weights, changes the losses from step 2 on. Under bf16 the
reference computes in the policy's dtype (step 1's rewards are exactly 0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_LM, read_metrics, train_cli, transformers_gpt2_dir

pytestmark = pytest.mark.distributed

STEPS = 4
RTOL = 1e-5  # fp32: ranks and accumulation only reorder float sums (measured: loss 1.1e-7, rewards ≤ 1e-6)
PAIRS = [(f"q{i}: ", "yes" * (i % 3 + 1), "no" * (i % 2 + 1)) for i in range(8)]
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy")
# name -> (overrides, nproc); the global batch is 4 pairs × 2 micro-steps everywhere
RUNS: dict[str, tuple[list[str], int]] = {
    "single": (["trainer.micro_batch_size=4"], 1),
    "fsdp": (["strategy=fsdp", "trainer.micro_batch_size=2"], 2),
    "zero2": (["strategy=deepspeed", "strategy.zero_stage=2", "trainer.micro_batch_size=2"], 2),
    "zero3": (["strategy=deepspeed", "strategy.zero_stage=3", "trainer.micro_batch_size=2"], 2),
    # trainer.dpo_reference=precomputed: no reference kept, its log-probs computed once at start, sharded
    "fsdp_precomputed": (["strategy=fsdp", "trainer.micro_batch_size=2", "trainer.dpo_reference=precomputed"], 2),
    "zero3_precomputed": (["strategy=deepspeed", "strategy.zero_stage=3", "trainer.micro_batch_size=2",
                           "trainer.dpo_reference=precomputed"], 2),
    # bf16: the engine casts the model to bf16, FSDP computes in bf16; the reference must compute as the policy does
    "fsdp_bf16": (["strategy=fsdp", "trainer.micro_batch_size=2", "trainer.precision=bf16"], 2),
    "zero2_bf16": (["strategy=deepspeed", "strategy.zero_stage=2", "trainer.micro_batch_size=2",
                    "trainer.precision=bf16"], 2),
    "zero3_bf16": (["strategy=deepspeed", "strategy.zero_stage=3", "trainer.micro_batch_size=2",
                    "trainer.precision=bf16"], 2),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dpo")


@pytest.fixture(scope="module")
def common(root: Path) -> list[str]:
    """The overrides every run shares: a 2-layer GPT-2 on bytes (no dropout), 8 pairs, fp32, 4 steps × 2 micro."""
    pretrained = transformers_gpt2_dir(root / "pretrained")
    src = root / "pairs.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    return [*(o for o in TINY_LM if not o.startswith("data.")), "data=preference", f"data.source={src}",
            f"data.val_source={src}", f"model.pretrained={pretrained}", "trainer.objective=dpo",
            "trainer.eval_every=0", "scheduler=constant", "optim.lr=1e-2", f"trainer.max_steps={STEPS}",
            "trainer.grad_accum_steps=2", "trainer.ckpt_every=0"]


@pytest.fixture(scope="module")
def runs(root: Path, common: list[str]) -> dict[str, Path]:
    """Every run of RUNS, trained once for the module."""
    zero3 = root / "zero3.json"  # partition every parameter (the tiny model's are below DeepSpeed's threshold)
    zero3.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    out = {}
    for name, (overrides, nproc) in RUNS.items():
        extra = [f"strategy.deepspeed_config={zero3}"] if name.startswith("zero3") else []
        train_cli([*common, *overrides, *extra], root / name, nproc=nproc, timeout=180)
        out[name] = root / name
    return out


def steps(run_dir: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: r[k] for k in KEYS} for r in read_metrics(run_dir) if "rewards/margins" in r}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(run_dir / "final").state_dict()


@pytest.mark.parametrize("name", ["fsdp", "zero2", "zero3", "fsdp_precomputed", "zero3_precomputed"])
def test_dpo_matches_one_process(runs: dict[str, Path], name: str) -> None:
    """Each step's loss and rewards, and the final weights, equal one process's (whose frozen copy scores each
    batch; the precomputed runs' log-probs were scored once at start, each rank its share)."""
    want, got = steps(runs["single"]), steps(runs[name])
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
    assert abs(want[STEPS]["rewards/margins"]) > 1e-2  # the policy has moved away from the reference
    err = {k: max(abs(got[s][k] - want[s][k]) / max(abs(want[s][k]), 1e-3) for s in want) for k in KEYS}
    a, b = weights(runs["single"]), weights(runs[name])
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"\n{name} vs single: max relative difference per step {err}; final weights max |diff| {diff:.2e}")
    assert max(err.values()) <= RTOL, err
    assert diff <= 1e-5


@pytest.mark.parametrize("name", ["fsdp_bf16", "zero2_bf16", "zero3_bf16"])
def test_bf16_reference_computes_as_the_policy_does(runs: dict[str, Path], name: str) -> None:
    """At step 1 the policy is the reference: under bf16 both forwards run in bf16, so every reward is exactly 0
    (a reference left in fp32 beside a bf16 policy gives nonzero ones); the losses follow fp32's loosely."""
    want, got = steps(runs["single"]), steps(runs[name])
    assert got[1]["rewards/chosen"] == got[1]["rewards/rejected"] == 0.0, got[1]
    err = max(abs(got[s]["loss"] - want[s]["loss"]) / want[s]["loss"] for s in want)
    print(f"\n{name} vs fp32 single: max relative loss difference {err:.2e}; step 1 {got[1]}")
    assert err <= 5e-2


@pytest.mark.parametrize(("override", "start"), [  # (tensor parallelism: tests/unit/test_preference.py)
    (["strategy=auto"], "trainer.objective: dpo needs a named strategy"),
])
def test_what_stays_refused(common: list[str], override: list[str], start: str) -> None:
    from helpers import compose

    from llmtrain.config import checked
    from llmtrain.errors import ConfigError

    with pytest.raises(ConfigError) as ei:
        checked(compose([*common, *override]))
    assert str(ei.value).startswith(start) and "\n" not in str(ei.value), ei.value
