"""32x32 RGB classification data: synthetic by default, CIFAR-10 from its local python archive."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ImageDataConfig:
    """`data.*` for kind images."""

    kind: str = "images"
    path: str | None = None  # CIFAR-10: cifar-10-python.tar.gz or its extracted cifar-10-batches-py dir
    num_classes: int = 10
    n_train: int = 2048  # synthetic only
    n_val: int = 512  # synthetic only
    seed: int = 0
