"""One precision decision (trainer.precision), read wherever it matters."""

from __future__ import annotations

import contextlib
import functools
import platform
from enum import Enum
from pathlib import Path

import torch

from llmtrain.errors import ConfigError


class Precision(str, Enum):
    auto = "auto"  # bf16 on a GPU that has it, else fp16 on a GPU; training on a CPU: bf16 where native, else fp32
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


def resolve(precision: Precision | str, device: torch.device, training: bool = False) -> Precision:
    """`auto` → what runs fastest and safely on `device`; anything else as asked (a string is parsed).

    On a CPU, `auto` is fp32, except for training (`training=True`: autocast over fp32 weights and optimizer
    state) on a CPU that computes bf16 natively, where it is bf16. Inference casts the weights themselves and
    stays fp32 on CPUs."""
    precision = parse_precision(precision)
    if precision != Precision.auto:
        return precision
    if device.type == "cuda":
        return Precision.bf16 if torch.cuda.is_bf16_supported() else Precision.fp16
    if device.type == "cpu" and training and cpu_has_native_bf16():
        return Precision.bf16
    return Precision.fp32


def auto_reason(device: torch.device) -> str:
    """Which precision `auto` picks for training on `device`, and why (one line, for the start of a run)."""
    picked = resolve(Precision.auto, device, training=True).value
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        why = f"{name} has bf16" if picked == "bf16" else f"{name} has no bf16"
    elif device.type == "cpu":
        flags = cpu_bf16_flags()
        if picked == "bf16":
            named = ", ".join(sorted(flags or ())) or "AVX512-BF16/AMX"
            why = f"this CPU computes bf16 natively: {named}; trainer.precision=fp32 keeps fp32"
        elif flags is None:
            why = "cannot tell whether this CPU has native bf16 (no /proc/cpuinfo flags), so bf16 could be emulated"
        else:
            why = "this CPU has no native bf16 (no AVX512-BF16/AMX): bf16 would be emulated and slower"
    else:
        why = f"the default on {device.type}"
    return f"trainer.precision=auto: {picked} ({why})"


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


NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 (AVX512-BF16, AMX-BF16), aarch64 names


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The native-bf16 feature flags this CPU reports (empty: none), from /proc/cpuinfo, else from PyTorch's own
    CPUID probe on x86; None when neither can tell."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith(("flags", "Features"))),
                 None)
    if flags is not None:
        return frozenset(NATIVE_BF16_FLAGS & set(flags))
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # macOS, Windows: no /proc/cpuinfo
    if probe is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        return frozenset({"avx512_bf16"} if probe() else ())
    except RuntimeError:
        return None


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); None when it cannot be told."""
    flags = cpu_bf16_flags(cpuinfo)
    return None if flags is None else bool(flags)


def slow_precision_warning(precision: Precision, device: torch.device) -> str | None:
    """A warning when `precision` is emulated here and much slower than fp32 (bf16 on most CPUs)."""
    if device.type == "cpu" and precision == Precision.bf16 and cpu_has_native_bf16() is False:
        return ("llmtrain: warning: this CPU has no native bf16 (no AVX512-BF16/AMX), so bf16 is emulated and runs "
                "several times slower than fp32 here; use trainer.precision=fp32 (or auto)")
    return None
