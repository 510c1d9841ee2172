"""Any checkpoint's model state as one full state dict, in a single process: what export, generation and
"start from these weights" read. The checkpoint's own files say its layout; no strategy name is needed."""

from __future__ import annotations

from pathlib import Path

import torch

from llmtrain.errors import ConfigError
from llmtrain.safeio import load_torch

LEGACY_FILE = "model_optim.pt"  # single / ddp checkpoints of llmtrain before the one DCP format


def layout(ckpt_dir: Path) -> str:
    """dcp | deepspeed | legacy (model_optim.pt); ConfigError when the dir holds none of them."""
    from llmtrain.distributed.dcp import DCP_SUBDIR
    from llmtrain.distributed.deepspeed import TAG

    for name, marker in (("dcp", DCP_SUBDIR), ("deepspeed", TAG), ("legacy", LEGACY_FILE)):
        if (ckpt_dir / marker).exists():
            return name
    raise ConfigError("checkpoint", f"{ckpt_dir} holds no model state (no {DCP_SUBDIR}/, {TAG}/ or {LEGACY_FILE})")


def consolidate(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    kind = layout(ckpt_dir)
    if kind == "legacy":
        return load_torch(ckpt_dir / LEGACY_FILE)["model"]
    if kind == "dcp":
        from llmtrain.distributed.dcp import consolidate_dcp

        return consolidate_dcp(ckpt_dir)
    from llmtrain.distributed.deepspeed import consolidate_deepspeed

    return consolidate_deepspeed(ckpt_dir)
