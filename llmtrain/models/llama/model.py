"""Llama-style decoders in plain PyTorch: RMSNorm, rotary positions (default, linear and llama3 scaling), grouped
KV heads through `scaled_dot_product_attention`, a SwiGLU MLP, a tied or untied head, and the variants of the
same block that Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm per head) and Mistral (sliding-window attention) use.

Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`, ...), so a
`LlamaForCausalLM` / `Qwen2ForCausalLM` / `MistralForCausalLM` / `Qwen3ForCausalLM` state dict loads as it is
(convert.py). The loss never holds the fp32 logits over the vocabulary (gpt2_native.linear_cross_entropy).

`Llama` meets the causal-LM protocol (models/protocol.py): `allocate_cache` gives a `LlamaCache` of
[n_layer, 2, B, n_kv_head, L, head_dim], and `logits` runs new tokens against it with the blocks as plain
functions (`lean_ops`) where it can; a sliding window narrows the attended slots in decoding too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.models import dropout as masks
from llmtrain.models.gpt2_native import linear_cross_entropy
from llmtrain.models.protocol import Cache, attention_mask

ROPE_TYPES = ("default", "linear", "llama3")
KVUpdate = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # new k, v → cached k, v
Op = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LlamaDims:
    """The shape of a Llama-style model: what a checkpoint must match (names as in Hugging Face's config.json)."""

    vocab_size: int
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_positions: int = 8192  # llama3
    tie_word_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2; Llama's and Qwen3's attention_bias (with o_bias)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before the rotation
    sliding_window: int | None = None  # keys within the last `sliding_window` slots of each query
    window_layers: tuple[int, ...] = ()  # the layers that use it
    dropout: float = 0.0  # on the attention's and the MLP's outputs (llmtrain's; transformers' models have none)
    model_type: str = "llama"  # llama | qwen2 | mistral | qwen3: the Hugging Face architecture it exports as

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: full causal attention)."""
        return self.sliding_window if layer in self.window_layers else None

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6·N + 12·Σ_layers keys·(n_head·head_dim), N = every
        parameter a token multiplies (the head once; an untied input embedding is a lookup), keys = seq_len, or
        the window where it is shorter (the PaLM appendix's count, with grouped KV heads and a SwiGLU MLP)."""
        c, hd, nh, kv, inner = (self.hidden_size, self.head_dim, self.num_attention_heads, self.num_key_value_heads,
                                self.intermediate_size)
        attn = 2 * c * nh * hd + 2 * c * kv * hd + (nh + 2 * kv) * hd * self.qkv_bias + c * self.o_bias
        mlp = 3 * c * inner + (2 * inner + c) * self.mlp_bias
        norms = 2 * c + 2 * hd * self.qk_norm
        n = self.num_hidden_layers * (attn + mlp + norms) + c + self.vocab_size * c
        keys = sum(min(seq_len, self.window(i) or seq_len) for i in range(self.num_hidden_layers))
        return 6 * n + 12 * keys * nh * hd


# rotary positions ---------------------------------------------------------------------------------------
def rope_fields(rope_type: str, factor: float = 1.0, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                original_max_positions: int = 8192) -> dict[str, Any]:
    """LlamaDims' RoPE fields, those the type does not use at their defaults (equal models, equal dims)."""
    llama3 = rope_type == "llama3"
    return {"rope_type": rope_type, "rope_factor": float(factor) if rope_type != "default" else 1.0,
            "rope_low_freq_factor": float(low_freq_factor) if llama3 else 1.0,
            "rope_high_freq_factor": float(high_freq_factor) if llama3 else 4.0,
            "rope_original_max_positions": int(original_max_positions) if llama3 else 8192}


