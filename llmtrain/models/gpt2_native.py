"""GPT-2 in plain PyTorch: fused QKV, `scaled_dot_product_attention`, tied embeddings, a vocabulary padded
to a multiple of 64, a loss that never holds the full fp32 logits, and a KV-cache path for decoding.

Parameter names follow Hugging Face's `GPT2LMHeadModel` (`transformer.h.0.attn.c_attn.weight`, …) so that
checkpoints read like HF ones; the four projection weights per block are `nn.Linear` ([out, in]), where
HF's `Conv1D` stores [in, out]. `to_hf_state` / `from_hf_state` convert the weights, `from_hf` makes a native
model of a Hugging Face GPT-2 (the one conversion training, export and generation use), and `save_hf` /
`load_hf` write and read the Hugging Face directory format (config.json + model.safetensors) without importing
transformers, so an export loads with `GPT2LMHeadModel.from_pretrained`.

`GPT2` meets the causal-LM protocol (models/protocol.py): `allocate_cache` gives a `GPT2Cache`, and `logits`
runs new tokens against it with the blocks as plain functions (`lean_ops`) where it can.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.datainfo import IGNORE_INDEX
from llmtrain.models import dropout as masks
from llmtrain.models.protocol import Cache, attention_mask

VOCAB_MULTIPLE = 64  # matmul-friendly vocabulary size (50257 → 50304)
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
KVUpdate = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # new [2, B, nh, T, hd] → cached k, v


@dataclass(frozen=True)
class GPT2Dims:
    """The shape of a GPT-2: what a checkpoint must match."""

    vocab_size: int
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    eos_token_id: int | None = None

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6·N + 12·L·T·C, N = every parameter but the
        position embeddings (the tied token embedding counts once, as the output projection), as in the
        PaLM paper's appendix and nanoGPT's MFU; GPT-2 124M at T=1024: 0.855 GFLOP."""
        c, L = self.n_embd, self.n_layer
        n = L * (12 * c * c + 13 * c) + 2 * c + self.padded_vocab * c
        return 6 * n + 12 * L * seq_len * c


Op = Callable[[torch.Tensor], torch.Tensor]


class BlockOps(NamedTuple):
    """A block's parameterised operations: its modules (training: every wrapper's hooks, activation
    checkpointing and adapters apply), or plain functions of their weights (decoding: no module dispatch,
    which costs more than the math for a token at a time)."""

    ln_1: Op
    c_attn: Op
    attn_proj: Op
    ln_2: Op
    c_fc: Op
    mlp_proj: Op


def block_forward(x: torch.Tensor, ops: BlockOps, n_head: int, dropout: float, training: bool,
                  kv: KVUpdate | None = None, attn_mask: torch.Tensor | None = None,
                  causal: bool = True, layer: int = 0) -> torch.Tensor:
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); x [B, T, C].

    Training: causal attention over x. Decoding: `kv` appends this step's keys/values ([2, B, nh, T, hd]) to a
    cache and returns all cached ones; then `attn_mask` ([B, 1, T, L] bool, True: may attend) or, without
    one, `causal` (queries and cached keys aligned at the start) or no mask (every cached key visible).
    `layer` tells this block's dropout masks from the others' (models/dropout.py)."""
    h = ops.ln_1(x)
    B, T, C = h.shape  # (x may be a shard of the sequence: sequence parallelism)
    hd = C // n_head
    # nh: the heads c_attn returns (all n_head, or a share of them when its output features are split)
    qkv = ops.c_attn(h).view(B, T, 3, -1, hd).permute(2, 0, 3, 1, 4)  # [3, B, nh, T, hd]
    q, k, v = qkv.unbind(0)
    if kv is not None:
        k, v = kv(qkv[1:])  # [B, nh, L, hd] each
    p = dropout if training else 0.0
    if p > 0 and masks.active():  # the attention's dropout from batch-split-independent masks: unfused
        y = _attention_with_dropout(q, k, v, attn_mask, causal and attn_mask is None, p, 4 * layer + 1)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p,
                                           is_causal=causal and attn_mask is None)
    x = x + masks.dropout(ops.attn_proj(y.transpose(1, 2).reshape(B, T, -1)), dropout, training, 4 * layer + 2)
    h = ops.mlp_proj(F.gelu(ops.c_fc(ops.ln_2(x)), approximate="tanh"))  # GPT-2's "gelu_new"
    return x + masks.dropout(h, dropout, training, 4 * layer + 3)


EMBEDDING_SITE = 0x7FFFFFFF  # the embeddings' dropout site (blocks use 4·layer + 1..3)


def _attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                            causal: bool, p: float, site: int) -> torch.Tensor:
    """softmax(q kᵀ/√hd, masked) with dropout on the probabilities, then · v; q [B, nh, T, hd], k, v [B, nh, S, hd]."""
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, nh, T, S]
    if causal:
        T, S = att.shape[-2:]
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if attn_mask is not None:
        att = att.masked_fill(~attn_mask, float("-inf"))
    return masks.dropout(att.softmax(dim=-1), p, True, site) @ v


class Attention(nn.Module):
    """The attention's projections: fused QKV (`c_attn`) and output (`c_proj`); see block_forward."""

    def __init__(self, d: GPT2Dims) -> None:
        super().__init__()
        self.c_attn = nn.Linear(d.n_embd, 3 * d.n_embd)
        self.c_proj = nn.Linear(d.n_embd, d.n_embd)


