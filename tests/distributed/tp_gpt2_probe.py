"""One rank of the GPT-2 tensor-parallel probe (tests/distributed/test_tensor_parallel_gpt2.py), 2 ranks over gloo.

A tiny native GPT-2 split by strategy=single (tp=2 alone) trains 4 steps (SGD with momentum, clipping) beside an
unsplit copy in the same process; its DCP checkpoint is then read back whole in this process (tp=2 → one process)
and resumed under fsdp (dp=1 × tp=2) for 2 more steps beside the unsplit copy. Before training, block 0's fused
`c_attn`: its stored shard (ColwiseParallel's contiguous rows), the rows it multiplies by ([q_r; k_r; v_r] of the
full weight) and its output. Everything goes to $TP_PROBE_OUT/rank<r>.json."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

V, T, C, NH = 67, 12, 32, 4  # vocabulary (padded to 128), sequence, width, heads
STEPS, MORE = 4, 2  # steps split by tp alone, then resumed under fsdp × tp


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(100 + step))
    labels = torch.roll(ids, -1, 1)
    labels[0, :3] = -100  # positions without a target
    return ids, labels


def _train(model: torch.nn.Module, step: int, backward: Callable[[torch.Tensor], None], clip: Callable[[], Any],
           opt_step: Callable[[], Any]) -> tuple[float, float]:
    """(mean loss, gradient norm before clipping) of one step."""
    ids, labels = _batch(step)
    loss, n = model(input_ids=ids, labels=labels)
    loss = loss / n
    backward(loss)
    norm = clip()
    opt_step()
    return float(loss), float(norm)


def _ref_step(ref: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> tuple[float, float]:
    def go() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _train(ref, step, lambda loss: loss.backward(),
                  lambda: torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5), go)


def _split_step(s: Any, step: int) -> tuple[float, float]:
    return _train(s.model, step, s.backward, lambda: s.clip_grad_norm(0.5), s.step)


def _weight_diff(state: dict[str, torch.Tensor], ref: torch.nn.Module) -> tuple[list[str], list[str], float]:
    want = ref.state_dict()
    common = set(state) & set(want)
    diff = max(float((state[k].float() - want[k].float()).abs().max()) for k in common)
    return sorted(state), sorted(want), diff


def _c_attn(s: Any, w0: torch.Tensor, b0: torch.Tensor, rank: int, tp: int) -> dict[str, object]:
    """Block 0's split c_attn against the full weight it was split from."""
    from llmtrain.distributed.tp_fused import heads_rows

    m = s.unwrap().transformer.h[0].attn.c_attn
    share = C // tp
    rows = torch.cat([torch.arange(p * C + rank * share, p * C + (rank + 1) * share)
                      for p in range(3)])  # [q_r; k_r; v_r]
    stored = 3 * C // tp
    x = torch.randn(2, 5, C, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = m(x)  # [2, 5, 3·C/tp]: the local [q_r | k_r | v_r]
    return {"stored_rows": torch.equal(m.weight.to_local(), w0[rank * stored:(rank + 1) * stored]),
            "full": torch.equal(m.weight.full_tensor(), w0) and torch.equal(m.bias.full_tensor(), b0),
            "computed_rows": torch.equal(heads_rows(m.weight, 3).to_local(), w0[rows])
            and torch.equal(heads_rows(m.bias, 3).to_local(), b0[rows]),
            "output_diff": float((y - F.linear(x, w0[rows], b0[rows])).abs().max()), "output_shape": list(y.shape)}


def main() -> None:
    import torch.distributed as dist

    from llmtrain.distributed import Dist, StrategyConfig, build_strategy
    from llmtrain.distributed.base import SetupArgs
    from llmtrain.distributed.dcp import consolidate_dcp, load_state
    from llmtrain.models.gpt2 import GPT2ModelConfig, GPT2Spec
    from llmtrain.models.gpt2_native import GPT2, Block, GPT2Dims
    from llmtrain.precision import Precision

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(os.environ["TP_PROBE_OUT"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        d = GPT2Dims(vocab_size=V, n_positions=16, n_embd=C, n_layer=2, n_head=NH)
        args = SetupArgs(precision=Precision.fp32, gradient_checkpointing=False, compile=False, block_classes=(Block,),
                         micro_batch_size=4, grad_accum_steps=1, grad_clip=0.5,
                         tp_plan=GPT2Spec().tp_plan(GPT2ModelConfig()),  # as a run takes it: sequence-parallel,
                         tp_root_plan=GPT2Spec().tp_root_plan(GPT2ModelConfig()),  # the loss vocabulary-parallel
                         sequence_parallel=True)

        def sgd(m: torch.nn.Module) -> torch.optim.Optimizer:  # (Adam's update of a gradient that is rounding
            # noise — c_attn's key bias: softmax ignores it — is that noise over eps, of the order of lr)
            return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)

        torch.manual_seed(0)
        model = GPT2(d)
        with torch.no_grad():  # biases and norms away from their init: their split must matter
            for n, p in model.named_parameters():
                if n.endswith("bias") or "ln_" in n:
                    p.add_(0.1 * torch.randn_like(p))
        ref = GPT2(d)
        ref.load_state_dict(model.state_dict())
        ref_opt = sgd(ref)
        start = {k: v.clone() for k, v in ref.state_dict().items()}
        w0 = model.transformer.h[0].attn.c_attn.weight.detach().clone()
        b0 = model.transformer.h[0].attn.c_attn.bias.detach().clone()

        result: dict[str, object] = {}
        s = build_strategy(StrategyConfig(name="single", tp=world), Dist(rank, world, rank), torch.device("cpu"))
        s.setup(model, sgd, args)
        result["c_attn"] = _c_attn(s, w0, b0, rank, world)
        got = [_split_step(s, i) for i in range(1, STEPS + 1)]
        want = [_ref_step(ref, ref_opt, i) for i in range(1, STEPS + 1)]
        ckpt = out / "ckpt"
        s.save(ckpt)
        state = s.full_state_dict()
        s.close()
        dist.barrier()
        result["single"] = {"got": got, "want": want}
        if rank == 0:
            result["single"]["export"] = _weight_diff(state, ref)
            result["single"]["dcp"] = _weight_diff(consolidate_dcp(ckpt), ref)  # read whole in one process

        torch.manual_seed(1)  # another init: the checkpoint must replace it
        s = build_strategy(StrategyConfig(name="fsdp", tp=world), Dist(rank, world, rank), torch.device("cpu"))
        s.setup(GPT2(d), sgd, args)
        load_state(s.state_module(), s.optimizer, ckpt, trainable_only=False)
        got = [_split_step(s, i) for i in range(STEPS + 1, STEPS + MORE + 1)]
        want = [_ref_step(ref, ref_opt, i) for i in range(STEPS + 1, STEPS + MORE + 1)]
        state = s.full_state_dict()
        s.close()
        result["fsdp_resumed"] = {"got": got, "want": want}
        result["moved"] = max(float((v - start[k]).abs().max()) for k, v in ref.state_dict().items())
        if rank == 0:
            result["fsdp_resumed"]["export"] = _weight_diff(state, ref)
        (out / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