def rope_inv_freq(d: LlamaDims, device: torch.device | None = None) -> torch.Tensor:
    """The rotation frequencies [head_dim / 2] (fp32), as transformers' rope init computes them."""
    dim = d.head_dim
    inv = 1.0 / (d.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    if d.rope_type == "linear":
        return inv / d.rope_factor
    if d.rope_type == "llama3":
        low_wavelen = d.rope_original_max_positions / d.rope_low_freq_factor
        high_wavelen = d.rope_original_max_positions / d.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / d.rope_factor, inv)  # long waves: slowed down
        smooth = (d.rope_original_max_positions / wavelen - d.rope_low_freq_factor) / (
            d.rope_high_freq_factor - d.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / d.rope_factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(d: LlamaDims, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B | 1, 1, T, head_dim] (fp32) of positions [B, T] or [T]."""
    inv = rope_inv_freq(d, positions.device)
    freqs = positions[..., None].float() * inv  # [(B,) T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    if emb.dim() == 2:
        emb = emb[None]
    return emb.cos()[:, None], emb.sin()[:, None]


def rope_table(d: LlamaDims, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim] (fp32) of positions 0 .. length - 1: rope_cos_sin's values, looked up by
    position when decoding (the same products, so the same bits)."""
    cos, sin = rope_cos_sin(d, torch.arange(length, device=device))
    return cos[0, 0], sin[0, 0]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, nh, T, hd] rotated by pairs (i, i + hd/2), in x's dtype."""
    half = x.shape[-1] // 2
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# blocks -------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight · x / rms(x) over the last dim, normalised in fp32 and cast back before the weight (as HF does)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # the same products without the casts
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class BlockOps(NamedTuple):
    """A block's parameterised operations: its modules (training: every wrapper's hooks, activation
    checkpointing and adapters apply), or plain functions of their weights (decoding)."""

    input_layernorm: Op
    q_proj: Op
    k_proj: Op
    v_proj: Op
    q_norm: Op | None
    k_norm: Op | None
    o_proj: Op
    post_attention_layernorm: Op
    gate_proj: Op
    up_proj: Op
    down_proj: Op
    qkv: Op | None = None  # decoding: q, k and v in one matmul (their weights concatenated)
    gate_up: Op | None = None  # decoding: gate and up in one matmul


class Mask(NamedTuple):
    """One kind of layer's attention rule as SDPA arguments: attn_mask [B | 1, 1, T, S] bool (True: may attend)
    or None, and whether SDPA's own causal mask applies."""

    attn: torch.Tensor | None
    causal: bool


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
    """softmax(q kᵀ/√hd) v with n_kv_head key/value heads for n_head query heads (each group of n_head/n_kv_head
    query heads shares one); q [B, nh, T, hd], k, v [B, nkv, S, hd] → [B, nh, T, hd]."""
    B, nh, T, hd = q.shape
    group = nh // k.shape[1]
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.attn, is_causal=mask.causal)
    if mask.attn is None:  # SDPA repeats the key/value heads itself (flash attention on GPUs)
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask.causal, enable_gqa=True)
    if T == 1:  # one query per row: a group's queries share its key/value head and its mask row
        y = F.scaled_dot_product_attention(q.view(B, k.shape[1], group, hd), k, v, attn_mask=mask.attn)
        return y.view(B, nh, 1, hd)
    k = k.repeat_interleave(group, dim=1)  # [B, nh, S, hd]
    v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.attn)


