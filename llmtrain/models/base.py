"""The ModelSpec interface every model family meets, and the registry of families by name.

Model code knows nothing of distribution: a spec builds a plain ``nn.Module`` and tells strategies
which block class to shard and checkpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from llmtrain.datainfo import Batch, DataInfo  # noqa: F401  (re-exported)
from llmtrain.registry import Presets, Registry

if TYPE_CHECKING:
    from llmtrain.models.protocol import CausalLM


@dataclass(frozen=True)
class PlanProfile:
    """A model's shape as llmtrain-plan counts it. Activation values are per token per layer, as autograd keeps
    them for the backward pass: in an fp32 step, and under autocast split into those that stay fp32 (the
    residual stream, the norms' inputs) and those in the low precision (matmul inputs and outputs)."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_rows: int  # rows of the output projection (a padded vocabulary's included)
    act_values: float  # fp32 step
    act_fp32_autocast: float  # autocast: kept in fp32
    act_low_autocast: float  # autocast: kept in bf16/fp16


class ModelSpec(ABC):
    """One model family: how to build, run the loss, and export/load it."""

    name: str  # the registry key (cfg.model.family)
    task: str  # the DataInfo.task it trains on
    # Hugging Face `model_type`s (config.json) whose dirs this family reads natively: a model dir of one of them
    # is loaded by this spec (see spec_for_hf_dir); "*": any other causal LM transformers knows (a fallback)
    hf_model_types: tuple[str, ...] = ()

    def check_config(self, cfg: Any) -> None:  # noqa: B027  (optional hook: most families check in build)
        """One-line ConfigError for `model.*` values this family cannot build (called before any work)."""

    @abstractmethod
    def build(self, cfg: Any, info: DataInfo) -> nn.Module:
        """A freshly initialised (or pretrained) plain module."""

    def block_classes(self, model: nn.Module) -> tuple[type[nn.Module], ...]:
        """Classes whose instances are sharded (FSDP) and checkpointed (activation checkpointing)."""
        return ()

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of per-target losses, number of targets) for one micro-batch.

        The trainer divides by the global count over all micro-batches and ranks, so gradient
        accumulation and data parallelism give the same update as one large batch.
        """

    def eval_batch(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Sums for evaluation, added over batches and ranks: "loss" and "count" (eval_loss = loss/count),
        plus e.g. "correct" (accuracy = correct/count)."""
        loss_sum, count = self.loss(model, batch)
        return {"loss": loss_sum, "count": count}

    @abstractmethod
    def count(self, batch: Batch) -> int:
        """Number of targets in a host batch (known before the forward pass, read without a device sync)."""

    def skeleton(self, cfg: Any, info: DataInfo) -> nn.Module:
        """The model of this config with no weights read (called under torch.device("meta")): a pretrained
        model's shape from its config.json alone. For llmtrain-plan."""
        return self.build(cfg, info)

    def plan_profile(self, model: nn.Module) -> PlanProfile | None:
        """What llmtrain-plan needs of a built model: its shape and the values a training step keeps per token
        and layer for the backward pass; None: the family is not planned."""
        return None

    def tp_plan(self, cfg: Any) -> dict[str, str] | None:
        """Tensor parallelism (strategy.tp > 1) of each block (`block_classes`): {module path inside the block:
        "colwise" (its output features split: the module returns the local ones) | "qkv_colwise" (a fused
        [q; k; v] nn.Linear: the module returns its heads' q, k and v features, [q_r | k_r | v_r]) | "rowwise" (its
        input features split: the module sums its partial outputs) | "norm" (a norm feeding colwise projections; split
        along the sequence under sequence parallelism) | "head_norm" (a norm over each head of a colwise
        output)}; the model must run on whatever share of its heads its projections return (and take the
        sequence length from a norm's output, not the residual stream's). None: this model has no plan
        (strategy.tp is refused)."""
        return None

    def tp_root_plan(self, cfg: Any) -> dict[str, str] | None:
        """Tensor parallelism outside the blocks: {module path from the root: "embedding" (an nn.Embedding split
        over the vocabulary) | "norm" (the final norm) | "head" (the output projection, `weight` [V, C], whose
        forward(h, labels) gives (loss sum, count): its loss becomes vocabulary-parallel)}. None: the embedding
        and head stay whole on every rank (no sequence parallelism, the loss computed whole on every rank)."""
        return None

    def check_tp(self, cfg: Any, tp: int) -> None:  # noqa: B027  (optional hook)
        """One-line ConfigError when this model's sizes cannot be split `tp` ways (heads, widths)."""

    def lora_targets(self, cfg: Any) -> list[str]:
        """The module-name suffixes LoRA adapts when model.lora.target_modules is unset (the attention and MLP
        projections); [] when the family names none (the user must)."""
        return []

    def adapter_fan_in_fan_out(self, cfg: Any) -> bool:
        """Whether the Hugging Face model an exported LoRA adapter (final/adapter) applies to stores its adapted
        weights [in, out] (transformers' GPT-2 Conv1D); False for nn.Linear layouts ([out, in])."""
        return True

    def global_dropout(self, cfg: Any) -> bool:
        """Whether the model's dropout (if any) draws llmtrain's masks (models/dropout.py), as
        trainer.dropout_rng=global needs; a model without dropout qualifies."""
        return True

    def tokenizer_source(self, cfg: Any) -> str | None:
        """A local dir holding the tokenizer this model brings (a pretrained model's), for data without a
        tokenizer of its own; None: the model brings none. The run hands it to the data module."""
        return None

    def context_length(self, cfg: Any) -> int | None:
        """Longest input the model accepts (None: unbounded)."""
        return None

    @abstractmethod
    def export(self, model: nn.Module, cfg: Any, info: DataInfo, out_dir: Path) -> None:
        """Write a consolidated, framework-independent copy of the model into out_dir."""

    @abstractmethod
    def load(self, cfg: Any, info: DataInfo, path: Path) -> nn.Module:
        """Inverse of export."""

    def flops_per_token(self, model: nn.Module, seq_len: int) -> float | None:
        """Training FLOPs (forward + backward) per token of a `seq_len` block, for MFU; None when unknown."""
        return None

    def causal_lm(self, model: nn.Module) -> CausalLM | None:
        """`model` (as built or trained, inside any wrapper) seen as a causal LM (models/protocol.py), for
        generation and evaluation: the module itself where it meets the protocol, else a conversion or an
        adapter over it; None: not a language model."""
        return None

    def report(self, cfg: Any, info: DataInfo, path: Path) -> list[str]:
        """Lines about the exported model at `path`, printed at the end of a run (e.g. recovered weights)."""
        return []