class MLP(nn.Module):
    """The MLP's projections: C → 4C (`c_fc`) → C (`c_proj`); see block_forward."""

    def __init__(self, d: GPT2Dims) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d.n_embd, 4 * d.n_embd)
        self.c_proj = nn.Linear(4 * d.n_embd, d.n_embd)


class Block(nn.Module):
    """One transformer block (the unit FSDP shards and activation checkpointing wraps)."""

    def __init__(self, d: GPT2Dims, index: int = 0) -> None:
        super().__init__()
        self.n_head, self.dropout, self.index = d.n_head, d.dropout, index
        self.ln_1 = nn.LayerNorm(d.n_embd, eps=d.layer_norm_epsilon)
        self.attn = Attention(d)
        self.ln_2 = nn.LayerNorm(d.n_embd, eps=d.layer_norm_epsilon)
        self.mlp = MLP(d)

    def ops(self) -> BlockOps:
        return BlockOps(self.ln_1, self.attn.c_attn, self.attn.c_proj, self.ln_2, self.mlp.c_fc, self.mlp.c_proj)

    def lean_ops(self) -> BlockOps | None:
        """The same operations as functions of the current weights; None when an op is not a plain
        nn.Linear / nn.LayerNorm (an adapter or another wrapper must run as a module)."""
        mods = self.ops()
        if not all(type(m) in (nn.Linear, nn.LayerNorm) for m in mods):
            return None
        return BlockOps(*(functools.partial(torch.layer_norm, normalized_shape=m.normalized_shape, weight=m.weight,
                                            bias=m.bias, eps=m.eps) if isinstance(m, nn.LayerNorm)
                          else functools.partial(F.linear, weight=m.weight, bias=m.bias) for m in mods))

    def forward(self, x: torch.Tensor, kv: KVUpdate | None = None, attn_mask: torch.Tensor | None = None,
                causal: bool = True) -> torch.Tensor:
        return block_forward(x, self.ops(), self.n_head, self.dropout, self.training, kv, attn_mask, causal,
                             self.index)


class Trunk(nn.Module):
    """Embeddings, blocks and the final norm: token ids [B, T] → hidden states [B, T, C]."""

    def __init__(self, d: GPT2Dims) -> None:
        super().__init__()
        self.wte = nn.Embedding(d.padded_vocab, d.n_embd)
        self.wpe = nn.Embedding(d.n_positions, d.n_embd)
        self.dropout = d.dropout
        self.h = nn.ModuleList(Block(d, i) for i in range(d.n_layer))
        self.ln_f = nn.LayerNorm(d.n_embd, eps=d.layer_norm_epsilon)


class TiedHead(nn.Module):
    """The output projection on the token embedding's weight [V_pad, C]; computes the loss itself, so
    that every strategy's forward hooks (FSDP unshard, ZeRO-3 gather) see the weight in use."""

    def __init__(self, wte: nn.Embedding, vocab_size: int) -> None:
        super().__init__()
        self.weight = wte.weight  # tied: the same Parameter
        self.vocab_size = vocab_size

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        if labels is None:
            return F.linear(h, self.weight)[..., : self.vocab_size]  # [B, T, V]: the padding never sampled
        return linear_cross_entropy(h.flatten(0, 1), self.weight, labels.flatten(), self.vocab_size)