def block_forward(x: torch.Tensor, ops: BlockOps, d: LlamaDims, cos: torch.Tensor, sin: torch.Tensor, mask: Mask,
                  training: bool = False, kv: KVUpdate | None = None, layer: int = 0) -> torch.Tensor:
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); x [B, T, C].

    `kv` (decoding) appends this step's rotated keys and values ([B, nkv, T, hd] each) to a cache and returns all
    cached ones; `mask` is this layer's rule over them. `layer` tells this block's dropout masks apart."""
    nh, nkv, hd = d.num_attention_heads, d.num_key_value_heads, d.head_dim
    h = ops.input_layernorm(x)
    B, T, _ = h.shape  # (x may be a shard of the sequence: sequence parallelism)
    if ops.qkv is not None and ops.q_norm is None:  # decoding: one matmul, q and k rotated together
        qkv = ops.qkv(h)  # [B, T, (nh + 2·nkv)·hd]
        qk = apply_rope(qkv[..., :(nh + nkv) * hd].view(B, T, nh + nkv, hd).transpose(1, 2), cos, sin)
        q, k = qk.split((nh, nkv), dim=1)  # [B, nh, T, hd], [B, nkv, T, hd]
        v = qkv[..., (nh + nkv) * hd:].view(B, T, nkv, hd).transpose(1, 2)  # [B, nkv, T, hd]
    else:
        if ops.qkv is not None:
            q, k, v = ops.qkv(h).split((nh * hd, nkv * hd, nkv * hd), dim=-1)
        else:
            q, k, v = ops.q_proj(h), ops.k_proj(h), ops.v_proj(h)
        nh, nkv = q.shape[-1] // hd, k.shape[-1] // hd  # the heads the projections returned (a share of them
        # when they are split over ranks: tensor parallelism)
        q, k = q.view(B, T, nh, hd), k.view(B, T, nkv, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # [B, nkv, T, hd]
        if ops.q_norm is not None and ops.k_norm is not None:
            q, k = ops.q_norm(q), ops.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, nh, T, hd]
        k = apply_rope(k.transpose(1, 2), cos, sin)  # [B, nkv, T, hd]
    if kv is not None:
        k, v = kv(k, v)  # [B, nkv, S, hd]
    y = attend(q, k, v, mask)
    p = d.dropout if training else 0.0
    x = x + masks.dropout(ops.o_proj(y.transpose(1, 2).reshape(B, T, nh * hd)), p, training, 4 * layer + 2)
    h = ops.post_attention_layernorm(x)
    if ops.gate_up is not None:
        gate, up = ops.gate_up(h).chunk(2, dim=-1)
    else:
        gate, up = ops.gate_proj(h), ops.up_proj(h)
    h = ops.down_proj(F.silu(gate) * up)
    return x + masks.dropout(h, p, training, 4 * layer + 3)


class Attention(nn.Module):
    """The attention's projections (and Qwen3's per-head q/k norms); see block_forward."""

    def __init__(self, d: LlamaDims) -> None:
        super().__init__()
        c, hd = d.hidden_size, d.head_dim
        self.q_proj = nn.Linear(c, d.num_attention_heads * hd, bias=d.qkv_bias)
        self.k_proj = nn.Linear(c, d.num_key_value_heads * hd, bias=d.qkv_bias)
        self.v_proj = nn.Linear(c, d.num_key_value_heads * hd, bias=d.qkv_bias)
        self.o_proj = nn.Linear(d.num_attention_heads * hd, c, bias=d.o_bias)
        if d.qk_norm:
            self.q_norm = RMSNorm(hd, d.rms_norm_eps)
            self.k_norm = RMSNorm(hd, d.rms_norm_eps)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, d: LlamaDims) -> None:
        super().__init__()
        c, inner = d.hidden_size, d.intermediate_size
        self.gate_proj = nn.Linear(c, inner, bias=d.mlp_bias)
        self.up_proj = nn.Linear(c, inner, bias=d.mlp_bias)
        self.down_proj = nn.Linear(inner, c, bias=d.mlp_bias)


class DecoderLayer(nn.Module):
    """One transformer block (the unit FSDP shards and activation checkpointing wraps)."""

    def __init__(self, d: LlamaDims, index: int = 0) -> None:
        super().__init__()
        self.dims, self.index = d, index
        self.input_layernorm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        self.self_attn = Attention(d)
        self.post_attention_layernorm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        self.mlp = MLP(d)

    def ops(self) -> BlockOps:
        a, m = self.self_attn, self.mlp
        return BlockOps(self.input_layernorm, a.q_proj, a.k_proj, a.v_proj, getattr(a, "q_norm", None),
                        getattr(a, "k_norm", None), a.o_proj, self.post_attention_layernorm, m.gate_proj, m.up_proj,
                        m.down_proj)

    def lean_ops(self) -> BlockOps | None:
        """The same operations as functions of the current weights; None when one is not a plain nn.Linear /
        RMSNorm (an adapter or another wrapper must run as a module)."""
        mods = self.ops()
        if not all(m is None or type(m) in (nn.Linear, RMSNorm) for m in mods):
            return None
        lean = BlockOps(*(None if m is None else
                          functools.partial(rms_norm, weight=m.weight, eps=m.eps) if isinstance(m, RMSNorm)
                          else functools.partial(F.linear, weight=m.weight, bias=m.bias) for m in mods[:11]))
        a, m = self.self_attn, self.mlp
        return lean._replace(qkv=_fused(a.q_proj, a.k_proj, a.v_proj), gate_up=_fused(m.gate_proj, m.up_proj))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full: Mask, window: Mask,
                kv: KVUpdate | None = None) -> torch.Tensor:
        mask = window if self.dims.window(self.index) is not None else full
        return block_forward(x, self.ops(), self.dims, cos, sin, mask, self.training, kv, self.index)


def _fused(*layers: nn.Linear) -> Op:
    """One linear op computing `layers`' outputs side by side (a copy of their weights: decoding only)."""
    weight = torch.cat([m.weight.detach() for m in layers])
    bias = None if layers[0].bias is None else torch.cat([m.bias.detach() for m in layers])
    return functools.partial(F.linear, weight=weight, bias=bias)


