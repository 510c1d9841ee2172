"""Any causal LM transformers ships (`model=hf model.pretrained=<dir or hub name>`): its own modules, trained
under every strategy, checkpointed, fine-tuned with LoRA, exported with `save_pretrained` and decoded through
its own forward and cache.

The family reads every Hugging Face model dir whose `model_type` no native family reads (`hf_model_types =
("*",)`). Only transformers' own code runs: a dir whose architecture needs its own Python code (`auto_map` with
a type transformers does not know) is refused with one line, `trust_remote_code` is never set, weights are read
through safetensors or a weights-only unpickler.

The loss runs inside the model's forward (`trainable`: the architecture's class with a forward that also takes
`targets`), so that `trainer.compile` compiles it with the model and every wrapper's hooks (DDP, FSDP, ZeRO) see
it; where the logits are the output layer over the last hidden state and nothing more (checked once when the
model is built, `plain_head`) the loss runs the output layer itself and never holds the whole fp32 logits
(`causal_lm_loss`).
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.datainfo import IGNORE_INDEX
from llmtrain.errors import ConfigError
from llmtrain.models.adapters import LoraConfig
from llmtrain.models.base import Batch, DataInfo, ModelSpec, register_model
from llmtrain.models.gpt2_native import CHUNK_ELEMENTS
from llmtrain.models.protocol import Cache

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager")
MAX_SHARD_SIZE = "5GB"  # export: model.safetensors up to this, past it shards and an index
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
UNBOUNDED_CONTEXT = 1 << 16  # the context of a model whose config names none (e.g. ALiBi)


@dataclass
class HFModelConfig:
    """`model.*` for family hf: a causal LM from a Hugging Face model dir or hub name, as transformers builds it."""

    family: str = "hf"
    pretrained: str | None = None  # local dir or hub name (required): its config.json, weights and tokenizer
    random_init: bool = False  # the dir's architecture freshly initialised (its weights unread)
    attn_implementation: str = "auto"  # auto (transformers' choice: sdpa where the model has it) | sdpa | eager
    lora: LoraConfig = field(default_factory=LoraConfig)  # low-rank adapters; see models/adapters.py
    quantize: str | None = None  # nf4 | fp4: the frozen base in 4 bits under LoRA (QLoRA, CUDA); models/quantize.py
    freeze: list[str] = field(default_factory=list)  # parameter-name globs, e.g. ["model.embed_tokens.*"]


# the dir ---------------------------------------------------------------------------------------------------
def model_dir(cfg: HFModelConfig) -> Path:
    """The local dir of model.pretrained (a hub name's snapshot); one line when there is none."""
    from llmtrain.hub import hf_model_dir

    if not cfg.pretrained:
        raise ConfigError("model.pretrained", "is required for model=hf: a local Hugging Face model dir or a hub name")
    return hf_model_dir(cfg.pretrained, "model.pretrained")


def read_config(path: Path, key: str) -> dict[str, Any]:
    """config.json of a model dir transformers can build with its own code, as a dict; one line otherwise."""
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(key, f"{path} is not a model dir (its config.json: {e})") from None
    if not isinstance(meta, dict):
        raise ConfigError(key, f"{path}/config.json holds no JSON object")
    check_architecture(meta, path, key)
    return meta


def check_architecture(meta: dict[str, Any], path: Path, key: str) -> None:
    """One line unless transformers ships a causal-LM class for this config.json's model_type (never a dir's code:
    `auto_map` over a type transformers knows loads transformers' own class, over any other type it is refused)."""
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = meta.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        if meta.get("auto_map"):
            raise ConfigError(key, f"{path} needs its own Python code (auto_map in config.json, model_type "
                                   f"{model_type!r}), which llmtrain never runs; use a model whose architecture "
                                   f"transformers {transformers.__version__} ships")
        raise ConfigError(key, f"{path} holds a model of type {model_type!r}, which transformers "
                               f"{transformers.__version__} does not know")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(key, f"{path} holds a {model_type!r} model, which transformers has no causal-LM class for")


def causal_lm_class(model_type: str) -> type[PreTrainedModel]:
    """transformers' own causal-LM class of `model_type` (made trainable)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return trainable(getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]))


def quiet() -> None:
    """No progress bars or advisory warnings from transformers inside llmtrain's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_pretrained(path: Path, key: str, attn_implementation: str = "auto", random_init: bool = False,
                    meta: dict[str, Any] | None = None) -> nn.Module:
    """transformers' causal LM of the dir (trainable, fp32 weights); whatever it cannot read is one line."""
    meta = meta if meta is not None else read_config(path, key)
    cls = causal_lm_class(meta["model_type"])
    quiet()
    kw: dict[str, Any] = {"dtype": torch.float32}
    if attn_implementation != "auto":
        kw["attn_implementation"] = attn_implementation
    try:
        if random_init:
            config = cls.config_class.from_pretrained(str(path), trust_remote_code=False)
            model = cls._from_config(config, **kw)
        else:
            model = cls.from_pretrained(str(path), trust_remote_code=False, **kw)
    except Exception as e:  # transformers' errors for a dir it cannot load (garbled, unsafe, misshapen)
        raise ConfigError(key, f"cannot load {path}: {_why(e)}") from None
    return prepare(model)