class GPT2(nn.Module):
    """GPT-2 language model. forward(input_ids, labels) → (loss sum, target count); without labels → logits."""

    def __init__(self, d: GPT2Dims) -> None:
        super().__init__()
        self.dims = d
        self.transformer = Trunk(d)
        self.lm_head = TiedHead(self.transformer.wte, d.vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's init: N(0, 0.02), residual projections N(0, 0.02/√(2·n_layer)), zero biases, unit norms."""
        std = 0.02
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                s = std / math.sqrt(2 * self.dims.n_layer) if name.endswith("c_proj") else std
                nn.init.normal_(m.weight, 0.0, s)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():  # padded vocabulary rows: never an input, masked out of every softmax
            self.transformer.wte.weight[self.dims.vocab_size:].zero_()

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               kv: list[KVUpdate] | None = None, attn_mask: torch.Tensor | None = None,
               causal: bool = True, lean: list[BlockOps] | None = None) -> torch.Tensor:
        """Hidden states [B, T, C]; `lean` (from lean_ops(), eval only) runs the blocks as plain functions."""
        t = self.transformer
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)  # [T]
        x = masks.dropout(t.wte(input_ids) + t.wpe(position_ids), t.dropout, self.training, EMBEDDING_SITE)  # [B,T,C]
        for i, block in enumerate(t.h):
            kv_i = kv[i] if kv is not None else None
            if lean is not None:
                x = block_forward(x, lean[i], block.n_head, 0.0, False, kv_i, attn_mask, causal)
            else:
                x = block(x, kv_i, attn_mask, causal)
        return t.ln_f(x)

    def lean_ops(self) -> list[BlockOps] | None:
        """Every block's lean_ops() (None when any block needs its modules: adapters, wrappers)."""
        ops = [b.lean_ops() if isinstance(b, Block) else None for b in self.transformer.h]
        return None if any(o is None for o in ops) else ops

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv: list[KVUpdate] | None = None,
                attn_mask: torch.Tensor | None = None, causal: bool = True) -> Any:
        return self.lm_head(self.hidden(input_ids, position_ids, kv, attn_mask, causal), labels)

    # the causal-LM protocol (models/protocol.py) ----------------------------------------------------------
    @property
    def max_positions(self) -> int:
        return self.dims.n_positions

    @property
    def vocab_size(self) -> int:
        return self.dims.vocab_size

    def allocate_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device,
                       static: bool = False) -> GPT2Cache:
        return GPT2Cache(self.dims, batch, length, dtype, torch.device(device), static, self.lean_ops())

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: Cache | None = None,
               mask: torch.Tensor | None = None, *, static: bool = False, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (last_only: [B, 1, V]) of input_ids [B, T] at positions [B, T]; see the protocol."""
        T = input_ids.shape[1]
        kv, lean = None, None
        if cache is not None:
            assert isinstance(cache, GPT2Cache), type(cache)
            kv = cache.static_writers if static else cache.writers
            lean = cache.ops if not self.training else None
        S = T if cache is None else cache.length if static else cache.pos + T
        if positions is None and cache is not None and not static and cache.pos:  # the slots' own positions
            positions = torch.arange(cache.pos, S, device=input_ids.device)  # [T]
        attn, causal = attention_mask(mask, T, S, input_ids.device, cache.slot if static else None)
        h = self.hidden(input_ids, positions, kv, attn, causal, lean)  # [B, T, C]
        if cache is not None and not static:
            cache.pos = S
        return self.lm_head(h[:, -1:] if last_only else h)

    def nll(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(input_ids, labels=labels)  # the chunked loss: never the whole fp32 logits


class GPT2Cache(Cache):
    """Keys and values of every layer, [n_layer, 2, B, n_head, L, head_dim], written in place, and the block
    operations decoding runs (lean_ops() when every block allows it, else None: the blocks' modules).

    `writers[i]` append layer i's chunk at `pos` and return its keys/values up to it (eager: attention spans
    only the filled part); `static_writers[i]` write one token at the tensor `slot` and return the whole cache,
    so that every step has the same shapes (compiled decoding: one graph, CUDA graphs on GPU)."""

    def __init__(self, d: GPT2Dims, batch: int, length: int, dtype: torch.dtype, device: torch.device,
                 static: bool = False, ops: list[BlockOps] | None = None) -> None:
        super().__init__(length, device, static)
        shape = (d.n_layer, 2, batch, d.n_head, length, d.n_embd // d.n_head)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.ops = ops
        layers = self.kv.unbind(0)
        self.writers = [functools.partial(self._write, layer) for layer in layers]
        self.static_writers = [functools.partial(self._write_at_slot, layer) for layer in layers]
        if static and device.type == "cuda":  # in-place updates inside CUDA graphs
            torch._dynamo.mark_static_address(self.kv)

    def _write(self, layer: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.pos, kv.shape[3]  # layer [2, B, nh, L, hd], kv [2, B, nh, T, hd]: one copy for both
        layer.narrow(3, s, t).copy_(kv)
        k, v = layer.narrow(3, 0, s + t).unbind(0)
        return k, v

    def _write_at_slot(self, layer: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer.index_copy_(3, self.slot, kv)  # kv [2, B, nh, 1, hd]
        k, v = layer.unbind(0)
        return k, v


# loss ---------------------------------------------------------------------------------------------------
CHUNK_ELEMENTS = 1 << 28  # logits made at once by the loss (~1 GiB in fp32)


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)  # ~1 GiB of fp32 logits per chunk at most


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(h @ wᵀ, labels), computed chunk by chunk with the gradients in the same pass.

    Each chunk's fp32 logits live only inside the loop: the softmax minus the one-hot target *is* the
    gradient of the logits, so grad_h and grad_w are accumulated right there and scaled in backward.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, vocab: int) -> torch.Tensor:
        dev = h.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(dev, enabled=False):
            hc_all, wc = h.to(dtype), w.to(dtype)  # [N, C], [Vp, C] in the compute dtype
            grad_h = torch.empty_like(hc_all) if want_h else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            rows = _chunk_rows(w.shape[0])
            for s in range(0, h.shape[0], rows):
                hc, lab = hc_all[s:s + rows], labels[s:s + rows]
                logits = (hc @ wc.T).float()  # [n, Vp]
                if w.shape[0] > vocab:
                    logits[:, vocab:] = float("-inf")
                lse = torch.logsumexp(logits, dim=-1)  # [n]
                valid = lab != IGNORE_INDEX
                tgt = lab.clamp(min=0)
                total += ((lse - logits.gather(1, tgt[:, None]).squeeze(1)) * valid).sum()
                if want_h or want_w:
                    g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                    g[torch.arange(len(tgt), device=g.device), tgt] -= 1.0
                    g = (g * valid[:, None]).to(dtype)  # [n, Vp]: d(loss)/d(logits)
                    if want_h:
                        grad_h[s:s + rows] = g @ wc
                    if want_w:
                        grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h if want_h else None, grad_w if want_w else None)
        ctx.dtypes = (h.dtype, w.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        return *precomputed_grads(ctx, grad_out), None, None


def precomputed_grads(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward of a loss whose forward formed its inputs' gradients (ctx: saved grad_h, grad_w and their
    inputs' dtypes): those gradients scaled by the loss's incoming gradient."""
    grad_h, grad_w = ctx.saved_tensors
    gh = (grad_h * grad_out).to(ctx.dtypes[0]) if grad_h is not None else None
    gw = (grad_w * grad_out).to(ctx.dtypes[1]) if grad_w is not None else None
    return gh, gw


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                         vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE over rows with a target, number of such rows) for hidden h [N, C], weight w [Vp, C],
    labels [N] (IGNORE_INDEX: no target); columns ≥ vocab are padding and never win.

    Under torch.compile, when the logits fit one chunk, the plain cross-entropy of h·wᵀ: inductor fuses it into
    the logits' consumers (their fp32 copy is never made) and it runs faster than the chunked function; otherwise
    (and eagerly) chunk by chunk with the gradients in the same pass: at most one chunk of fp32 logits, none kept
    for the backward."""
    count = (labels != IGNORE_INDEX).sum()
    if torch.compiler.is_compiling() and h.shape[0] * w.shape[0] <= CHUNK_ELEMENTS:
        logits = F.linear(h, w[:vocab])  # [N, V]
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum"), count
    return _LinearCrossEntropy.apply(h, w, labels, vocab), count


# Hugging Face format ------------------------------------------------------------------------------------
def to_hf_state(state: dict[str, torch.Tensor], vocab: int) -> dict[str, torch.Tensor]:
    """Our state dict → GPT2LMHeadModel's (Conv1D layout, unpadded vocabulary, tied head left out)."""
    out = {}
    for k, v in state.items():
        if k == "lm_head.weight":
            continue
        if k.endswith(_CONV1D):
            v = v.t()
        elif k == "transformer.wte.weight":
            v = v[:vocab]
        out[k] = v.detach().contiguous()
    return out