class Trunk(nn.Module):
    """Embedding, blocks and the final norm (`model.*` in Hugging Face's names)."""

    def __init__(self, d: LlamaDims) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(d.vocab_size, d.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(d, i) for i in range(d.num_hidden_layers))
        self.norm = RMSNorm(d.hidden_size, d.rms_norm_eps)


class Head(nn.Module):
    """The output projection [V, C] (tied: the token embedding's Parameter); computes the loss itself, so that
    every strategy's forward hooks (FSDP unshard, ZeRO-3 gather) see the weight in use."""

    def __init__(self, d: LlamaDims, embedding: nn.Embedding) -> None:
        super().__init__()
        self.weight = embedding.weight if d.tie_word_embeddings else nn.Parameter(torch.empty_like(embedding.weight))

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        if labels is None:
            return F.linear(h, self.weight)  # [B, T, V]
        return linear_cross_entropy(h.flatten(0, 1), self.weight, labels.flatten(), self.weight.shape[0])


def window_mask(full: Mask, T: int, S: int, w: int | None, device: torch.device,
                slot: torch.Tensor | None = None) -> Mask:
    """`full` narrowed to keys in the last `w` slots of each query (slots S - T .. S - 1, or `slot`); `full` itself
    when the window covers every slot. A query's own slot stays in (no attention row is empty)."""
    if w is None or w >= S:
        return full
    keys = torch.arange(S, device=device)
    queries = slot if slot is not None else keys[S - T:]  # [T]
    band = (keys[None, :] <= queries[:, None]) & (keys[None, :] > queries[:, None] - w)  # [T, S]
    return Mask(band[None, None] if full.attn is None else full.attn & band, False)


