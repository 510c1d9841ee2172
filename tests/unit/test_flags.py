"""Every strategy flag takes effect (a test that passes with the flag ignored proves nothing): the dtypes seen
inside the forward for each precision, checkpoint wrappers and the recomputation they cause, a compiled
module in use, FSDP's reshard_after_forward, DeepSpeed's offload; in one process per strategy."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from llmtrain.distributed import SetupArgs, Strategy, StrategyConfig, build_strategy
from llmtrain.distributed.dist import Dist
from llmtrain.distributed.env import destroy_process_group
from llmtrain.models.base import DataInfo, get_model_spec
from llmtrain.models.gpt2 import GPT2ModelConfig
from llmtrain.models.gpt2_native import Block
from llmtrain.optim import OptimConfig, build_optimizer
from llmtrain.precision import Precision

INFO = DataInfo(task="lm", vocab_size=64, eos_token_id=63)
CPU = torch.device("cpu")
BATCH = {"input_ids": torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0)),
         "labels": torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))}


@contextlib.contextmanager
def strategy(name: str, precision: Precision = Precision.fp32, checkpointing: bool = False, compile: bool = False,
             **cfg) -> Iterator[tuple[Strategy, nn.Module]]:
    spec = get_model_spec("gpt2")
    torch.manual_seed(0)
    model = spec.build(GPT2ModelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=32), INFO)
    s = build_strategy(StrategyConfig(name=name, **cfg), Dist(), CPU)
    local_rank = os.environ.get("LOCAL_RANK")  # DeepSpeed's engine reads it; set for this process only
    try:
        fused = not (name == "fsdp" and precision == Precision.fp16)  # as train.py decides
        s.setup(model, lambda m: build_optimizer(OptimConfig(), m, fused_default=fused),
                SetupArgs(precision, checkpointing, compile, spec.block_classes(model), 2, 1, 1.0))
        yield s, model
    finally:
        s.close()
        destroy_process_group()
        if local_rank is None:
            os.environ.pop("LOCAL_RANK", None)


def train_step(s: Strategy) -> None:
    with s.micro_step(sync_grads=True), s.autocast():
        loss, n = get_model_spec("gpt2").loss(s.model, BATCH)
    s.backward(loss.float() / n)
    s.clip_grad_norm(1.0)
    s.step()


EXPECTED = {  # (strategy, precision) -> (weight dtype, output dtype) of a linear layer inside the forward
    ("single", Precision.fp32): (torch.float32, torch.float32),
    ("single", Precision.bf16): (torch.float32, torch.bfloat16),  # autocast: fp32 weights, bf16 matmuls
    ("single", Precision.fp16): (torch.float32, torch.float16),
    ("fsdp", Precision.fp32): (torch.float32, torch.float32),
    ("fsdp", Precision.bf16): (torch.bfloat16, torch.bfloat16),  # MixedPrecisionPolicy: bf16 unsharded params
    ("fsdp", Precision.fp16): (torch.float16, torch.float16),
    ("deepspeed", Precision.bf16): (torch.bfloat16, torch.bfloat16),  # the engine keeps bf16 weights
}


@pytest.mark.parametrize(("name", "precision"), list(EXPECTED), ids=[f"{n}-{p.value}" for n, p in EXPECTED])
def test_precision_is_what_the_forward_sees(name: str, precision: Precision) -> None:
    seen = []
    with strategy(name, precision) as (s, model):
        layer = model.transformer.h[0].attn.c_attn
        layer.register_forward_hook(lambda m, i, o: seen.append((m.weight.dtype, o.dtype)))
        train_step(s)
        assert seen and seen[0] == EXPECTED[(name, precision)], seen
        assert s.loss_scaling == (precision == Precision.fp16)  # fp16 scales its loss (GradScaler)


@pytest.mark.parametrize("name", ["single", "fsdp", "deepspeed"])
def test_activation_checkpointing_wraps_the_blocks_and_recomputes_them(name: str) -> None:
    """Each block's forward runs once per step without checkpointing, twice with it (recomputed in backward)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    for checkpointing, runs in ((False, 1), (True, 2)):
        calls = []
        with strategy(name, checkpointing=checkpointing) as (s, model):
            for b in model.modules():
                if isinstance(b, Block):
                    b.register_forward_pre_hook(lambda m, a, calls=calls: calls.append(m))
            wrapped = sum(isinstance(m, CheckpointWrapper) for m in model.modules())
            train_step(s)
        assert wrapped == (2 if checkpointing else 0)
        assert len(calls) == 2 * runs, (name, checkpointing, len(calls))


def test_compile_runs_a_compiled_module() -> None:
    """trainer.compile: the loop's model is torch.compile's, and its forward runs dynamo-compiled graphs."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    spec = get_model_spec("regression")
    from llmtrain.models.regression import RegressionModelConfig

    model = spec.build(RegressionModelConfig(), DataInfo(task="regression", in_features=4, out_features=1))
    s = build_strategy(StrategyConfig(), Dist(), CPU)
    s.setup(model, lambda m: build_optimizer(OptimConfig(), m), SetupArgs(Precision.fp32, False, True, (), 2, 1, 0.0))
    before = counters["stats"]["unique_graphs"]
    s.model(torch.randn(3, 4))
    assert isinstance(s.model, OptimizedModule) and s.unwrap() is model
    assert counters["stats"]["unique_graphs"] > before


def test_fsdp_compiles_each_block_in_place() -> None:
    with strategy("fsdp", compile=True) as (_, model):
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        assert blocks and all(b._compiled_call_impl is not None for b in blocks)


@pytest.mark.parametrize("reshard", [True, False])
def test_fsdp_reshard_after_forward(reshard: bool) -> None:
    """After the forward (before the backward) a block's parameters are sharded again, or stay gathered."""
    with strategy("fsdp", reshard_after_forward=reshard) as (s, model):
        block = model.transformer.h[0]
        loss, n = get_model_spec("gpt2").loss(s.model, BATCH)
        group = block._get_fsdp_state()._fsdp_param_group
        assert (group.is_sharded or group.is_sharded_post_forward) == reshard
        assert group.is_unsharded == (not reshard)
        s.backward(loss / n)


@pytest.mark.parametrize(("stage", "flag"), [(2, "offload_optimizer"), (3, "offload_optimizer"),
                                            (3, "offload_params")])
def test_deepspeed_offload_reaches_the_engine(stage: int, flag: str) -> None:
    """On this CPU everything lives in host memory anyway: what can be shown is that the engine runs with the
    offload on (and trains a step)."""
    for on in (False, True):
        with strategy("deepspeed", zero_stage=stage, **{flag: on}) as (s, _):
            e = s.engine
            got = e.zero_offload_optimizer() if flag == "offload_optimizer" else e.zero_offload_param()
            assert bool(got) == on
            train_step(s)
