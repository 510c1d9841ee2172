"""Image classifiers for 32x32 RGB: a residual CNN and the LeNet-style CIFAR-10 CNN."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class VisionModelConfig:
    """`model.*` for family vision."""

    family: str = "vision"
    arch: str = "resnet"  # resnet | cnn
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])  # resnet stage widths
    blocks_per_stage: int = 1  # resnet
