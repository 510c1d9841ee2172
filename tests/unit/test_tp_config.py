"""strategy.tp: what the first slice of tensor parallelism does not cover is refused in one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import compose

from llmtrain.config import checked
from llmtrain.distributed.tp import check_world
from llmtrain.errors import ConfigError

LLAMA = ["experiment=llama_tiny", "data.tokenizer=byte", "trainer.precision=fp32"]
GPT2 = ["experiment=gpt2_tiny", "data.tokenizer=byte", "trainer.precision=fp32"]


def test_llama_with_tp_under_fsdp_ddp_and_single_passes() -> None:
    assert checked(compose([*LLAMA, "strategy=fsdp", "strategy.tp=2"])).strategy.tp == 2
    assert checked(compose([*LLAMA, "strategy=ddp", "strategy.tp=2"])).strategy.tp == 2
    assert checked(compose([*LLAMA, "strategy=fsdp", "strategy.tp=2", "trainer.compile=true"])).trainer.compile
    assert checked(compose([*LLAMA, "strategy.tp=2", "trainer.precision=fp16"])).strategy.tp == 2
    assert checked(compose([*LLAMA, "strategy.tp=2"])).strategy.tp == 2
    assert checked(compose(LLAMA)).strategy.tp == 1


@pytest.mark.parametrize(("overrides", "needle"), [
    (["strategy=deepspeed", "strategy.tp=2"], "not deepspeed"),
    (["strategy.tp=0"], "must be >= 1"),
    (["strategy.tp=3"], "3 does not divide model.n_head=4"),
    (["strategy.tp=4", "model.n_kv_head=2"], "4 does not divide model.n_kv_head=2"),
    (["strategy.tp=2", "model.intermediate_size=33"], "model.intermediate_size=33"),
    (["strategy.tp=2", "model.dropout=0.1"], "trainer.dropout_rng=global"),
    (["strategy.tp=2", "model.lora.enabled=true"], "LoRA"),
])
def test_llama_tp_refusals(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        checked(compose([*LLAMA, *overrides]))
    assert ei.value.key == "strategy.tp"
    assert needle in ei.value.message and "\n" not in str(ei.value)


def test_families_without_a_plan_are_refused() -> None:
    with pytest.raises(ConfigError) as ei:
        checked(compose([*GPT2, "model.impl=hf", "strategy.tp=2"]))
    assert ei.value.key == "strategy.tp" and "\n" not in str(ei.value)
    assert "model=gpt2 (impl=hf) has no tensor-parallel plan" in ei.value.message


def test_native_gpt2_with_tp_passes() -> None:
    assert checked(compose([*GPT2, "strategy.tp=2"])).strategy.tp == 2
    assert checked(compose([*GPT2, "strategy=fsdp", "strategy.tp=4"])).strategy.tp == 4


@pytest.mark.parametrize(("overrides", "needle"), [
    (["strategy.tp=3"], "3 does not divide model.n_head=4"),
    (["strategy.tp=8"], "8 does not divide model.n_head=4"),
    (["strategy.tp=2", "model.dropout=0.1"], "model.dropout=0.1"),
    (["strategy.tp=2", "model.dropout=0.1", "trainer.dropout_rng=global"], "attention dropout"),
])
def test_gpt2_tp_refusals(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        checked(compose([*GPT2, *overrides]))
    assert ei.value.key == "strategy.tp"
    assert needle in ei.value.message and "\n" not in str(ei.value)


def test_dropout_with_global_masks_passes_without_sequence_parallelism() -> None:
    checked(compose([*LLAMA, "strategy.tp=2", "model.dropout=0.1", "trainer.dropout_rng=global",
                     "strategy.sequence_parallel=false"]))


@pytest.mark.parametrize(("overrides", "needle"), [
    (["model.dropout=0.1", "trainer.dropout_rng=global"], "model.dropout > 0 with the sequence split"),
    (["data.seq_len=63"], "data.seq_len=63 does not split over strategy.tp=2 ranks"),
])
def test_sequence_parallel_refusals(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        checked(compose([*LLAMA, "strategy.tp=2", *overrides]))
    assert ei.value.key == "strategy.sequence_parallel"
    assert needle in ei.value.message and "\n" not in str(ei.value)
    checked(compose([*LLAMA, "strategy.tp=2", "strategy.sequence_parallel=false", "data.seq_len=63"]))


@pytest.mark.parametrize(("tp", "world", "strategy", "needle"), [
    (2, 3, "fsdp", "2 does not divide the world size 3"),
    (2, 4, "single", "must equal the world size 4"),
])
def test_world_size_refusals(tp: int, world: int, strategy: str, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        check_world(tp, world, strategy)
    assert ei.value.key == "strategy.tp" and needle in ei.value.message
    check_world(tp, 2 * tp, "fsdp")  # dp × tp
    check_world(tp, tp, "single")  # tp alone


@pytest.mark.parametrize(("overrides", "needle"), [
    (["strategy=ddp", "strategy.dp_replicate=2"], "runs under strategy=fsdp, not ddp"),
    (["strategy=fsdp", "strategy.dp_replicate=0"], "must be >= 1"),
])
def test_hsdp_refusals(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        checked(compose([*LLAMA, *overrides]))
    assert ei.value.key == "strategy.dp_replicate" and needle in ei.value.message


def test_hsdp_world_size_must_hold_the_groups() -> None:
    check_world(1, 4, "fsdp", dp_replicate=2)  # 2 groups of 2
    check_world(2, 8, "fsdp", dp_replicate=2)  # 2 groups × (2 shards × tp 2)
    with pytest.raises(ConfigError) as ei:
        check_world(2, 6, "fsdp", dp_replicate=2)
    assert ei.value.key == "strategy.dp_replicate" and "do not divide the world size 6" in ei.value.message


@pytest.mark.parametrize(("dropout", "tp", "needle"), [(0.1, 2, "resid_pdrop=0.1"),
                                                       (0.0, 3, "3 does not divide model.n_head=4")])
def test_pretrained_gpt2_dir_is_checked_for_tp(tmp_path: Path, dropout: float, tp: int, needle: str) -> None:
    """A local pretrained dir's sizes and dropout are its config.json's (released GPT-2s have 0.1)."""
    from llmtrain.models.gpt2_native import GPT2Dims, hf_config

    d = GPT2Dims(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=4, dropout=dropout)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(d)))
    with pytest.raises(ConfigError) as ei:
        checked(compose([*GPT2, f"model.pretrained={tmp_path}", f"strategy.tp={tp}"]))
    assert ei.value.key == "strategy.tp" and needle in ei.value.message and "\n" not in str(ei.value)
