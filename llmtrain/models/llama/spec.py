"""Model family `llama`: Llama-style decoders, tiny to Llama-3-8B, native (model.py) in the Hugging Face format
of Llama, Qwen2, Mistral and Qwen3 (convert.py).

`model.pretrained=<dir or hub name>` starts from a `LlamaForCausalLM` / `Qwen2ForCausalLM` /
`MistralForCausalLM` / `Qwen3ForCausalLM` checkpoint (its sizes win over the preset's); `final/` is that
architecture's Hugging Face dir again. Without it, `model.arch` picks the block variant a fresh model has and
the architecture it exports as.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmtrain.datainfo import IGNORE_INDEX
from llmtrain.errors import ConfigError
from llmtrain.models.adapters import LoraConfig
from llmtrain.models.base import Batch, DataInfo, ModelSpec, PlanProfile, check_vocab, register_model
from llmtrain.models.llama.convert import (
    MODEL_TYPES,
    NotLlama,
    dims_from_hf_config,
    load_hf,
    read_config,
    save_hf,
)
from llmtrain.models.llama.model import ROPE_TYPES, DecoderLayer, Llama, LlamaDims, rope_fields

PRESETS = ("llama_tiny.yaml", "smollm2_135m.yaml", "qwen2_5_0_5b.yaml", "llama3_2_1b.yaml", "llama3_8b.yaml")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# strategy.tp: per DecoderLayer, Megatron's split (the attention's heads and the MLP's width over the ranks)
TP_PLAN = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
           "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
           "mlp.down_proj": "rowwise", "input_layernorm": "norm", "post_attention_layernorm": "norm"}
QK_NORM_PLAN = {"self_attn.q_norm": "head_norm", "self_attn.k_norm": "head_norm"}  # qwen3's per-head norms
# outside the blocks: the vocabulary split over the ranks (embedding rows, head rows: a vocab-parallel loss)
TP_ROOT_PLAN = {"model.embed_tokens": "embedding", "model.norm": "norm", "lm_head": "head"}


@dataclass
class RopeScalingConfig:
    """`model.rope_scaling.*`: how the rotary frequencies are stretched for long contexts."""

    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0  # linear, llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3


@dataclass
class LlamaModelConfig:
    """`model.*` for family llama. Presets: llama_tiny, smollm2_135m, qwen2_5_0_5b, llama3_2_1b, llama3_8b."""

    family: str = "llama"
    arch: str = "llama"  # llama | qwen2 (q/k/v bias) | mistral (sliding window) | qwen3 (q/k norm): what it exports as
    n_layer: int = 4
    n_head: int = 4  # query heads
    n_kv_head: int = 2  # key/value heads (grouped-query attention); n_head must be a multiple of it
    n_embd: int = 128
    head_dim: int | None = None  # None: n_embd // n_head
    intermediate_size: int = 352  # the SwiGLU MLP's width
    n_positions: int = 256  # the context (max_position_embeddings)
    vocab_size: int | None = None  # None: the tokenizer's size
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    attention_bias: bool = False  # arch llama / qwen3: bias on q, k, v and o (qwen2 always has q/k/v bias)
    mlp_bias: bool = False  # arch llama only
    sliding_window: int | None = None  # arch mistral / qwen2 / qwen3: each query sees its last N slots only
    dropout: float = 0.0  # on each block's attention and MLP outputs
    init_std: float = 0.02
    pretrained: str | None = None  # local dir or hub name to start from (its sizes win)
    lora: LoraConfig = field(default_factory=LoraConfig)  # low-rank adapters (fine-tuning); see models/adapters.py
    quantize: str | None = None  # nf4 | fp4: the frozen base in 4 bits under LoRA (QLoRA, CUDA); models/quantize.py
    freeze: list[str] = field(default_factory=list)  # parameter-name globs to freeze, e.g. ["model.embed_tokens.*"]


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


def check_config(cfg: LlamaModelConfig) -> None:
    """One line for a model no Llama-style block can be (sizes of a pretrained model come from its config)."""
    if cfg.pretrained and (Path(cfg.pretrained).expanduser() / "config.json").is_file():  # a local dir: read now
        check_hf_dir(Path(cfg.pretrained).expanduser(), cfg.pretrained)
    if cfg.arch not in MODEL_TYPES:
        raise ConfigError("model.arch", f"unknown architecture {cfg.arch!r}; choose one of {list(MODEL_TYPES)}")
    if not cfg.pretrained:
        for key in ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "n_positions"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"model.{key}", f"must be >= 1 (got {getattr(cfg, key)})")
        if cfg.n_head % cfg.n_kv_head:
            raise ConfigError("model.n_kv_head", f"n_head={cfg.n_head} is not a multiple of n_kv_head={cfg.n_kv_head}; "
                                                 f"use one of {_divisors(cfg.n_head)}")
        if cfg.head_dim is None and cfg.n_embd % cfg.n_head:
            raise ConfigError("model.n_head", f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}; use one of "
                                              f"{_divisors(cfg.n_embd)}, or set model.head_dim")
        head_dim = cfg.head_dim or cfg.n_embd // cfg.n_head
        if head_dim < 2 or head_dim % 2:
            raise ConfigError("model.head_dim", f"must be even and >= 2 for the rotary embedding (got {head_dim})")
        r = cfg.rope_scaling
        if r.rope_type not in ROPE_TYPES:
            raise ConfigError("model.rope_scaling.rope_type", f"unknown {r.rope_type!r}; choose one of {list(ROPE_TYPES)}")
        if r.rope_type != "default" and r.factor <= 0:
            raise ConfigError("model.rope_scaling.factor", f"must be > 0 (got {r.factor})")
        if r.rope_type == "llama3" and not 0 < r.low_freq_factor < r.high_freq_factor:
            raise ConfigError("model.rope_scaling.high_freq_factor", "must exceed low_freq_factor, and both be > 0 "
                                                                     f"(got {r.high_freq_factor}, {r.low_freq_factor})")
        if cfg.rope_theta <= 0 or cfg.rms_norm_eps <= 0:
            raise ConfigError("model.rope_theta" if cfg.rope_theta <= 0 else "model.rms_norm_eps", "must be > 0")
        if cfg.attention_bias and cfg.arch in ("qwen2", "mistral"):
            why = "always has q/k/v bias and none on o_proj" if cfg.arch == "qwen2" else "has no attention bias"
            raise ConfigError("model.attention_bias", f"arch {cfg.arch} {why}; use arch llama or qwen3 for it")
        if cfg.mlp_bias and cfg.arch != "llama":
            raise ConfigError("model.mlp_bias", f"arch {cfg.arch} has no MLP bias; use arch llama for it")
        if cfg.sliding_window is not None and (cfg.arch == "llama" or cfg.sliding_window < 1):
            raise ConfigError("model.sliding_window", "must be >= 1" if cfg.sliding_window < 1 else
                              "arch llama has no sliding window; use arch mistral (or qwen2, qwen3)")
    if cfg.vocab_size is not None and cfg.vocab_size < 2:
        raise ConfigError("model.vocab_size", f"must be >= 2, or null for the tokenizer's (got {cfg.vocab_size})")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError("model.dropout", f"must be in [0, 1) (got {cfg.dropout})")
    if cfg.init_std <= 0:
        raise ConfigError("model.init_std", f"must be > 0 (got {cfg.init_std})")


def dims(cfg: LlamaModelConfig, info: DataInfo) -> LlamaDims:
    vocab = cfg.vocab_size or info.vocab_size
    if vocab is None:
        raise ConfigError("model.vocab_size", "unknown: set model.vocab_size or use a data module with a tokenizer")
    r, window = cfg.rope_scaling, cfg.sliding_window
    return LlamaDims(
        vocab_size=vocab, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim or cfg.n_embd // cfg.n_head, max_position_embeddings=cfg.n_positions,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
        **rope_fields(r.rope_type, r.factor, r.low_freq_factor, r.high_freq_factor,
                      r.original_max_position_embeddings),
        qkv_bias=cfg.arch == "qwen2" or cfg.attention_bias, o_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias,
        qk_norm=cfg.arch == "qwen3", sliding_window=window,
        window_layers=tuple(range(cfg.n_layer)) if window is not None else (), dropout=cfg.dropout,
        model_type=cfg.arch)


def core(model: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed / torch.compile wrappers (FSDP2 modules are the model itself)."""
    from llmtrain.models.gpt2 import core as unwrap

    return unwrap(model)


