"""The Hugging Face directory format of the Llama family, read and written without transformers: config.json of
`LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM` or `Qwen3ForCausalLM`, and its weights as
`model.safetensors`, shards with `model.safetensors.index.json`, or `pytorch_model*.bin` (tensors only, through
safeio.load_torch). The parameter names are the native model's, so the weights load as they are; an export
past `MAX_SHARD_BYTES` is sharded with an index, as `save_pretrained` writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmtrain.models.llama.model import ROPE_TYPES, Llama, LlamaDims, rope_fields

MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
MAX_SHARD_BYTES = 5 * 1024**3  # transformers' former default max_shard_size ("5GB")
KEPT_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")  # carried from a source config
SAFE_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"


class NotLlama(ValueError):
    """A config.json this family does not read (another architecture, or a variant it does not implement)."""


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """The rotary settings of a config.json: transformers 5's `rope_parameters`, or the older `rope_theta` +
    `rope_scaling`."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise NotLlama("per-layer RoPE parameters are not read natively")
    rope = dict(params) if isinstance(params, dict) else {}
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict):
        rope = {**scaling, **rope}
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type")) or "default"
    return rope


def dims_from_hf_config(cfg: dict[str, Any], dropout: float = 0.0) -> LlamaDims:
    """The dims of a Llama / Qwen2 / Mistral / Qwen3 config.json; NotLlama for one this family cannot run."""
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise NotLlama(f"model_type {model_type!r} is not one the llama family reads ({', '.join(MODEL_TYPES)})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise NotLlama(f"hidden_act {cfg.get('hidden_act')!r} is not implemented natively (silu is)")
    if cfg.get("quantization_config"):
        raise NotLlama("quantized checkpoints are not read natively")
    rope = _rope(cfg)
    if rope["rope_type"] not in ROPE_TYPES:
        raise NotLlama(f"RoPE type {rope['rope_type']!r} is not implemented natively ({', '.join(ROPE_TYPES)} are)")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise NotLlama("partial rotary embeddings are not implemented natively")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    layers = int(cfg["num_hidden_layers"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % kv:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} is odd; the rotary embedding needs an even one")
    window, window_layers = _sliding_window(cfg, model_type, layers)
    bias = bool(cfg.get("attention_bias", False))
    return LlamaDims(
        vocab_size=int(cfg["vocab_size"]), hidden_size=hidden, intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(rope["rope_theta"]),
        **rope_fields(rope["rope_type"], rope.get("factor", 1.0), rope.get("low_freq_factor", 1.0),
                      rope.get("high_freq_factor", 4.0),
                      rope.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 8192)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or (bias and model_type != "mistral"),
        o_bias=bias and model_type in ("llama", "qwen3"),
        mlp_bias=bool(cfg.get("mlp_bias", False)) and model_type == "llama",
        qk_norm=model_type == "qwen3", sliding_window=window, window_layers=window_layers, dropout=dropout,
        model_type=model_type)


def _sliding_window(cfg: dict[str, Any], model_type: str, layers: int) -> tuple[int | None, tuple[int, ...]]:
    """(window, the layers that use it) as transformers reads them: Mistral's on every layer; Qwen2's and
    Qwen3's only with use_sliding_window, on the `layer_types` marked sliding (else layers ≥ max_window_layers)."""
    window = cfg.get("sliding_window")
    if model_type == "llama" or window is None:
        return None, ()
    if model_type == "mistral":
        return int(window), tuple(range(layers))
    if not cfg.get("use_sliding_window", False):
        return None, ()
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        chosen = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    else:
        chosen = tuple(range(int(cfg.get("max_window_layers", 28)), layers))
    return (int(window), chosen) if chosen else (None, ())


def hf_config(d: LlamaDims, extra: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json of the equivalent `<Arch>ForCausalLM` (both RoPE spellings: transformers 5 and 4 read it)."""
    rope: dict[str, Any] = {"rope_type": d.rope_type}
    if d.rope_type in ("linear", "llama3"):
        rope["factor"] = d.rope_factor
    if d.rope_type == "llama3":
        rope.update(low_freq_factor=d.rope_low_freq_factor, high_freq_factor=d.rope_high_freq_factor,
                    original_max_position_embeddings=d.rope_original_max_positions)
    out: dict[str, Any] = {k: v for k, v in (extra or {}).items() if k in KEPT_KEYS}
    out.update({
        "architectures": [ARCHITECTURES[d.model_type]], "model_type": d.model_type, "vocab_size": d.vocab_size,
        "hidden_size": d.hidden_size, "intermediate_size": d.intermediate_size,
        "num_hidden_layers": d.num_hidden_layers, "num_attention_heads": d.num_attention_heads,
        "num_key_value_heads": d.num_key_value_heads, "head_dim": d.head_dim, "hidden_act": "silu",
        "max_position_embeddings": d.max_position_embeddings, "rms_norm_eps": d.rms_norm_eps,
        "rope_theta": d.rope_theta, "rope_scaling": None if d.rope_type == "default" else rope,
        "rope_parameters": {**rope, "rope_theta": d.rope_theta}, "tie_word_embeddings": d.tie_word_embeddings,
        "attention_dropout": 0.0, "use_cache": True, "torch_dtype": str(dtype).removeprefix("torch."),
    })
    if d.model_type in ("llama", "qwen3"):
        out["attention_bias"] = d.o_bias
    if d.model_type == "llama":
        out["mlp_bias"] = d.mlp_bias
    if d.model_type == "mistral":
        out["sliding_window"] = d.sliding_window
    if d.model_type in ("qwen2", "qwen3"):
        layers = d.num_hidden_layers
        window = set(d.window_layers) if d.sliding_window is not None else set()
        first = min(window, default=layers)  # transformers 4 reads max_window_layers, 5 reads layer_types
        out.update(use_sliding_window=bool(window), sliding_window=d.sliding_window,
                   max_window_layers=first if window == set(range(first, layers)) else layers,
                   layer_types=["sliding_attention" if i in window else "full_attention" for i in range(layers)])
    out.setdefault("initializer_range", 0.02)
    return out


# weights -------------------------------------------------------------------------------------------------
def _shard_files(path: Path, index: str) -> list[Path]:
    """The files an index names, each inside `path` (a name reaching outside it is refused)."""
    try:
        weight_map = json.loads((path / index).read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} is not a weight index ({type(e).__name__})") from None
    root = path.resolve()
    files = []
    for name in names:
        f = (path / str(name)).resolve()
        if not isinstance(name, str) or f.parent != root:
            raise ValueError(f"{index} names {str(name)[:80]!r}, which is not a file of the model dir")
        if not f.is_file():
            raise FileNotFoundError(f"{index} names {name}, which is missing")
        files.append(f)
    return files


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from llmtrain.safeio import UnsafeFile

    try:
        return load_file(str(file))
    except Exception as e:  # safetensors' own error: a truncated or garbled file
        raise UnsafeFile(f"{file} cannot be read: {str(e).splitlines()[0][:200]}") from None


def read_hf_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model dir: model.safetensors, its shards (index.json), or else
    pytorch_model.bin or its shards (tensors only, through safeio.load_torch: a pickle naming anything else is
    refused with UnsafeFile)."""
    from llmtrain.safeio import load_torch

    if (path / "model.safetensors").is_file():
        return _read_safetensors(path / "model.safetensors")
    if (path / SAFE_INDEX).is_file():
        return {k: v for f in _shard_files(path, SAFE_INDEX) for k, v in _read_safetensors(f).items()}
    if (path / "pytorch_model.bin").is_file():
        return load_torch(path / "pytorch_model.bin")
    if (path / BIN_INDEX).is_file():
        return {k: v for f in _shard_files(path, BIN_INDEX) for k, v in load_torch(f).items()}
    raise FileNotFoundError(f"{path} holds no model.safetensors, {SAFE_INDEX} or pytorch_model.bin")


def from_hf(cfg: dict[str, Any], state: dict[str, torch.Tensor], dropout: float = 0.0,
            dtype: torch.dtype | None = None) -> Llama:
    """A native model of a Hugging Face config (config.json's dict) and its state dict; the tensors are used as
    they are (no copy; `dtype`: cast to it). NotLlama / ValueError when they are not a model we can run."""
    d = dims_from_hf_config(cfg, dropout)
    with torch.device("meta"):
        model = Llama(d)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if d.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        if "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
    if dtype is not None:
        for k in list(state):  # one tensor at a time: the old copy goes as the new one comes
            state[k] = state[k].to(dtype)
    try:
        model.load_state_dict(state, assign=True)
    except (RuntimeError, AttributeError) as e:  # missing or misshapen tensors, a non-tensor value
        raise ValueError(f"its weights do not fit its config.json ({str(e).splitlines()[0][:200]})") from None
    if d.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced the tied Parameter
    model.hf_extra = {k: cfg[k] for k in KEPT_KEYS if k in cfg}
    return model


def read_config(path: Path) -> dict[str, Any]:
    cfg = json.loads((path / "config.json").read_text())
    if not isinstance(cfg, dict):
        raise ValueError("config.json holds no JSON object")
    return cfg


def load_hf(path: Path, dropout: float = 0.0, dtype: torch.dtype | None = None) -> Llama:
    """A native model of a Hugging Face dir (ours or transformers'); its config is checked before its weights
    are read. NotLlama, ValueError, KeyError or FileNotFoundError when it is not one; UnsafeFile (a
    ConfigError) when its weights cannot be read safely."""
    cfg = read_config(path)
    dims_from_hf_config(cfg)
    return from_hf(cfg, read_hf_state(path), dropout, dtype)


def hf_state(model: Llama) -> dict[str, torch.Tensor]:
    """The state dict as transformers saves it: contiguous CPU tensors, the tied head left out."""
    state = model.state_dict()
    if model.dims.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_hf(model: Llama, out_dir: Path, max_shard_bytes: int | None = None) -> None:
    """config.json + model.safetensors, or shards model-0000i-of-0000n.safetensors and their index past
    `max_shard_bytes` (default MAX_SHARD_BYTES), as transformers' save_pretrained writes them."""
    from safetensors.torch import save_file

    limit = max_shard_bytes or MAX_SHARD_BYTES
    out_dir.mkdir(parents=True, exist_ok=True)
    state = hf_state(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    if len(shards) == 1:
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, part in zip(names, shards, strict=True):
            save_file(part, str(out_dir / name), metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": {k: name for name, part in zip(names, shards, strict=True) for k in part}}
        (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    dtype = next(iter(state.values())).dtype
    cfg = hf_config(model.dims, getattr(model, "hf_extra", None), dtype)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
