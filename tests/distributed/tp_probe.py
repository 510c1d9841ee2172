"""One rank of the tensor-parallel layout probe (tests/distributed/test_tensor_parallel.py): a tiny Llama split
over 2 ranks by strategy=single (tp alone, with and without sequence parallelism; Qwen3's per-head norms and an
untied head too), by fsdp (dp=1 × tp=2; also with each block compiled), and HSDP over 2 groups of 1; and fp16
under tp alone, where an infinite gradient on one rank must make both skip the step. For each: every parameter's mesh dims and
placements, the split model's loss and gradients next to an unsplit copy's, the sequence length of the
activations between blocks, and the widest matmul output (the vocabulary must never be whole on a rank) go to
$TP_PROBE_OUT/rank<r>.json."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

V, T = 67, 12  # an odd vocabulary: uneven rows per rank (34 + 33)


class _Widest(TorchDispatchMode):
    """Records the last dim of every matmul's output."""

    def __init__(self) -> None:
        super().__init__()
        self.widths: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.widths.add(int(out.shape[-1]))
        return out


def _layout(model: torch.nn.Module) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, p in model.named_parameters():
        mesh = getattr(p, "device_mesh", None)
        out[name] = None if mesh is None else {
            "dims": list(mesh.mesh_dim_names), "placements": [repr(pl) for pl in p.placements],
            "local": list(p.to_local().shape), "global": list(p.shape)}
    return out


def _step(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor,
          widths: bool = True) -> tuple[float, list[int], set[int]]:
    """(loss, sequence lengths entering the blocks, matmul output widths: not under compile, which a dispatch
    mode turns off) of one forward and backward."""
    from llmtrain.models.llama.model import DecoderLayer

    seen: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _m, a: seen.append(int(a[0].shape[1])))
             for m in model.modules() if isinstance(m, DecoderLayer)]
    w = _Widest()
    with w if widths else contextlib.nullcontext():
        loss, _ = model(input_ids=ids, labels=labels)
        loss.backward()
    for h in hooks:
        h.remove()
    return float(loss), seen, w.widths


def _grad_error(split: torch.nn.Module, ref: torch.nn.Module) -> float:
    """The largest gradient difference, relative to the largest gradient of its parameter."""
    want = dict(ref.named_parameters())
    worst = 0.0
    for name, p in split.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        worst = max(worst, float((g - want[name].grad).abs().max() / want[name].grad.abs().max()))
    return worst


def _fp16_skips_together(rank: int, world: int) -> dict[str, list]:
    """fp16 under tp alone, 3 steps; in the second, rank 1's shard of one gradient is made infinite: both ranks
    must skip that step (the loss scaler's inf check reduced over the ranks), or their replicas would part."""
    from llmtrain.distributed import Dist, StrategyConfig, build_strategy
    from llmtrain.distributed.base import SetupArgs
    from llmtrain.models.llama.model import DecoderLayer, Llama, LlamaDims
    from llmtrain.models.llama.spec import TP_PLAN, TP_ROOT_PLAN
    from llmtrain.precision import Precision

    d = LlamaDims(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=16)
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    s = build_strategy(StrategyConfig(name="single", tp=world), Dist(rank, world, rank), torch.device("cpu"))
    s.setup(Llama(d), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
            SetupArgs(precision=Precision.fp16, gradient_checkpointing=False, compile=False,
                      block_classes=(DecoderLayer,), micro_batch_size=2, grad_accum_steps=1, grad_clip=1.0,
                      tp_plan=dict(TP_PLAN), tp_root_plan=dict(TP_ROOT_PLAN), sequence_parallel=True))
    out: dict[str, list] = {"loss": [], "stepped": []}
    for step in range(3):
        with s.autocast():
            loss, n = s.model(input_ids=ids, labels=torch.roll(ids, -1, 1))
        s.backward(loss / n)
        if step == 1 and rank == 1:
            s.unwrap().model.layers[0].self_attn.q_proj.weight.grad.to_local()[0, 0] = float("inf")
        s.clip_grad_norm(1.0)
        out["stepped"].append(bool(s.step()))
        out["loss"].append(float(loss.detach() / n))
    s.close()
    return out


def main() -> None:
    import torch.distributed as dist

    from llmtrain.distributed import Dist, StrategyConfig, build_strategy
    from llmtrain.distributed.base import SetupArgs
    from llmtrain.models.llama.model import DecoderLayer, Llama, LlamaDims
    from llmtrain.models.llama.spec import QK_NORM_PLAN, TP_PLAN, TP_ROOT_PLAN
    from llmtrain.precision import Precision

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # the "compiled" case traces the split blocks with dynamo and AOTAutograd as trainer.compile does, without
    # inductor's C++ build (a minute on this CPU; measured by hand: the same loss, no graph break)
    torch.compile = functools.partial(torch.compile, backend="aot_eager")
    try:
        ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
        labels = torch.roll(ids, -1, 1)
        labels[0, :3] = -100  # positions without a target
        result: dict[str, object] = {}
        # name → (strategy config, sequence parallel, qwen3's q/k norms and an untied head)
        cases = {"single": (StrategyConfig(name="single", tp=world), True, False),
                 "compiled": (StrategyConfig(name="fsdp", tp=world), True, False),
                 "single_nosp": (StrategyConfig(name="single", tp=world), False, False),
                 "qwen3": (StrategyConfig(name="single", tp=world), True, True),
                 "fsdp": (StrategyConfig(name="fsdp", tp=world), True, False),
                 "hsdp": (StrategyConfig(name="fsdp", dp_replicate=world), False, False)}
        for name, (cfg, sp, qwen3) in cases.items():
            d = LlamaDims(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=16,
                          qk_norm=qwen3, tie_word_embeddings=not qwen3)
            torch.manual_seed(0)
            model = Llama(d)
            with torch.no_grad():  # norms away from 1: their gradients must be summed over the ranks right
                for n, p in model.named_parameters():
                    if n.endswith("norm.weight"):
                        p.add_(0.1 * torch.randn_like(p))
            ref = Llama(d)
            ref.load_state_dict(model.state_dict())
            s = build_strategy(cfg, Dist(rank, world, rank), torch.device("cpu"))
            tp = cfg.tp > 1
            s.setup(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                    SetupArgs(precision=Precision.fp32, gradient_checkpointing=False, compile=name == "compiled",
                              block_classes=(DecoderLayer,), micro_batch_size=2, grad_accum_steps=1, grad_clip=0.0,
                              tp_plan={**TP_PLAN, **(QK_NORM_PLAN if qwen3 else {})} if tp else None,
                              tp_root_plan=dict(TP_ROOT_PLAN) if tp else None, sequence_parallel=sp))
            loss, seq, widths = _step(s.model, ids, labels, widths=name != "compiled")
            want, ref_seq, ref_widths = _step(ref, ids, labels)
            from torch._dynamo.utils import counters

            result[name] = {"layout": _layout(s.unwrap()), "loss": loss, "ref_loss": want,
                            "graphs": counters["stats"]["unique_graphs"],
                            "grad_error": _grad_error(s.unwrap(), ref), "seq": seq, "ref_seq": ref_seq,
                            "widths": sorted(widths), "ref_widths": sorted(ref_widths)}
            s.close()
        result["fp16"] = _fp16_skips_together(rank, world)
        Path(os.environ["TP_PROBE_OUT"], f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