def from_hf_state(state: dict[str, torch.Tensor], d: GPT2Dims) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict (with or without the `transformer.` prefix) → ours."""
    out = {}
    for k, v in state.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers; the head is tied to wte
        k = k if k.startswith("transformer.") else f"transformer.{k}"
        if k.endswith(_CONV1D):
            v = v.t()
        elif k == "transformer.wte.weight" and v.shape[0] < d.padded_vocab:
            v = torch.cat([v, v.new_zeros(d.padded_vocab - v.shape[0], v.shape[1])])
        out[k] = v.contiguous()
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def hf_config(d: GPT2Dims) -> dict[str, Any]:
    """config.json of the equivalent GPT2LMHeadModel."""
    eos = d.eos_token_id if d.eos_token_id is not None else d.vocab_size - 1
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": d.vocab_size,
            "n_positions": d.n_positions, "n_ctx": d.n_positions, "n_embd": d.n_embd, "n_layer": d.n_layer,
            "n_head": d.n_head, "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": d.dropout,
            "embd_pdrop": d.dropout, "attn_pdrop": d.dropout, "layer_norm_epsilon": d.layer_norm_epsilon,
            "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True, "bos_token_id": eos,
            "eos_token_id": eos, "tie_word_embeddings": True, "torch_dtype": "float32"}


def dims_from_hf_config(cfg: dict[str, Any]) -> GPT2Dims:
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"model_type {cfg.get('model_type')!r} is not gpt2")
    if cfg.get("n_inner") not in (None, 4 * cfg["n_embd"]) or cfg.get("activation_function", "gelu_new") not in (
            "gelu_new", "gelu_pytorch_tanh"):
        raise ValueError("only the standard GPT-2 block (4x MLP, gelu_new) is supported natively; use model.impl=hf")
    return GPT2Dims(vocab_size=cfg["vocab_size"], n_positions=cfg["n_positions"], n_embd=cfg["n_embd"],
                    n_layer=cfg["n_layer"], n_head=cfg["n_head"], dropout=cfg.get("resid_pdrop", 0.0),
                    layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5), eos_token_id=cfg.get("eos_token_id"))


def save_hf(model: GPT2, out_dir: Path) -> None:
    """Write config.json + model.safetensors in the Hugging Face GPT-2 format."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.to("cpu") for k, v in to_hf_state(model.state_dict(), model.dims.vocab_size).items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(model.dims), indent=2) + "\n")