class Llama(nn.Module):
    """A Llama-style causal LM. forward(input_ids, labels) → (loss sum, target count); without labels → logits."""

    def __init__(self, d: LlamaDims, init_std: float = 0.02) -> None:
        super().__init__()
        self.dims = d
        self.model = Trunk(d)
        self.lm_head = Head(d, self.model.embed_tokens)
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) weights (the residual outputs o_proj and down_proj scaled by 1/√(2·n_layer)), zero
        biases, unit norms."""
        std = self.init_std
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                s = std / math.sqrt(2 * self.dims.num_hidden_layers) if name.endswith(("o_proj", "down_proj")) else std
                nn.init.normal_(m.weight, 0.0, s)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        if not self.dims.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, std)

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               kv: list[KVUpdate] | None = None, full: Mask = Mask(None, True), window: Mask | None = None,
               lean: list[BlockOps] | None = None,
               rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states [B, T, C]. `full` / `window`: the rules of full-attention and sliding-window layers
        (window None: derived from `full` for a whole sequence); `lean` (eval only): the blocks as functions;
        `rope` (decoding): rope_table's cos, sin, looked up at the positions."""
        T = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)  # [T]
        if window is None:
            window = window_mask(full, T, T, self.dims.sliding_window, input_ids.device)
        if rope is not None:  # [B | 1, 1, T, hd]
            cos, sin = (t[position_ids].view(-1, 1, T, self.dims.head_dim) for t in rope)
        else:
            cos, sin = rope_cos_sin(self.dims, position_ids)
        x = self.model.embed_tokens(input_ids)  # [B, T, C]
        for i, block in enumerate(self.model.layers):
            kv_i = kv[i] if kv is not None else None
            if lean is not None:
                mask = window if self.dims.window(i) is not None else full
                x = block_forward(x, lean[i], self.dims, cos, sin, mask, False, kv_i, i)
            else:
                x = block(x, cos, sin, full, window, kv_i)
        return self.model.norm(x)

    def lean_ops(self) -> list[BlockOps] | None:
        """Every block's lean_ops() (None when any block needs its modules: adapters, wrappers)."""
        ops = [b.lean_ops() if isinstance(b, DecoderLayer) else None for b in self.model.layers]
        return None if any(o is None for o in ops) else ops

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> Any:
        """Training and scoring: `attn_mask` [B, 1, T, T] bool (packed examples) replaces the causal rule."""
        full = Mask(attn_mask, attn_mask is None)
        return self.lm_head(self.hidden(input_ids, position_ids, full=full), labels)

    # the causal-LM protocol (models/protocol.py) ----------------------------------------------------------
    @property
    def max_positions(self) -> int:
        return self.dims.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self.dims.vocab_size

    def allocate_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device,
                       static: bool = False) -> LlamaCache:
        return LlamaCache(self.dims, batch, length, dtype, torch.device(device), static, self.lean_ops())

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: Cache | None = None,
               mask: torch.Tensor | None = None, *, static: bool = False, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (last_only: [B, 1, V]) of input_ids [B, T] at positions [B, T]; see the protocol."""
        T, dev = input_ids.shape[1], input_ids.device
        kv, lean, rope = None, None, None
        if cache is not None:
            assert isinstance(cache, LlamaCache), type(cache)
            kv = cache.static_writers if static else cache.writers
            lean = cache.ops if not self.training else None
            rope = cache.rope
        S = T if cache is None else cache.length if static else cache.pos + T
        if positions is None and cache is not None and not static and cache.pos:  # the slots' own positions
            positions = torch.arange(cache.pos, S, device=dev)  # [T]
        slot = cache.slot if static and cache is not None else None
        full = Mask(*attention_mask(mask, T, S, dev, slot))
        window = window_mask(full, T, S, self.dims.sliding_window, dev, slot)
        h = self.hidden(input_ids, positions, kv, full, window, lean, rope)  # [B, T, C]
        if cache is not None and not static:
            cache.pos = S
        return self.lm_head(h[:, -1:] if last_only else h)

    def nll(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(input_ids, labels=labels)  # the chunked loss: never the whole fp32 logits


class LlamaCache(Cache):
    """Rotated keys and values of every layer, [n_layer, 2, B, n_kv_head, L, head_dim], written in place, and
    the block operations decoding runs (lean_ops() when every block allows it, else None: the modules).

    `writers[i]` append layer i's chunk at `pos` and return its keys/values up to it; `static_writers[i]` write
    one token at the tensor `slot` and return the whole cache (compiled decoding: one graph)."""

    def __init__(self, d: LlamaDims, batch: int, length: int, dtype: torch.dtype, device: torch.device,
                 static: bool = False, ops: list[BlockOps] | None = None) -> None:
        super().__init__(length, device, static)
        shape = (d.num_hidden_layers, 2, batch, d.num_key_value_heads, length, d.head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.ops = ops
        self.rope = rope_table(d, length, device)  # positions never reach the cache's length
        layers = self.kv.unbind(0)
        self.writers = [functools.partial(self._write, layer) for layer in layers]
        self.static_writers = [functools.partial(self._write_at_slot, layer) for layer in layers]
        if static and device.type == "cuda":  # in-place updates inside CUDA graphs
            torch._dynamo.mark_static_address(self.kv)

    def _write(self, layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.pos, k.shape[2]  # layer [2, B, nkv, L, hd], k, v [B, nkv, T, hd]
        layer.narrow(3, s, t).copy_(torch.stack((k, v)))
        keys, values = layer.narrow(3, 0, s + t).unbind(0)
        return keys, values

    def _write_at_slot(self, layer: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer.index_copy_(3, self.slot, torch.stack((k, v)).to(layer.dtype))  # [2, B, nkv, 1, hd]
        keys, values = layer.unbind(0)
        return keys, values