def check_vocab(info: DataInfo, vocab_size: int, pretrained: bool) -> None:
    """One line when the data's token ids do not fit the model's `vocab_size` embeddings: a pretrained model's
    (use its tokenizer) or a fresh model's model.vocab_size."""
    from llmtrain.errors import ConfigError

    if pretrained:
        needed = info.needed_vocab or info.vocab_size
        if needed is not None and needed > vocab_size:
            raise ConfigError("data.tokenizer", f"the data's token ids reach {needed - 1} but the pretrained model "
                                                f"has {vocab_size} embeddings; use the model's tokenizer")
    elif info.needed_vocab is not None and vocab_size < info.needed_vocab:
        raise ConfigError("model.vocab_size", f"{vocab_size} is too small for the data, whose ids reach "
                                              f"{info.needed_vocab - 1}; unset it or raise it to >= {info.needed_vocab}")


def format_count(n: int) -> str:
    """12 → '12', 62006 → '62.0K', 1_090_000 → '1.09M', 1.56e9 → '1.56B'."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{suffix}" if n / div < 100 else f"{n / div:.0f}{suffix}"
    return str(n)


MODELS = Registry("model", "family", "llmtrain.models", "register_model")
ModelSpecT = TypeVar("ModelSpecT", bound=ModelSpec)


def register_model(name: str, *, config: type, task: str,
                   presets: Presets) -> Callable[[type[ModelSpecT]], type[ModelSpecT]]:
    """Class decorator: register a ModelSpec (one instance of it) as model family `name` (cfg.model.family), with
    its schema (`config`, a dataclass whose `family` defaults to `name`), the task of the data it trains on and
    its YAML presets (see llmtrain.registry). Sets the class's `name`, `task` and `config_cls`."""

    def deco(cls: type[ModelSpecT]) -> type[ModelSpecT]:
        cls.name, cls.task, cls.config_cls = name, task, config  # type: ignore[attr-defined]
        MODELS.add(name, cls(), config=config, task=task, presets=presets, module=cls.__module__)
        return cls

    return deco


def get_model_spec(name: str) -> ModelSpec:
    """The spec of model family `name`; one line naming the registered families when there is none."""
    return MODELS.get(name).target


def spec_for_hf_dir(hf_config: dict[str, Any], key: str) -> ModelSpec:
    """The family that reads a Hugging Face model dir of this config.json: the one that lists its `model_type`
    natively, else the one that takes any causal LM ("*"); one line when none does."""
    from llmtrain.errors import ConfigError

    model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else None
    specs = [e.target for e in MODELS.entries()]
    found = next((s for s in specs if model_type in s.hf_model_types), None) or \
        next((s for s in specs if "*" in s.hf_model_types), None)
    if found is None or not isinstance(model_type, str):
        native = sorted(t for s in specs for t in s.hf_model_types if t != "*")
        raise ConfigError(key, f"a Hugging Face model of type {model_type!r}, which no model family reads (native: "
                               f"{', '.join(native)})")
    return found
