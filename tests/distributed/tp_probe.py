"""One rank of the tensor-parallel layout probe (tests/distributed/test_tensor_parallel.py): a tiny Llama split
over 2 ranks by strategy=single (tp alone) and by fsdp (dp=1 × tp=2), and HSDP over 2 groups of 1; each parameter's mesh dims and placements,
and the split model's loss next to an unsplit copy's, go to $TP_PROBE_OUT/rank<r>.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def _layout(model: torch.nn.Module) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, p in model.named_parameters():
        mesh = getattr(p, "device_mesh", None)
        out[name] = None if mesh is None else {
            "dims": list(mesh.mesh_dim_names), "placements": [repr(pl) for pl in p.placements],
            "local": list(p.to_local().shape), "global": list(p.shape)}
    return out


def main() -> None:
    import torch.distributed as dist

    from llmtrain.distributed import Dist, StrategyConfig, build_strategy
    from llmtrain.distributed.base import SetupArgs
    from llmtrain.models.llama.model import DecoderLayer, Llama, LlamaDims
    from llmtrain.models.llama.spec import TP_PLAN
    from llmtrain.precision import Precision

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        d = LlamaDims(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=16)
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
        labels = torch.roll(ids, -1, 1)
        result: dict[str, object] = {}
        for name in ("single", "fsdp", "hsdp"):
            torch.manual_seed(0)
            model = Llama(d)
            ref = Llama(d)
            ref.load_state_dict(model.state_dict())
            cfg = StrategyConfig(name="fsdp", dp_replicate=world) if name == "hsdp" else StrategyConfig(name=name,
                                                                                                         tp=world)
            s = build_strategy(cfg, Dist(rank, world, rank), torch.device("cpu"))
            s.setup(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                    SetupArgs(precision=Precision.fp32, gradient_checkpointing=False, compile=False,
                              block_classes=(DecoderLayer,), micro_batch_size=2, grad_accum_steps=1, grad_clip=0.0,
                              tp_plan=dict(TP_PLAN)))
            loss, n = s.model(input_ids=ids, labels=labels)
            want, _ = ref(input_ids=ids, labels=labels)
            result[name] = {"layout": _layout(s.unwrap()), "loss": float(loss), "ref_loss": float(want)}
            s.close()
        Path(os.environ["TP_PROBE_OUT"], f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
