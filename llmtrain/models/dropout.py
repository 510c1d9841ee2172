"""Dropout masks that depend on a sample's row in the global micro-batch, not on how that batch is split.

By default a model's dropout draws from each process's own generator: fast, and a resume on the same world
size is exact (every rank's RNG state is in the checkpoint), but one process with a micro-batch of 8 and two
with 4 each draw different masks. With `trainer.dropout_rng=global` the loop opens `masks(key, row0, rows)`
around each micro-step (forward and backward): a model's `dropout(x, p, site)` then keeps element j of row r
when hash(key, site, row0 + r, j) clears p. Every strategy and world size draws the same masks for the same
global rows, and activation checkpointing's recomputation draws them again exactly (no generator state).

The model knows only "my rows are rows [row0, row0 + B) of a batch", nothing of ranks. The masks are a
counter-based integer hash computed with tensor ops, the same on every device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

_M32 = 0xFFFFFFFF
_ACTIVE: list[tuple[torch.Tensor, int]] = []  # (key: int64 [], row0) of the micro-step in progress


def _mix(x: Any) -> Any:
    """A 32-bit integer hash of values in [0, 2**32): a Python int, or elementwise an int64 tensor."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def step_key(seed: int, step: int, micro: int) -> int:
    """The masks' key of one micro-step (32 bits)."""
    return _mix(_mix(_mix(seed & _M32) ^ (step & _M32)) ^ (micro & _M32))


@contextlib.contextmanager
def masks(key: torch.Tensor, row0: int) -> Iterator[None]:
    """Within the block, `dropout` draws batch-split-independent masks: `key` (an int64 scalar tensor on the
    model's device, updated in place between micro-steps so a compiled model sees one input) and the global
    index of this process's first row."""
    _ACTIVE.append((key, row0))
    try:
        yield
    finally:
        _ACTIVE.pop()


def active() -> bool:
    return bool(_ACTIVE)


def dropout(x: torch.Tensor, p: float, training: bool, site: int) -> torch.Tensor:
    """Dropout of x [B, ...]: per-process RNG, or (inside `masks`) the global rows' hashed masks. `site` tells
    the dropout calls of one forward apart (a layer's index and role), the same in a recomputation."""
    if not training or p <= 0:
        return x
    if not _ACTIVE:
        return F.dropout(x, p, True)
    key, row0 = _ACTIVE[-1]
    b, n = x.shape[0], x[0].numel()
    rows = torch.arange(row0, row0 + b, device=x.device, dtype=torch.int64)  # [B] global rows
    base = _mix(_mix(key ^ (site & _M32)) ^ rows)  # [B]
    cols = _mix(torch.arange(n, device=x.device, dtype=torch.int64))  # [n]
    u = _mix(base[:, None] ^ cols[None, :])  # [B, n] uniform in [0, 2**32)
    keep = (u >= int(p * 2**32)).view(x.shape)
    return x * keep.to(x.dtype) / (1.0 - p)
