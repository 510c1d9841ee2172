"""Parameter-efficient fine-tuning as a model transform: freezing by name pattern, and LoRA through peft.

Applied in train.py to the plain model before `strategy.setup` (like activation checkpointing), so model
family code stays plain. LoRA layers are injected in place (`peft.inject_adapter_in_model`): the model keeps
its class and forward, only the adapter weights train. For export the adapters are merged into the base
weights (`merged_state`) and also written as a PEFT adapter dir (`save_adapter`) that
`PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), dir)` loads.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmtrain.errors import ConfigError

ADAPTER = "default"  # peft's adapter name inside the injected layers
LORA_STRATEGIES = ("single", "ddp")


@dataclass
class LoraConfig:
    """`model.lora.*`: low-rank adapters on the named linear layers; the base weights stay frozen."""

    enabled: bool = False
    r: int = 8  # rank of each adapter
    alpha: float = 16.0  # scaling = alpha / r
    dropout: float = 0.05  # on the adapter's input
    # module name suffixes; None: the family's own (ModelSpec.lora_targets), filled in when the config is checked
    target_modules: list[str] | None = None


def lora_settings(model_cfg: Any) -> LoraConfig | None:
    """The model config's LoRA settings when enabled, else None."""
    lora = getattr(model_cfg, "lora", None)
    return lora if lora is not None and lora.enabled else None


def resolve_targets(model_cfg: Any, family_targets: list[str]) -> None:
    """Fill model.lora.target_modules with the family's own when LoRA is on and the user named none."""
    lora = lora_settings(model_cfg)
    if lora is not None and lora.target_modules is None:
        lora.target_modules = list(family_targets)


def check(model_cfg: Any, strategy: str) -> None:
    """Config checks that need no model: LoRA's numbers and the strategies that take it."""
    lora = lora_settings(model_cfg)
    if lora is None:
        return
    if lora.r < 1:
        raise ConfigError("model.lora.r", f"must be >= 1 (got {lora.r})")
    if lora.alpha <= 0:
        raise ConfigError("model.lora.alpha", f"must be > 0 (got {lora.alpha})")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError("model.lora.dropout", f"must be in [0, 1) (got {lora.dropout})")
    if not lora.target_modules:
        raise ConfigError("model.lora.target_modules", "is empty; name the linear layers to adapt, e.g. [c_attn]")
    if strategy not in LORA_STRATEGIES:
        raise ConfigError("model.lora.enabled", f"LoRA runs under strategy single or ddp, not {strategy}: the "
                                                "adapters are a few MB and the frozen base is not sharded by "
                                                "llmtrain's fsdp/deepspeed setups; use strategy=ddp on several GPUs")


def apply(model: nn.Module, model_cfg: Any) -> nn.Module:
    """Freeze `model.freeze` patterns, then inject LoRA (`model.lora`); returns the same module."""
    patterns = list(getattr(model_cfg, "freeze", None) or [])
    if patterns:
        freeze(model, patterns)
    lora = lora_settings(model_cfg)
    if lora is not None:
        model = inject_lora(model, lora)
    return model


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """requires_grad=False for parameters whose name matches any glob pattern (e.g. 'transformer.wte.*',
    'transformer.h.[0-3].*'); every pattern must match something. Returns the frozen names."""
    names = [n for n, _ in model.named_parameters()]
    frozen = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError("model.freeze", f"pattern {pat!r} matches no parameter (names look like "
                                              f"{names[0]!r}, {names[-1]!r})")
        frozen += hits
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    if all(not p.requires_grad for p in model.parameters()):
        raise ConfigError("model.freeze", "freezes every parameter; nothing would train")
    return sorted(set(frozen))


def conv1d_layout(model: nn.Module) -> bool:
    """Whether the model stores its projections as transformers' Conv1D ([in, out] weights: GPT-2's, so LoRA on
    them is fan_in_fan_out) rather than nn.Linear ([out, in]: llmtrain's native GPT-2, most architectures)."""
    return any(type(m).__name__ == "Conv1D" for m in model.modules())


def peft_config(lora: LoraConfig, fan_in_fan_out: bool, base: str | None = None) -> Any:
    import peft

    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=list(lora.target_modules), bias="none", fan_in_fan_out=fan_in_fan_out,
                           base_model_name_or_path=base)


def inject_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """LoRA layers on every module whose name ends with a target; only their weights stay trainable."""
    import peft

    for p in model.parameters():
        p.requires_grad_(False)
    try:
        model = peft.inject_adapter_in_model(peft_config(lora, conv1d_layout(model)), model)
    except ValueError:  # no module matches the targets
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ in
                         ("Linear", "Conv1D")})
        raise ConfigError("model.lora.target_modules", f"{list(lora.target_modules)} match no layer of the model; "
                                                       f"its linear layers are named {', '.join(linear)}") from None
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
        if ".lora_" in n and p.dtype != torch.float32:  # peft takes a half-precision base's dtype: train in fp32
            p.data = p.data.float()
    return model


# state dicts ---------------------------------------------------------------------------------------
def _lora_prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    """Module paths that carry an adapter ('transformer.h.0.attn.c_attn', ...)."""
    suffix = f".lora_A.{ADAPTER}.weight"
    return [k[: -len(suffix)] for k in state if k.endswith(suffix)]


def merged_state(state: dict[str, torch.Tensor], lora: LoraConfig, fan_in_fan_out: bool = False
                 ) -> dict[str, torch.Tensor]:
    """A LoRA model's state as the plain model's: W + (alpha/r)·B·A for every adapted layer."""
    out = dict(state)
    scale = lora.alpha / lora.r
    for pre in _lora_prefixes(state):
        a = out.pop(f"{pre}.lora_A.{ADAPTER}.weight").float()  # [r, in]
        b = out.pop(f"{pre}.lora_B.{ADAPTER}.weight").float()  # [out, r]
        w = out.pop(f"{pre}.base_layer.weight")
        delta = (b @ a) * scale  # [out, in]
        out[f"{pre}.weight"] = (w.float() + (delta.T if fan_in_fan_out else delta)).to(w.dtype)
        for k in [k for k in out if k.startswith(f"{pre}.base_layer.")]:
            out[f"{pre}.{k[len(pre) + len('.base_layer.'):]}"] = out.pop(k)
    return out


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's saved names (base_model.model.<path>.lora_A.weight)."""
    out = {}
    for pre in _lora_prefixes(state):
        for ab in ("lora_A", "lora_B"):
            out[f"base_model.model.{pre}.{ab}.weight"] = state[f"{pre}.{ab}.{ADAPTER}.weight"].contiguous()
    return out


def save_adapter(state: dict[str, torch.Tensor], lora: LoraConfig, out_dir: Path, base: str | None,
                 fan_in_fan_out: bool = True) -> None:
    """adapter_config.json + adapter_model.safetensors for the Hugging Face model (`fan_in_fan_out`: its adapted
    weights are [in, out], as transformers' GPT-2 Conv1D stores them; False for nn.Linear layouts)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu() for k, v in adapter_state(state).items()}, str(out_dir / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    cfg = peft_config(lora, fan_in_fan_out=fan_in_fan_out, base=base).to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold when part of the model is frozen: the trainable parameters and the
    buffers. Frozen weights come back from the same config (pretrained dir or seeded init) on resume."""
    keep = trainable_names(model) | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in keep}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of trainable_state: every trainable parameter must be in `state`."""
    missing = trainable_names(model) - set(state)
    if missing:
        raise ValueError(f"checkpoint lacks trainable parameters {sorted(missing)[:3]}")
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"checkpoint holds parameters this model lacks: {unexpected[:3]}")
