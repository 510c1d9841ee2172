"""One precision decision (trainer.precision), read wherever it matters."""

from __future__ import annotations

import contextlib
import functools
from enum import Enum
from pathlib import Path

import torch

from llmtrain.errors import ConfigError


class Precision(str, Enum):
    auto = "auto"  # bf16 on a GPU that has it, else fp16 on a GPU; fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.value]


def parse_precision(value: Precision | str, key: str = "precision") -> Precision:
    """`value` as a Precision; one line naming `key` when it is none of auto, fp32, bf16, fp16."""
    try:
        return Precision(value)
    except ValueError:
        raise ConfigError(key, f"must be auto, fp32, bf16 or fp16 (got {value!r})") from None


def resolve(precision: Precision | str, device: torch.device) -> Precision:
    """`auto` → what runs fastest and safely on `device`; anything else as asked (a string is parsed)."""
    precision = parse_precision(precision)
    if precision != Precision.auto:
        return precision
    if device.type == "cuda":
        return Precision.bf16 if torch.cuda.is_bf16_supported() else Precision.fp16
    return Precision.fp32


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
        return f"bf16 is not supported on {torch.cuda.get_device_name(device)}; use fp16, fp32 or auto"
    return None


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); None when it cannot be told."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith(("flags", "Features"))),
                 None)
    if flags is None:
        return None
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))  # x86 / aarch64 names


def slow_precision_warning(precision: Precision, device: torch.device) -> str | None:
    """A warning when `precision` is emulated here and much slower than fp32 (bf16 on most CPUs)."""
    if device.type == "cpu" and precision == Precision.bf16 and cpu_has_native_bf16() is False:
        return ("llmtrain: warning: this CPU has no native bf16 (no AVX512-BF16/AMX), so bf16 is emulated and runs "
                "several times slower than fp32 here; use trainer.precision=fp32 (or auto)")
    return None
