"""GPT-2, tiny to XL, in the Hugging Face weight format.

`model.impl=native` (default): llmtrain's own GPT-2 (models/gpt2_native.py: fused QKV, SDPA, a loss that
never holds the full fp32 logits), loading and exporting HF GPT-2 dirs. `model.impl=hf`: transformers'
`GPT2LMHeadModel` itself, for comparison or for what only transformers has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmtrain.errors import ConfigError
from llmtrain.models.adapters import LoraConfig
from llmtrain.models.base import Batch, DataInfo, ModelSpec, PlanProfile, check_vocab, register_model
from llmtrain.models.gpt2_native import GPT2, IGNORE_INDEX, Block, GPT2Dims, from_hf, load_hf, save_hf

IMPLS = ("native", "hf")
# strategy.tp: per Block, Megatron's split (the attention's heads and the MLP's width over the ranks); the fused
# [q; k; v] projection gives each rank its heads' rows of all three (distributed/tp_fused.py)
TP_PLAN = {"attn.c_attn": "qkv_colwise", "attn.c_proj": "rowwise", "mlp.c_fc": "colwise", "mlp.c_proj": "rowwise",
           "ln_1": "norm", "ln_2": "norm"}
# outside the blocks: the vocabulary split over the ranks (wte's rows, the tied head's: a vocab-parallel loss), the
# position embedding's output cut to the sequence shard (sequence parallelism)
TP_ROOT_PLAN = {"transformer.wte": "embedding", "transformer.wpe": "positions", "transformer.ln_f": "norm",
                "lm_head": "head"}


@dataclass
class GPT2ModelConfig:
    """`model.*` for family gpt2. Sizes: tiny, small (124M), medium, large, xl."""

    family: str = "gpt2"
    impl: str = "native"  # native | hf (transformers' GPT2LMHeadModel)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 256
    vocab_size: int | None = None  # None: the tokenizer's size
    dropout: float = 0.0
    pretrained: str | None = None  # local dir or hub name to start from (its sizes win)
    lora: LoraConfig = field(default_factory=LoraConfig)  # low-rank adapters (fine-tuning); see models/adapters.py
    quantize: str | None = None  # nf4 | fp4: the frozen base in 4 bits under LoRA (QLoRA, CUDA); models/quantize.py
    freeze: list[str] = field(default_factory=list)  # parameter-name globs to freeze, e.g. ["transformer.wte.*"]


def check_config(cfg: GPT2ModelConfig) -> None:
    """One line for sizes no GPT-2 can have (sizes of a pretrained model come from its config instead)."""
    if not cfg.pretrained:
        for key in ("n_layer", "n_head", "n_embd", "n_positions"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"model.{key}", f"must be >= 1 (got {getattr(cfg, key)})")
        if cfg.n_embd % cfg.n_head:
            raise ConfigError("model.n_head", f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
    if cfg.vocab_size is not None and cfg.vocab_size < 2:
        raise ConfigError("model.vocab_size", f"must be >= 2, or null for the tokenizer's (got {cfg.vocab_size})")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError("model.dropout", f"must be in [0, 1) (got {cfg.dropout})")
    if cfg.impl not in IMPLS:
        raise ConfigError("model.impl", f"unknown GPT-2 implementation {cfg.impl!r}; choose one of {list(IMPLS)}")


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


def dims(cfg: GPT2ModelConfig, info: DataInfo) -> GPT2Dims:
    vocab = cfg.vocab_size or info.vocab_size
    if vocab is None:
        raise ConfigError("model.vocab_size", "unknown: set model.vocab_size or use a data module with a tokenizer")
    return GPT2Dims(vocab_size=vocab, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                    n_head=cfg.n_head, dropout=cfg.dropout,
                    eos_token_id=info.eos_token_id if info.eos_token_id is not None else vocab - 1)


def _hf_config(d: GPT2Dims):
    from transformers import GPT2Config

    # No pad_token_id, as in the released GPT-2: packed blocks have no padding, and with one set HF checks
    # every forward's input for it (a device sync) and warns about the EOS separators.
    return GPT2Config(vocab_size=d.vocab_size, n_positions=d.n_positions, n_embd=d.n_embd, n_layer=d.n_layer,
                      n_head=d.n_head, resid_pdrop=d.dropout, embd_pdrop=d.dropout, attn_pdrop=d.dropout,
                      bos_token_id=d.eos_token_id, eos_token_id=d.eos_token_id, tie_word_embeddings=True)


def core(model: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed / torch.compile wrappers (FSDP2 modules are the model itself)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(getattr(model, "module", None), nn.Module):
            inner = model.module
        if inner is None:
            return model
        model = inner


@register_model("gpt2", config=GPT2ModelConfig, task="lm",
                presets=("gpt2_tiny.yaml", "gpt2_small.yaml", "gpt2_medium.yaml", "gpt2_large.yaml", "gpt2_xl.yaml"))
class GPT2Spec(ModelSpec):
    hf_model_types = ("gpt2",)

    def check_config(self, cfg: GPT2ModelConfig) -> None:
        check_config(cfg)

    def build(self, cfg: GPT2ModelConfig, info: DataInfo) -> nn.Module:
        """The model for this data: its vocabulary is checked against the data's token ids here, once."""
        if info.packed and cfg.impl == "hf":
            raise ConfigError("data.packing", "packed examples need model.impl=native to keep attention within each "
                                              "example; use data.packing=false with model.impl=hf")
        if cfg.pretrained:
            model = self._pretrained(cfg)
            check_vocab(info, model.dims.vocab_size if isinstance(model, GPT2) else model.config.vocab_size,
                        pretrained=True)
            return model
        d = dims(cfg, info)
        check_vocab(info, d.vocab_size, pretrained=False)
        if cfg.impl == "hf":
            from transformers import GPT2LMHeadModel

            from llmtrain.models.hf import prepare

            return prepare(GPT2LMHeadModel(_hf_config(d)))
        return GPT2(d)

    def skeleton(self, cfg: GPT2ModelConfig, info: DataInfo) -> nn.Module:
        if not cfg.pretrained:
            return self.build(cfg, info)
        import json

        from llmtrain.hub import hf_model_dir
        from llmtrain.models.gpt2_native import dims_from_hf_config

        path = hf_model_dir(cfg.pretrained, "model.pretrained") / "config.json"
        return GPT2(dims_from_hf_config(json.loads(path.read_text())))

    def plan_profile(self, model: nn.Module) -> PlanProfile | None:
        """17·C values per token and layer: both layer norms' inputs, the four projections' inputs, q, k, v, the
        attention's output, GeLU's input (4C) and the MLP projection's input (4C); under autocast the layer
        norms' inputs stay fp32."""
        from llmtrain.models.gpt2_native import dims_from_hf_config

        m = core(model)
        d = m.dims if isinstance(m, GPT2) else dims_from_hf_config(m.config.to_dict())
        c = d.n_embd
        return PlanProfile(d.n_layer, c, d.n_head, d.padded_vocab, 17.0 * c, 2.0 * c, 15.0 * c)

    def lora_targets(self, cfg: GPT2ModelConfig) -> list[str]:
        return ["c_attn", "c_proj", "c_fc"]  # the same names in llmtrain's GPT-2 and transformers'

    def global_dropout(self, cfg: GPT2ModelConfig) -> bool:
        return cfg.impl == "native"  # transformers' GPT-2 has nn.Dropout modules of its own

    def tp_plan(self, cfg: GPT2ModelConfig) -> dict[str, str] | None:
        return dict(TP_PLAN) if cfg.impl == "native" else None  # transformers' GPT-2: no plan

    def tp_root_plan(self, cfg: GPT2ModelConfig) -> dict[str, str] | None:
        return dict(TP_ROOT_PLAN) if cfg.impl == "native" else None

    def check_tp(self, cfg: GPT2ModelConfig, tp: int) -> None:
        """The heads and the MLP width must split evenly, and no dropout: the attention's dropout draws its masks
        by the index of each head among this rank's, so split heads cannot draw one process's masks (a
        pretrained model's sizes and dropout are checked here when it is a local dir)."""
        sizes, drop, what = {"n_head": cfg.n_head, "n_embd": cfg.n_embd}, cfg.dropout, "model.dropout"
        if cfg.pretrained:
            path = Path(cfg.pretrained).expanduser() / "config.json"
            if not path.is_file():
                return  # a hub name: its sizes are known once downloaded
            import json

            from llmtrain.models.gpt2_native import dims_from_hf_config

            try:
                d = dims_from_hf_config(json.loads(path.read_text()))
            except (ValueError, KeyError, TypeError):
                return  # not a GPT-2 we can run: refused when loaded, in its own words
            sizes, drop, what = {"n_head": d.n_head, "n_embd": d.n_embd}, d.dropout, f"{path}'s resid_pdrop"
        if sizes["n_head"] % tp:
            raise ConfigError("strategy.tp", f"{tp} does not divide model.n_head={sizes['n_head']}; use one of "
                                             f"{_divisors(sizes['n_head'])}")
        if 4 * sizes["n_embd"] % tp:  # the MLP's width (given the heads' split when n_head divides n_embd)
            raise ConfigError("strategy.tp", f"{tp} does not divide the MLP width 4·model.n_embd="
                                             f"{4 * sizes['n_embd']}; use one of {_divisors(4 * sizes['n_embd'])}")
        if drop > 0:
            raise ConfigError("strategy.tp", f"GPT-2's attention dropout cannot be split over tensor-parallel ranks "
                                             f"(its masks follow each rank's own heads): {what}={drop} needs "
                                             "strategy.tp=1, or set it to 0")

    def tokenizer_source(self, cfg: GPT2ModelConfig) -> str | None:
        if not cfg.pretrained:
            return None
        from llmtrain.hub import hf_model_dir

        return str(hf_model_dir(cfg.pretrained, "model.pretrained"))

    def _pretrained(self, cfg: GPT2ModelConfig) -> nn.Module:
        from llmtrain.hub import hf_model_dir

        path = hf_model_dir(cfg.pretrained, "model.pretrained")
        if cfg.impl == "hf":
            return hf_from_pretrained(path, "model.pretrained")
        try:
            return load_hf(path)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise ConfigError("model.pretrained", f"cannot load {cfg.pretrained!r}: {e}") from None

    def block_classes(self, model: nn.Module) -> tuple[type[nn.Module], ...]:
        if isinstance(model, GPT2):
            return (Block,)
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        return (GPT2Block,)

    def context_length(self, cfg: GPT2ModelConfig) -> int | None:
        if cfg.pretrained:
            return None  # known once loaded; checked against the model in build()
        return cfg.n_positions

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]  # [B, T], IGNORE_INDEX where there is no target
        if isinstance(core(model), GPT2):  # the loss runs inside the model's forward (every wrapper's hooks)
            if "doc_ids" in batch:  # packed examples: positions restart, attention stays within each example
                return model(input_ids=batch["input_ids"], labels=labels, position_ids=batch["position_ids"],
                             attn_mask=document_mask(batch["doc_ids"]))
            return model(input_ids=batch["input_ids"], labels=labels)
        from llmtrain.models.hf import loss_of

        return loss_of(model, batch["input_ids"], labels)  # transformers' GPT-2

    def count(self, batch: Batch) -> int:
        """Targets of a host batch (numpy: never a device read; a device tensor is refused)."""
        return int(np.count_nonzero(batch["labels"].numpy() != IGNORE_INDEX))

    def flops_per_token(self, model: nn.Module, seq_len: int) -> float | None:
        m = core(model)
        if isinstance(m, GPT2):
            return m.dims.flops_per_token(seq_len)
        from llmtrain.models.gpt2_native import dims_from_hf_config

        return dims_from_hf_config(m.config.to_dict()).flops_per_token(seq_len)

    def causal_lm(self, model: nn.Module) -> GPT2:
        """The native model itself (its current weights, no copy); transformers' GPT-2 converted to it
        (`from_hf`: its tensors shared where the layouts agree)."""
        m = core(model)
        if isinstance(m, GPT2):
            return m
        return from_hf(m.config.to_dict(), m.state_dict())

    def export(self, model: nn.Module, cfg: GPT2ModelConfig, info: DataInfo, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(model, GPT2):
            save_hf(model, out_dir)
        else:
            model.save_pretrained(out_dir, safe_serialization=True)

    def load(self, cfg: GPT2ModelConfig, info: DataInfo, path: Path) -> nn.Module:
        if getattr(cfg, "impl", "native") == "hf":
            return hf_from_pretrained(Path(path), "model")
        return load_hf(Path(path))


def hf_from_pretrained(path: Path, key: str) -> nn.Module:
    """transformers' GPT2LMHeadModel from a local dir: its own code only (never a dir's), weights through
    safetensors or weights_only; whatever it cannot read is one line."""
    from transformers import GPT2LMHeadModel

    from llmtrain.models.hf import prepare

    try:
        model = GPT2LMHeadModel.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # transformers' errors for a dir it cannot load (garbled, unsafe, misshapen)
        from llmtrain.safeio import culprit

        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            why = f"its pickle names {culprit(e)}, which could run code when loaded; it is refused"
        raise ConfigError(key, f"cannot load {path}: {why}") from None
    return prepare(model)  # the loss inside its forward (models/hf.py)


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool, True where query i may attend key j: j <= i within the same example (doc_ids [B, T])."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]) & causal

