"""strategy=auto: the planner's choice for the devices found, applied to the run's strategy section and said at start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import compose, train_cli

from llmtrain import plan
from llmtrain.config import checked, validate
from llmtrain.distributed import auto
from llmtrain.errors import ConfigError


def test_on_cpu_one_process_is_single_and_several_are_fsdp() -> None:
    conf = checked(compose(["experiment=llama_tiny", "data.tokenizer=byte", "strategy=auto"]))
    one, line = auto.resolve(conf, 1, torch.device("cpu"))
    assert one.strategy.name.value == "single" and "strategy auto: single (on cpu" in line
    two, line = auto.resolve(conf, 2, torch.device("cpu"))
    assert two.strategy.name.value == "fsdp" and "2 processes" in line
    assert conf.strategy.name.value == "auto"  # the given config is left as it was


def test_on_a_gpu_cluster_the_planners_choice_is_the_strategy() -> None:
    """Llama-3-8B on 2 nodes of 8 H100s: the strategy section becomes the planner's fastest fitting layout, the line
    names it with its runner-up, and the resolved config passes the checks a hand-written one does."""
    conf = checked(compose(["model=llama3_8b", "data.tokenizer=gpt2", "strategy=auto", "trainer.precision=bf16",
                            "trainer.gradient_checkpointing=true", "trainer.micro_batch_size=1",
                            "data.seq_len=2048"]))
    cluster = plan.Cluster(nodes=2, gpus_per_node=8, gpu="h100")
    best, second, _ = plan.choose(plan.shape_of(conf), cluster)
    got, line = auto.resolve_for(conf, cluster)
    want = plan.overrides_of(best)
    assert {f"strategy.{k}": getattr(got.strategy, k) for k in ("tp", "dp_replicate")} == \
        {k: want[k] for k in ("strategy.tp", "strategy.dp_replicate")}
    assert got.strategy.name.value == want["strategy.name"]
    assert line.startswith(f"strategy auto: {best.strategy} on 16 × h100 (") and second is not None
    assert f"next {second.strategy}" in line
    print(f"\n{line}")
    validate(got)


def test_deepspeed_is_offered_only_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    row = plan.Row("zero3", plan.Memory(), layout=plan.Layout("deepspeed", zero_stage=3))
    assert auto._available(row) == (auto.importlib.util.find_spec("deepspeed") is not None)
    monkeypatch.setattr(auto.importlib.util, "find_spec", lambda name: None)
    assert not auto._available(row)
    assert auto._available(plan.Row("fsdp", plan.Memory(), layout=plan.Layout("fsdp")))


@pytest.mark.parametrize(("name", "gib", "key"), [("NVIDIA H100 80GB HBM3", 80, "h100"),
                                                  ("NVIDIA A100-SXM4-40GB", 40, "a100-40gb"),
                                                  ("NVIDIA A100-SXM4-80GB", 80, "a100"),
                                                  ("NVIDIA L40S", 46, "l40s"), ("NVIDIA H200", 141, "h200")])
def test_the_gpu_is_matched_by_name_and_memory(name: str, gib: int, key: str) -> None:
    assert auto.gpu_key(name, gib * 2**30) == key


def test_a_gpu_without_figures_is_one_line() -> None:
    with pytest.raises(ConfigError) as ei:
        auto.gpu_key("Some Accelerator 9000", 16 * 2**30)
    assert ei.value.key == "strategy" and "no figures for Some Accelerator 9000" in ei.value.message


def test_a_run_with_strategy_auto_says_what_it_took(tmp_path: Path) -> None:
    res = train_cli(["experiment=linear_regression", "strategy=auto", "trainer.max_steps=2"], tmp_path / "run")
    assert "llmtrain: strategy auto: single (on cpu" in res.stdout
    assert "strategy single × 1" in res.stdout