def read_hf_state(path: Path) -> dict[str, torch.Tensor]:
    """Weights of a Hugging Face model dir: model.safetensors, or else pytorch_model.bin (tensors only, through
    safeio.load_torch: a pickle naming anything else is refused with UnsafeFile)."""
    from llmtrain.safeio import UnsafeFile, load_torch

    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(path / "model.safetensors"))
        except Exception as e:  # safetensors' own error: a truncated or garbled file
            raise UnsafeFile(f"{path / 'model.safetensors'} cannot be read: {str(e).splitlines()[0][:200]}") from None
    if (path / "pytorch_model.bin").is_file():
        return load_torch(path / "pytorch_model.bin")
    raise FileNotFoundError(f"{path} holds no model.safetensors or pytorch_model.bin")


def load_hf(path: Path, dropout: float | None = None) -> GPT2:
    """A GPT2 from a Hugging Face GPT-2 dir (ours or transformers'). ValueError, KeyError or FileNotFoundError
    when it is not one; UnsafeFile (a ConfigError) when its weights cannot be read safely."""
    cfg = json.loads((path / "config.json").read_text())
    if not isinstance(cfg, dict):
        raise ValueError("config.json holds no JSON object")
    dims_from_hf_config(cfg)  # a config we cannot run is refused before its weights are read
    return from_hf(cfg, read_hf_state(path), dropout)


def from_hf(cfg: dict[str, Any], state: dict[str, torch.Tensor], dropout: float | None = None) -> GPT2:
    """A native GPT2 of a Hugging Face GPT-2: its config (config.json's dict, or `model.config.to_dict()`) and
    GPT2LMHeadModel's state dict. The tensors are used as they are where the layouts agree (no copy, on their
    device). ValueError or KeyError when they are not a GPT-2 we can run natively."""
    d = dims_from_hf_config(cfg)
    if dropout is not None:
        d = GPT2Dims(**{**d.__dict__, "dropout": dropout})
    with torch.device("meta"):
        model = GPT2(d)
    try:
        model.load_state_dict(from_hf_state(state, d), assign=True)
    except (RuntimeError, AttributeError) as e:  # missing or misshapen tensors, a non-tensor value
        raise ValueError(f"its weights do not fit its config.json ({str(e).splitlines()[0][:200]})") from None
    model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the tied Parameter
    return model
