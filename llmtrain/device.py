"""The device a command runs on: auto | cpu | cuda | cuda:N as a torch.device."""

from __future__ import annotations

import torch

from llmtrain.errors import ConfigError


def check_device(device: str, key: str = "device") -> None:
    """One line naming `key` unless `device` is auto, cpu, cuda or cuda:N."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(key, f"must be auto, cpu, cuda or cuda:N (got {device!r})")


def pick_device(requested: str, index: int | None = None) -> torch.device:
    """'auto' → a GPU when CUDA is present, else the CPU. 'cuda' → GPU `index` (made the current one) when
    given, else the current GPU; anything else (cpu, cuda:N) as named."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and index is not None:
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(requested)