def _not_ours(cfg: dict[str, Any], why: NotLlama) -> str:
    """Why a config.json is refused, naming the family that reads it when there is one."""
    from llmtrain.models.base import spec_for_hf_dir

    try:
        other = spec_for_hf_dir(cfg, "model.pretrained")
    except ConfigError:
        other = None
    hint = f"; family {other.name!r} reads it" if other is not None and other.name != "llama" else ""
    return f"{why}{hint}"


def check_hf_dir(path: Path, name: str) -> LlamaDims:
    """The dims of a Hugging Face model dir's config.json; one line when this family cannot run it."""
    try:
        hf_cfg = read_config(path)
    except (OSError, ValueError) as e:
        raise ConfigError("model.pretrained", f"cannot read {path / 'config.json'}: {e}") from None
    try:
        return dims_from_hf_config(hf_cfg)
    except NotLlama as e:
        raise ConfigError("model.pretrained", f"{name}: {_not_ours(hf_cfg, e)}") from None
    except KeyError as e:
        raise ConfigError("model.pretrained", f"{name}: its config.json lacks {e}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError("model.pretrained", f"{name}: {e}") from None


@register_model("llama", config=LlamaModelConfig, task="lm", presets=PRESETS)
class LlamaSpec(ModelSpec):
    hf_model_types = MODEL_TYPES

    def check_config(self, cfg: LlamaModelConfig) -> None:
        check_config(cfg)

    def build(self, cfg: LlamaModelConfig, info: DataInfo) -> nn.Module:
        """The model for this data (fp32 weights: a bf16 checkpoint is trained with fp32 master weights); its
        vocabulary is checked against the data's token ids here, once."""
        if cfg.pretrained:
            model = self._pretrained(cfg)
            check_vocab(info, model.dims.vocab_size, pretrained=True)
            return model
        d = dims(cfg, info)
        check_vocab(info, d.vocab_size, pretrained=False)
        model = Llama(d, cfg.init_std)
        eos = info.eos_token_id if info.eos_token_id is not None else d.vocab_size - 1
        model.hf_extra = {"bos_token_id": eos, "eos_token_id": eos, "initializer_range": cfg.init_std}
        return model

    def _pretrained(self, cfg: LlamaModelConfig) -> Llama:
        from llmtrain.hub import hf_model_dir

        path = hf_model_dir(cfg.pretrained, "model.pretrained")
        check_hf_dir(path, cfg.pretrained)  # its config before its weights
        try:
            return load_hf(path, cfg.dropout, torch.float32)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise ConfigError("model.pretrained", f"cannot load {cfg.pretrained!r}: {e}") from None

    def block_classes(self, model: nn.Module) -> tuple[type[nn.Module], ...]:
        return (DecoderLayer,)

    def skeleton(self, cfg: LlamaModelConfig, info: DataInfo) -> nn.Module:
        if not cfg.pretrained:
            return self.build(cfg, info)
        from llmtrain.hub import hf_model_dir

        return Llama(check_hf_dir(hf_model_dir(cfg.pretrained, "model.pretrained"), cfg.pretrained))

    def plan_profile(self, model: nn.Module) -> PlanProfile | None:
        """Per token and layer, an fp32 step keeps 6·C + (3·nh + 2·nkv)·hd + 4·I values: each RMSNorm's input,
        normalised value and output (the projections' shared input), q, k, v and the attention's output (SDPA),
        the output projection's input, and the SwiGLU's gate, silu(gate), up and product. Under autocast the
        norms' inputs and normalised values stay fp32, and each of the five projections that read a norm's output
        keeps its own low-precision copy of it."""
        m = core(model)
        if not isinstance(m, Llama):
            return None
        d = m.dims
        c, hd, nh, nkv, inner = d.hidden_size, d.head_dim, d.num_attention_heads, d.num_key_value_heads, \
            d.intermediate_size
        attn = (3 * nh + 2 * nkv) * hd
        return PlanProfile(d.num_hidden_layers, c, nh, d.vocab_size, 6.0 * c + attn + 4.0 * inner, 4.0 * c,
                           5.0 * c + attn + 4.0 * inner)

    def lora_targets(self, cfg: LlamaModelConfig) -> list[str]:
        return list(LORA_TARGETS)

    def tp_plan(self, cfg: LlamaModelConfig) -> dict[str, str] | None:
        return {**TP_PLAN, **(QK_NORM_PLAN if cfg.arch == "qwen3" else {})}

    def tp_root_plan(self, cfg: LlamaModelConfig) -> dict[str, str] | None:
        return dict(TP_ROOT_PLAN)

    def check_tp(self, cfg: LlamaModelConfig, tp: int) -> None:
        """The query heads, key/value heads and MLP width must split evenly (a pretrained model's sizes are
        checked here when it is a local dir)."""
        if cfg.pretrained and (Path(cfg.pretrained).expanduser() / "config.json").is_file():
            d = check_hf_dir(Path(cfg.pretrained).expanduser(), cfg.pretrained)
            sizes = {"n_head": d.num_attention_heads, "n_kv_head": d.num_key_value_heads,
                     "intermediate_size": d.intermediate_size}
        elif cfg.pretrained:
            return  # a hub name: its sizes are known once downloaded
        else:
            sizes = {"n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head, "intermediate_size": cfg.intermediate_size}
        for key, n in sizes.items():
            if n % tp:
                raise ConfigError("strategy.tp", f"{tp} does not divide model.{key}={n}; use one of {_divisors(n)}")

    def adapter_fan_in_fan_out(self, cfg: LlamaModelConfig) -> bool:
        return False  # nn.Linear weights [out, in], here and in transformers' models

    def tokenizer_source(self, cfg: LlamaModelConfig) -> str | None:
        if not cfg.pretrained:
            return None
        from llmtrain.hub import hf_model_dir

        return str(hf_model_dir(cfg.pretrained, "model.pretrained"))

    def context_length(self, cfg: LlamaModelConfig) -> int | None:
        return None if cfg.pretrained else cfg.n_positions  # a pretrained one's is checked once loaded

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        from llmtrain.models.gpt2 import document_mask

        labels = batch["labels"]  # [B, T], IGNORE_INDEX where there is no target
        if "doc_ids" in batch:  # packed examples: positions restart, attention stays within each example
            return model(input_ids=batch["input_ids"], labels=labels, position_ids=batch["position_ids"],
                         attn_mask=document_mask(batch["doc_ids"]))
        return model(input_ids=batch["input_ids"], labels=labels)

    def count(self, batch: Batch) -> int:
        """Targets of a host batch (numpy: never a device read; a device tensor is refused)."""
        return int(np.count_nonzero(batch["labels"].numpy() != IGNORE_INDEX))

    def flops_per_token(self, model: nn.Module, seq_len: int) -> float | None:
        m = core(model)
        return m.dims.flops_per_token(seq_len) if isinstance(m, Llama) else None

    def causal_lm(self, model: nn.Module) -> Llama | None:
        """The native model itself (its current weights, no copy)."""
        m = core(model)
        return m if isinstance(m, Llama) else None

    def export(self, model: nn.Module, cfg: LlamaModelConfig, info: DataInfo, out_dir: Path) -> None:
        save_hf(core(model), out_dir)

    def load(self, cfg: LlamaModelConfig, info: DataInfo, path: Path) -> nn.Module:
        return load_hf(Path(path))
