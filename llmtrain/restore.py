"""A run's weights from a checkpoint of any strategy, made whole: consolidated in memory, the weights a partly
frozen or LoRA run leaves out of its checkpoints rebuilt, LoRA merged into a plain model; and an exported model
dir of any family read back (`load_export`).

What `llmtrain-export` writes and what generation and evaluation read; it sits below both (it imports models,
data and the checkpoint reader, never export or generation).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmtrain.models.base import DataInfo, ModelSpec

if TYPE_CHECKING:
    from llmtrain.config import Config
    from llmtrain.data.base import DataModule


def plain_model(spec: ModelSpec, model_cfg: Any, info: DataInfo, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh plain model (no adapters) holding the whole `state`: a LoRA model's is merged into the weights."""
    from llmtrain.models import adapters, quantize

    model = spec.build(model_cfg, info)
    state = quantize.dequantized_state(state)  # a 4-bit base's weights as the trained model computed with them
    lora = adapters.lora_settings(model_cfg)
    if lora is not None:  # merged in the plain model's own layout ([in, out] for transformers' Conv1D)
        state = adapters.merged_state(state, lora, fan_in_fan_out=adapters.conv1d_layout(model))
    model.load_state_dict(state)
    return model


def checkpoint_state(cfg: Config, ck: Path) -> tuple[ModelSpec, DataModule, dict[str, torch.Tensor]]:
    """(model spec, data module, whole model state) of a run from its checkpoint `ck` of any strategy,
    consolidated in memory; the weights a partly frozen or LoRA run leaves out of its checkpoints rebuilt."""
    from llmtrain import checkpoint as ckpt
    from llmtrain.data.base import build_data
    from llmtrain.distributed.consolidate import consolidate
    from llmtrain.errors import ConfigError
    from llmtrain.models.base import get_model_spec
    from llmtrain.precision import Precision

    spec = get_model_spec(cfg.model.family)
    data = build_data(cfg.data, model_tokenizer=spec.tokenizer_source(cfg.model))
    precision = ckpt.read_manifest(ck).get("precision", "fp32")  # what the run computed in (a resolved value)
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError("checkpoint", f"{ck}: its manifest names precision {precision!r}, not fp32, bf16 or fp16")
    return spec, data, complete_state(spec, cfg, data.info, consolidate(ck), Precision(precision).dtype)


def complete_state(spec: ModelSpec, cfg: Config, info: DataInfo, state: dict[str, torch.Tensor],
                   compute_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A checkpoint of a partly frozen model holds its trainable parameters only: add the frozen ones, rebuilt
    as the run built them (pretrained dir or seeded init, a 4-bit base computing in `compute_dtype`, then the
    adapters)."""
    from llmtrain.models import adapters, quantize

    if adapters.lora_settings(cfg.model) is None and not list(getattr(cfg.model, "freeze", None) or []):
        return state
    torch.manual_seed(cfg.trainer.seed)
    model = spec.build(cfg.model, info)
    model = adapters.apply(quantize.apply(model, cfg.model, spec, compute_dtype), cfg.model)
    quantize.materialize(model)  # the 4-bit base as training quantised it
    adapters.load_trainable_state(model, state)
    return model.state_dict()


def load_export(path: Path, key: str, model_cfg: Any = None) -> tuple[ModelSpec, torch.nn.Module]:
    """(its family's spec, the model) of an exported model dir: llmtrain's export of any family (its config.json
    names the family), or a Hugging Face GPT-2 dir (ours, transformers', a hub snapshot). `model_cfg`: the run's,
    when the dir is a run's final/."""
    import json

    from llmtrain.errors import ConfigError
    from llmtrain.models.base import get_model_spec, spec_for_hf_dir

    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(key, f"{path} is not a model dir (its config.json: {e})") from None
    family = meta.get("model", {}).get("family") if isinstance(meta, dict) and isinstance(meta.get("model"),
                                                                                               dict) else None
    # llmtrain's own export names its family; a Hugging Face dir its model_type
    spec = get_model_spec(family) if family else spec_for_hf_dir(meta, key)
    try:
        return spec, spec.load(model_cfg, None, path)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ConfigError(key, f"{path} is not a {spec.name} model dir ({e})") from None
