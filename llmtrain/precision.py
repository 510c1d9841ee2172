"""One precision decision (trainer.precision), read wherever it matters."""

from __future__ import annotations

import contextlib
from enum import Enum

import torch


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.value]


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for the forward pass; a no-op for fp32."""
    if precision == Precision.fp32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def make_grad_scaler(precision: Precision, device: torch.device, sharded: bool = False):
    """A loss scaler for fp16 (ShardedGradScaler under FSDP); None otherwise."""
    if precision != Precision.fp16:
        return None
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=device.type)
    return torch.amp.GradScaler(device.type)


def check_supported(precision: Precision, device: torch.device) -> str | None:
    """Why `precision` cannot run on `device`, or None when it can."""
    if device.type == "cuda" and precision == Precision.bf16 and not torch.cuda.is_bf16_supported():
        return f"bf16 is not supported on {torch.cuda.get_device_name(device)}; use fp16 or fp32"
    return None
