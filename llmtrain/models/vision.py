"""Image classifiers for 32x32 RGB: a residual CNN and the LeNet-style CIFAR-10 CNN.

Loss: cross-entropy summed over the batch; count = number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.errors import ConfigError
from llmtrain.models.base import Batch, DataInfo, register_model
from llmtrain.models.state_io import PlainModuleSpec

ARCHS = ("resnet", "cnn")


@dataclass
class VisionModelConfig:
    """`model.*` for family vision."""

    family: str = "vision"
    arch: str = "resnet"  # resnet | cnn
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])  # resnet stage widths
    blocks_per_stage: int = 1  # resnet


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the skip (1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, c_in, H, W] -> [B, c_out, H/s, W/s]
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv3x3-BN-ReLU, stages of BasicBlocks (stride 2 between stages), global avg pool, fc."""

    def __init__(self, widths: list[int], blocks_per_stage: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(c_in, width, stride))
                c_in = width
        self.stages = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, num_classes]
        h = self.stages(self.stem(x))  # [B, widths[-1], H / 2**(stages-1), ...]
        return self.fc(h.mean(dim=(2, 3)))


class LeNet(nn.Module):
    """The classic CIFAR-10 CNN: conv5x5(6)-pool-conv5x5(16)-pool-fc120-fc84-fc(num_classes)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, 32, 32] -> [B, num_classes]
        x = self.pool(F.relu(self.conv1(x)))  # [B, 6, 14, 14]
        x = self.pool(F.relu(self.conv2(x)))  # [B, 16, 5, 5]
        x = torch.flatten(x, 1)  # [B, 400]
        x = F.relu(self.fc1(x))  # [B, 120]
        x = F.relu(self.fc2(x))  # [B, 84]
        return self.fc3(x)


@register_model("vision", config=VisionModelConfig, task="classification",
                presets=("cnn.yaml", "resnet.yaml"))
class VisionSpec(PlainModuleSpec):
    def build(self, cfg: VisionModelConfig, info: DataInfo) -> nn.Module:
        if info.num_classes is None:
            raise ConfigError("data.kind", "vision models need num_classes from the data")
        shape = tuple(info.image_shape or (3, 32, 32))
        if cfg.arch == "cnn":
            if shape != (3, 32, 32):
                raise ConfigError("model.arch", f"cnn (LeNet) takes 3x32x32 images, not {'x'.join(map(str, shape))}")
            return LeNet(info.num_classes)
        if cfg.arch == "resnet":
            widths = list(cfg.widths)
            if not widths or any(w <= 0 for w in widths):
                raise ConfigError("model.widths", f"must be a non-empty list of positive widths (got {widths})")
            if cfg.blocks_per_stage <= 0:
                raise ConfigError("model.blocks_per_stage", f"must be > 0 (got {cfg.blocks_per_stage})")
            return ResNet(widths, cfg.blocks_per_stage, info.num_classes, in_channels=shape[0])
        raise ConfigError("model.arch", f"unknown vision arch {cfg.arch!r}; choose one of {list(ARCHS)}")

    def block_classes(self, model: nn.Module) -> tuple[type[nn.Module], ...]:
        return (BasicBlock,) if isinstance(model, ResNet) else ()

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch["x"])  # [B, num_classes]
        y = batch["y"]  # [B]
        return F.cross_entropy(logits.float(), y, reduction="sum"), torch.tensor(y.shape[0], device=y.device)

    def eval_batch(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits = model(batch["x"]).float()  # [B, num_classes]
        y = batch["y"]
        return {"loss": F.cross_entropy(logits, y, reduction="sum"), "count": torch.tensor(y.shape[0], device=y.device),
                "correct": (logits.argmax(dim=1) == y).sum()}