def _why(e: Exception) -> str:
    from llmtrain.safeio import culprit

    if "weights_only" in str(e) or "Unsupported global" in str(e):
        return f"its pickle names {culprit(e)}, which could run code when loaded; it is refused"
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


# the loss inside the forward ---------------------------------------------------------------------------------
class LossForward:
    """Mixed into a transformers causal-LM class: `forward(input_ids=..., targets=labels)` returns (summed
    cross-entropy of the targets [B, T], their count) inside the module's own call; without `targets` it is the
    class's own forward (generation, save_pretrained and the rest see transformers' model)."""

    def forward(self, *args: Any, targets: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if targets is None:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        return causal_lm_loss(self, kwargs["input_ids"], targets)  # type: ignore[arg-type]


_TRAINABLE: dict[type, type] = {}


def trainable(cls: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """`cls` with LossForward mixed in, under cls's own name and module (its saved `architectures` stay cls's)."""
    if issubclass(cls, LossForward):
        return cls
    if cls not in _TRAINABLE:
        _TRAINABLE[cls] = type(cls.__name__, (LossForward, cls), {"__module__": cls.__module__,
                                                                  "__qualname__": cls.__qualname__})
    return _TRAINABLE[cls]


PLAIN_HEAD = "_llmtrain_plain_head"  # instance attribute: the result of plain_head()


def prepare(model: nn.Module) -> nn.Module:
    """A transformers causal LM made trainable (its class) and probed for the chunked loss (plain_head)."""
    model.__class__ = trainable(type(model))
    setattr(model, PLAIN_HEAD, plain_head(model))
    return model


def plain_head(model: nn.Module) -> bool:
    """Whether the model's logits are its output layer (an nn.Linear) over its base model's last hidden state and
    nothing more (no soft-capping, scaling or cast after it): the base model is stood in for by one returning known
    hidden states [1, 2, C], and the model's own forward must give the head's output for them."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    head, prefix = model.get_output_embeddings(), getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if type(head) is not nn.Linear or not isinstance(base, nn.Module) or head.weight.device.type == "meta":
        return False
    h = torch.randn(1, 2, head.in_features, generator=torch.Generator().manual_seed(0)).to(head.weight)

    class Stand(nn.Module):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return BaseModelOutputWithPast(last_hidden_state=h)

    setattr(model, prefix, Stand())
    try:
        with torch.no_grad():
            got = model.forward(input_ids=torch.zeros(1, 2, dtype=torch.long, device=h.device), use_cache=False).logits
            want = head(h)
    except Exception:  # a forward that reads more of its base model than its output: the general loss
        return False
    finally:
        setattr(model, prefix, base)
    return got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)


def loss_of(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, targets) of a (wrapped) transformers causal LM: inside its forward where it was
    prepared (every wrapper's hooks see it), over its logits for one that was not (a model from outside)."""
    if isinstance(core(model), LossForward):
        return model(input_ids=input_ids, targets=labels)
    from llmtrain.models.protocol import nll_from_logits

    return nll_from_logits(model(input_ids=input_ids, use_cache=False).logits, labels)


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the cross-entropy of labels [B, T] (IGNORE_INDEX: no target), number of targets) over the output
    layer where the head is plain and in reach (ZeRO-3 gathers weights inside module calls only), else over the
    model's own logits.

    Over the output layer: under torch.compile, when the logits fit one chunk (CHUNK_ELEMENTS), the plain
    cross-entropy, which inductor fuses into the logits' consumers (their fp32 copy is never made); otherwise
    chunk by chunk with the gradients in the same pass (gpt2_native.linear_cross_entropy: at most one chunk of
    fp32 logits, none kept for backward)."""
    from llmtrain.models.gpt2_native import linear_cross_entropy
    from llmtrain.models.protocol import nll_from_logits

    head = model.get_output_embeddings()
    if not (getattr(model, PLAIN_HEAD, False) and type(head) is nn.Linear and not hasattr(head.weight, "ds_id")):
        logits = super(LossForward, model).forward(input_ids=input_ids, use_cache=False).logits  # type: ignore[misc]
        return nll_from_logits(logits, labels)
    h = model.base_model(input_ids=input_ids, use_cache=False)[0].flatten(0, 1)  # [B·T, C]
    w, b, targets = head.weight, head.bias, labels.flatten()  # [V, C], [V] | None, [B·T]
    if torch.compiler.is_compiling() and h.shape[0] * w.shape[0] <= CHUNK_ELEMENTS:
        logits = F.linear(h, w, b)  # [B·T, V]
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"), \
            (targets != IGNORE_INDEX).sum()
    if b is not None:  # h·wᵀ + b as [h, 1]·[w, b]ᵀ
        h = torch.cat([h, h.new_ones(h.shape[0], 1)], 1)
        w = torch.cat([w, b[:, None].to(w.dtype)], 1)
    return linear_cross_entropy(h, w, targets, w.shape[0])


# the causal-LM protocol over transformers' forward and cache --------------------------------------------------
class HFCache(Cache):
    """transformers' cache behind the protocol's: a DynamicCache (eager decoding) or a StaticCache of `length`
    slots (a compiled step: its tensors keep their shapes and it advances its own fill count, which stays equal to
    `pos` since every call of the engine goes through it). For an architecture without a cache (`config` None) it
    keeps the tokens so far, which every call runs again."""

    def __init__(self, config: Any, length: int, device: torch.device, static: bool) -> None:
        super().__init__(length, device, static)
        self._config = config
        self.hf: Any = None
        self.history: list[torch.Tensor] = []  # no cache: [input_ids, position_ids] of the slots so far
        self.reset()

    def reset(self) -> None:
        super().reset()
        from transformers import DynamicCache, StaticCache

        self.history = []
        if self._config is None:
            return
        if not self.static:
            self.hf = DynamicCache(config=self._config)
        elif self.hf is None:
            self.hf = StaticCache(config=self._config, max_cache_len=self.length)
        else:
            self.hf.reset()  # in place: a compiled step keeps reading the same tensors


@functools.cache
def forward_params(cls: type) -> frozenset[str]:
    """The keyword arguments the forward of a model class names (transformers' own, under LossForward)."""
    mro = cls.__mro__
    own = mro[mro.index(LossForward) + 1] if LossForward in mro else cls
    return frozenset(inspect.signature(own.forward).parameters)


def context_of(config: Any) -> int:
    """The model's context from its config (UNBOUNDED_CONTEXT when it names none)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in CONTEXT_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return UNBOUNDED_CONTEXT


class HFCausalLM(nn.Module):
    """A transformers causal LM seen through llmtrain's protocol (models/protocol.py): its own forward and caches,
    left padding through attention_mask and position_ids as `generate` passes them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.params = forward_params(type(model))  # what its forward takes

    @property
    def max_positions(self) -> int:
        return context_of(self.model.config)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def allocate_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device,
                       static: bool = False) -> HFCache:
        params = self.params
        if static and not (getattr(self.model, "_can_compile_fullgraph", False) and "cache" in params):
            raise ConfigError("compile", f"transformers has no compiled decoding step for "
                                         f"{self.model.config.model_type!r} models; use compile=false")
        return HFCache(self.model.config if "cache" in params else None, length, torch.device(device), static)

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: Cache | None = None,
               mask: torch.Tensor | None = None, *, static: bool = False, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (last_only: [B, 1, V]) of input_ids [B, T]; see the protocol."""
        params, T = self.params, input_ids.shape[1]
        if positions is None and cache is not None and not static:
            positions = torch.arange(cache.pos, cache.pos + T, device=input_ids.device)[None]  # [1, T]
        kw: dict[str, Any] = {"use_cache": cache is not None}
        if mask is not None and "attention_mask" in params:
            kw["attention_mask"] = mask.long()  # [B, S]: the slots so far (static: all of them)
        elif mask is not None and not bool(mask.all()):
            raise ConfigError("batch_size", f"{self.model.config.model_type!r} models take no attention mask, so "
                                            "prompts of different lengths cannot share a batch; use batch_size=1")
        if last_only and "logits_to_keep" in params:
            kw["logits_to_keep"] = 1
        if cache is not None and cache.hf is None:  # no cache in this architecture: the whole history again
            assert isinstance(cache, HFCache), type(cache)
            held = cache.history or [input_ids[:, :0], positions[..., :0].expand(input_ids.shape[0], 0)]
            cache.history = [torch.cat([held[0], input_ids], 1), torch.cat([held[1], positions.expand_as(input_ids)], 1)]
            input_ids, positions, kw["use_cache"] = cache.history[0], cache.history[1], False
        elif cache is not None:
            assert isinstance(cache, HFCache), type(cache)
            kw["cache"] = cache.hf
        if positions is not None and "position_ids" in params:
            kw["position_ids"] = positions
        out = self.model(input_ids=input_ids, **kw).logits
        if cache is not None and not static:
            cache.pos += T
        return out[:, -1:] if last_only else out[:, -T:]

    def nll(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(input_ids=input_ids, targets=labels)  # the chunked loss where the head allows it


# the family --------------------------------------------------------------------------------------------------
def core(model: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed / torch.compile wrappers (FSDP2 modules are the model itself)."""
    from llmtrain.models.gpt2 import core as unwrap

    return unwrap(model)


def block_classes_of(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The decoder-layer classes: those the model names in `_no_split_modules` found inside it, else the class of
    the largest ModuleList whose entries share one class."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if found:
        return tuple(sorted(found, key=lambda c: c.__name__))
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)
             and len({type(c) for c in m}) == 1]
    if not lists:
        return ()
    best = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return (type(best[0]),)


