"""Turn any strategy's checkpoint into one full model state dict, in a single process."""

from __future__ import annotations

from pathlib import Path

import torch

from llmtrain.safeio import load_torch


def consolidate(ckpt_dir: Path, strategy_name: str) -> dict[str, torch.Tensor]:
    name = getattr(strategy_name, "value", strategy_name)
    if name in ("single", "ddp"):
        return load_torch(ckpt_dir / "model_optim.pt")["model"]
    if name == "fsdp":
        from llmtrain.distributed.fsdp import consolidate_fsdp

        return consolidate_fsdp(ckpt_dir)
    from llmtrain.distributed.deepspeed import consolidate_deepspeed

    return consolidate_deepspeed(ckpt_dir)
