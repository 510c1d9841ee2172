"""A frozen base in 4 bits for QLoRA (`model.quantize=nf4`, with `model.lora.enabled=true`), through bitsandbytes.

Applied in train.py to the plain model before LoRA and `strategy.setup` (a model transform, like LoRA): every
`nn.Linear` inside the family's blocks becomes a bitsandbytes `Linear4bit` (NF4 or FP4 codes in blocks of 64,
their absmax scales quantised again: QLoRA's double quantisation) computing in the run's precision; the weights
are quantised as the strategy moves the model to its device. The embeddings, norms and output head stay whole, in
the compute dtype (bf16 or fp16 under mixed precision: frozen, they need no fp32 master copy). LoRA then wraps the
4-bit layers; only the adapters (fp32) train.

Checkpoints hold the adapters only (a LoRA run's trainable state): the 4-bit base comes back from the same
pretrained weights, quantised the same way. An export (final/, llmtrain-export) is the function that was
trained: each 4-bit weight dequantised, the adapters merged into it (`dequantized_state`), and the adapter dir.

bitsandbytes is an extra (`pip install 'llmtrain[bnb]'`), imported only when `model.quantize` is set.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from llmtrain.errors import ConfigError

QUANT_TYPES = ("nf4", "fp4")
QUANT_STATE = ".quant_state.bitsandbytes__"  # the key suffix bitsandbytes serialises a 4-bit weight's state under
DOUBLE_QUANT = True  # the absmax scales quantised to 8 bits in blocks of 256 (QLoRA's double quantisation)
BLOCK = 64  # weights per absmax scale
CPU_ENV = "LLMTRAIN_QUANTIZE_ON_CPU"  # =1: train a 4-bit base on the CPU anyway (bitsandbytes' slow CPU path; tests)


def setting(model_cfg: Any) -> str | None:
    """`model.quantize` ('nf4', 'fp4') or None."""
    q = getattr(model_cfg, "quantize", None)
    return str(q) if q else None


def check(model_cfg: Any, strategy: str, tp: int) -> None:
    """Config checks that need no model or device: the code, LoRA on top, the strategies that take it."""
    q = setting(model_cfg)
    if q is None:
        return
    if q not in QUANT_TYPES:
        raise ConfigError("model.quantize", f"must be one of {', '.join(QUANT_TYPES)} or null (got {q!r})")
    lora = getattr(model_cfg, "lora", None)
    if lora is None or not lora.enabled:
        raise ConfigError("model.quantize", f"{q} freezes the base in 4 bits, which cannot be trained: train "
                                            "low-rank adapters on it with model.lora.enabled=true (QLoRA)")
    if strategy not in ("single", "ddp"):  # LoRA's own check says the same; QLoRA adds nothing to shard
        raise ConfigError("model.quantize", f"a 4-bit base runs under strategy single or ddp, not {strategy}")
    if tp > 1:
        raise ConfigError("model.quantize", "a 4-bit base is not split over tensor-parallel ranks; set "
                                            "strategy.tp=1")


def check_device(model_cfg: Any, device: torch.device) -> None:
    """A 4-bit base trains on CUDA: bitsandbytes' 4-bit kernels; installed."""
    q = setting(model_cfg)
    if q is None:
        return
    if device.type != "cuda" and os.environ.get(CPU_ENV) != "1":
        raise ConfigError("model.quantize", f"{q} trains on a CUDA GPU (bitsandbytes' 4-bit kernels), not on "
                                            f"{device.type}; unset model.quantize here (LoRA alone runs on a CPU)")
    _bnb()


def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("model.quantize", "needs bitsandbytes: pip install 'llmtrain[bnb]'") from None
    return bitsandbytes


def quantizable(model: nn.Module, blocks: tuple[type[nn.Module], ...]) -> list[str]:
    """Names of the linear layers inside the family's blocks (what a 4-bit base stores in 4 bits)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, blocks):
            out += [f"{name}.{n}" for n, c in m.named_modules() if type(c) is nn.Linear]
    return out


def apply(model: nn.Module, model_cfg: Any, spec: Any, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Every nn.Linear inside the blocks of `spec` (its block_classes) as a bitsandbytes Linear4bit holding the
    same weight, frozen (quantised when the model moves to a device: `materialize` does it in place) and
    computing in `compute_dtype`; the same module otherwise."""
    q = setting(model_cfg)
    if q is None:
        return model
    bnb = _bnb()
    blocks = spec.block_classes(model)
    names = quantizable(model, blocks)
    if not names:
        others = sorted({type(m).__name__ for b in model.modules() if isinstance(b, blocks) for m in b.modules()})
        raise ConfigError("model.quantize", f"this model's blocks hold no nn.Linear to quantise (they hold "
                                            f"{', '.join(others[:6])}); use llmtrain's own model (model.impl=native "
                                            "for GPT-2)")
    for name in names:
        parent, _, leaf = name.rpartition(".")
        old = model.get_submodule(name)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=compute_dtype, compress_statistics=DOUBLE_QUANT, quant_type=q,
                                device="meta")
        new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, blocksize=BLOCK,
                                       compress_statistics=DOUBLE_QUANT, quant_type=q, module=new)
        new.support_avx512bf16_for_cpu = False  # its CPU inference repacks the weight in place (whole blocks only)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    if compute_dtype != torch.float32:  # the rest of the frozen base (embeddings, norms, head) in the compute dtype
        for prm in model.parameters():
            if type(prm) is nn.Parameter and prm.dtype == torch.float32:
                prm.data = prm.data.to(compute_dtype)
    return model


def materialize(model: nn.Module) -> None:
    """Quantise every 4-bit layer's weight where it lies (bitsandbytes does so on the first move to a device)."""
    for m in model.modules():
        w = m._parameters.get("weight")  # its own (an adapter layer's .weight is its base layer's)
        if type(w).__name__ == "Params4bit" and not w.bnb_quantized:
            m.weight = w._quantize(w.device)


def dequantized_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with bitsandbytes' serialised 4-bit weights (`X.weight` packed codes, `X.weight.absmax`, ...,
    `X.weight.quant_state.bitsandbytes__nf4`) turned back into `X.weight` floats [out, in], fp32; others as
    they are. The arrays are parsed by bitsandbytes' QuantState.from_dict (tensors and a JSON record: no code)."""
    heads = [k.split(QUANT_STATE)[0] for k in state if QUANT_STATE in k]
    if not heads:
        return state
    bnb = _bnb()
    out = dict(state)
    for w in heads:
        parts = {k[len(w) + 1:]: out.pop(k) for k in [k for k in out if k.startswith(f"{w}.")]}
        packed = out.pop(w)
        qs = bnb.functional.QuantState.from_dict(parts, device=packed.device)
        out[w] = bnb.functional.dequantize_4bit(packed, qs).float()
    return out


def quantized_bytes(n: int) -> float:
    """Bytes of `n` weights in 4 bits with double-quantised scales: n/2 codes, one 8-bit scale per 64 weights,
    and one fp32 scale (and offset) per 256 of those."""
    return n / 2 + (n / BLOCK if DOUBLE_QUANT else 4 * n / BLOCK) + (8 * n / (BLOCK * 256) if DOUBLE_QUANT else 0)