@functools.cache
def skeleton(path: Path) -> nn.Module:
    """The dir's architecture on the meta device (no memory, no weights read): its module names and types."""
    meta = read_config(path, "model.pretrained")
    cls = causal_lm_class(meta["model_type"])
    quiet()
    try:
        config = cls.config_class.from_pretrained(str(path), trust_remote_code=False)
        with torch.device("meta"):
            return cls._from_config(config)
    except Exception as e:  # a config.json transformers cannot build from
        raise ConfigError("model.pretrained", f"cannot load {path}: {_why(e)}") from None


def linear_names_in_blocks(model: nn.Module) -> list[str]:
    """The names of the linear layers inside the decoder blocks."""
    blocks = block_classes_of(model)
    return sorted({n.rsplit(".", 1)[-1] for b in model.modules() if isinstance(b, blocks)
                   for n, m in b.named_modules() if n and type(m).__name__ in ("Linear", "Conv1D")})


@register_model("hf", config=HFModelConfig, task="lm", presets=("hf.yaml",))
class HFSpec(ModelSpec):
    hf_model_types = ("*",)

    def check_config(self, cfg: HFModelConfig) -> None:
        if not cfg.pretrained:
            raise ConfigError("model.pretrained", "is required for model=hf: a local Hugging Face model dir or a hub "
                                                  "name (the architecture, its weights and its tokenizer)")
        if cfg.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError("model.attn_implementation", f"unknown attention {cfg.attn_implementation!r}; choose "
                                                           f"one of {list(ATTN_IMPLEMENTATIONS)}")
        path = model_dir(cfg)
        read_config(path, "model.pretrained")

    def build(self, cfg: HFModelConfig, info: DataInfo) -> nn.Module:
        """The model for this data: its vocabulary is checked against the data's token ids here, once."""
        if info.packed:
            raise ConfigError("data.packing", "packed examples need a model that keeps attention within each "
                                              "example; use data.packing=false with model=hf")
        model = load_pretrained(model_dir(cfg), "model.pretrained", cfg.attn_implementation, cfg.random_init)
        needed, have = info.needed_vocab or info.vocab_size, model.get_input_embeddings().num_embeddings
        if needed is not None and needed > have:
            raise ConfigError("data.tokenizer", f"the data's token ids reach {needed - 1} but the model has {have} "
                                                "embeddings; use the model's tokenizer")
        return model

    def skeleton(self, cfg: HFModelConfig, info: DataInfo) -> nn.Module:
        return skeleton(model_dir(cfg))  # from its config.json alone (no weights read)

    def block_classes(self, model: nn.Module) -> tuple[type[nn.Module], ...]:
        return block_classes_of(core(model))

    def lora_targets(self, cfg: HFModelConfig) -> list[str]:
        """peft's default targets for the architecture, else every linear layer inside its decoder blocks."""
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        path = model_dir(cfg)
        model_type = read_config(path, "model.pretrained")["model_type"]
        if model_type in DEFAULTS:
            return list(DEFAULTS[model_type])
        return linear_names_in_blocks(skeleton(path))

    def adapter_fan_in_fan_out(self, cfg: HFModelConfig) -> bool:
        from llmtrain.models.adapters import conv1d_layout

        return conv1d_layout(skeleton(model_dir(cfg)))

    def global_dropout(self, cfg: HFModelConfig) -> bool:
        return False  # transformers' models draw from their own nn.Dropout modules

    def tokenizer_source(self, cfg: HFModelConfig) -> str | None:
        return str(model_dir(cfg))

    def context_length(self, cfg: HFModelConfig) -> int | None:
        meta = read_config(model_dir(cfg), "model.pretrained")
        text = meta.get("text_config") if isinstance(meta.get("text_config"), dict) else meta
        return next((text[k] for k in CONTEXT_KEYS if isinstance(text.get(k), int) and text[k] > 0), None)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return loss_of(model, batch["input_ids"], batch["labels"])

    def count(self, batch: Batch) -> int:
        """Targets of a host batch (numpy: never a device read)."""
        return int(np.count_nonzero(batch["labels"].numpy() != IGNORE_INDEX))

    def flops_per_token(self, model: nn.Module, seq_len: int) -> float | None:
        """6 FLOPs per weight a token multiplies (every parameter but the input embedding's, the output layer's
        counted when tied to it) plus attention's 12·layers·width·seq_len."""
        m = core(model)
        text = m.config.get_text_config()
        emb, head = m.get_input_embeddings().weight, m.get_output_embeddings()
        n = sum({id(p): p.numel() for p in m.parameters()}.values()) - emb.numel()
        if head is not None and getattr(head, "weight", None) is emb:
            n += emb.numel()
        layers, width = getattr(text, "num_hidden_layers", None), getattr(text, "hidden_size", None)
        attention = 12 * layers * width * seq_len if isinstance(layers, int) and isinstance(width, int) else 0
        return 6.0 * n + attention

    def causal_lm(self, model: nn.Module) -> HFCausalLM:
        return HFCausalLM(core(model))

    def export(self, model: nn.Module, cfg: HFModelConfig, info: DataInfo, out_dir: Path) -> None:
        """save_pretrained: safetensors, sharded past MAX_SHARD_SIZE (the tokenizer is written beside it)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        quiet()
        core(model).save_pretrained(out_dir, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)

    def load(self, cfg: HFModelConfig | None, info: DataInfo | None, path: Path) -> nn.Module:
        attn = getattr(cfg, "attn_implementation", "auto") if cfg is not None else "auto"
        return load_pretrained(Path(path), "model", attn)
