"""`llmtrain-plan`: memory per GPU, bytes communicated per step and an estimated step time, for a config on a
cluster shape, under every strategy and ZeRO stage; which of them fit.

    llmtrain-plan experiment=gpt2_xl trainer.micro_batch_size=4 --nodes 2 --gpus-per-node 8 --gpu h100
    llmtrain-plan experiment=gpt2_small trainer.gradient_checkpointing=true --gpu a100-40gb --json

The model is built on the meta device (no memory, no download beyond a pretrained model's config), so any
size plans in a second. What each number counts (the gpt2 and llama families, whose specs describe what a step
keeps: `ModelSpec.plan_profile`; docs/plan.md has the derivations):

* weights, gradients, optimizer state: bytes per parameter by precision and strategy (fp32 master weights
  and Adam moments; bf16 copies where the backend keeps them), divided by the world size where sharded;
* activations: what the backward pass keeps per token and layer (GPT-2: 17·C values, the inputs of both layer
  norms, of the four projections and of GeLU, attention's q, k, v and output; Llama: 6·C + (3·nh + 2·nkv)·hd +
  4·I), in the dtypes the strategy computes in; with checkpointing, each block's input plus one block
  recomputed;
* buffers: the fused loss (hidden states, their gradient, the fp32 head gradient and one logits chunk),
  FSDP's gathered units, DeepSpeed's gradient buckets;
* communication: bytes each rank hands to collectives per optimizer step (gradient all-reduce, parameter
  all-gathers, gradient reduce-scatters), as counted in 2-process runs (LLMTRAIN_COUNT_COMM=1), and the ring
  algorithms' bytes on the wire;
* step time: model FLOPs (recomputation included) at an assumed fraction of the peak, plus the part of
  the communication that does not overlap the backward pass, at the link bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 2**30
# name → (device name, memory GiB, NVLink GB/s per GPU one way, inter-node GB/s per GPU); the peak TFLOP/s
# come from MFU's table (llmtrain.tracking.flops.PEAK_TFLOPS) under the device name
GPUS: dict[str, tuple[str, float, float, float]] = {
    "h200": ("H200", 141.0, 450.0, 50.0),
    "h100": ("H100", 80.0, 450.0, 50.0),
    "h100-pcie": ("H100 PCIe", 80.0, 64.0, 25.0),
    "a100": ("A100", 80.0, 300.0, 25.0),
    "a100-40gb": ("A100", 40.0, 300.0, 25.0),
    "l40s": ("L40S", 48.0, 32.0, 12.5),
    "l4": ("L4", 24.0, 32.0, 12.5),
    "a10g": ("A10G", 24.0, 32.0, 12.5),
    "rtx4090": ("RTX 4090", 24.0, 32.0, 12.5),
}
OPT_STATE_BYTES = {"adamw": 8, "adam": 8, "adamw8bit": 2, "sgd": 0, "momentum": 4, "rmsprop": 4}
CHUNK_ELEMENTS = 1 << 28  # the fused loss's logits chunk (llmtrain.models.gpt2_native._chunk_rows)
DS_BUCKET = 500_000_000  # DeepSpeed's default reduce/allgather bucket (elements)
DS_REUSE = 1_000_000_000  # DeepSpeed's stage3_max_reuse_distance default (elements)


@dataclass
class Shape:
    """What the estimate needs of a config: the model, the batch, the precision and the world."""

    n_params: int  # every parameter, tied ones once
    n_trainable: int
    n_layer: int
    n_embd: int
    n_head: int
    vocab_padded: int  # rows of the output projection
    block_params: int  # the largest block (FSDP's and ZeRO-3's working set)
    root_params: int  # parameters outside the blocks (embeddings, final norm)
    seq_len: int
    micro_batch: int
    accum: int
    precision: str  # fp32 | bf16 | fp16
    checkpointing: bool
    optimizer: str
    flops_per_token: float
    act_values: float = 0.0  # per token and layer, kept for the backward pass in an fp32 step
    act_fp32_autocast: float = 0.0  # under autocast: those kept in fp32
    act_low_autocast: float = 0.0  # under autocast: those kept in the low precision
    family: str = "gpt2"

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch on one GPU."""
        return self.seq_len * self.micro_batch


@dataclass
class Memory:
    """Bytes on one GPU at the step's peak, by component; `host` is CPU memory (offload)."""

    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    buffers: float = 0.0
    host: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.buffers


@dataclass
class Row:
    """One strategy on one cluster shape."""

    strategy: str
    memory: Memory
    comm: dict[str, float] = field(default_factory=dict)  # collective → bytes handed over per step per rank
    wire_bytes: float = 0.0  # bytes each rank sends per step (ring algorithms)
    step_s: float | None = None
    mfu: float | None = None
    tokens_per_s: float | None = None
    fits: bool | None = None
    phase: str = ""  # the phase `memory` is held at: forward (its end) or backward

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory"]["total"] = self.memory.total
        return d


@dataclass
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 1
    gpu: str = "h100"
    mfu_ceiling: float = 0.55  # fraction of the peak a well-fed step reaches in its matmuls
    overlap: float = 2 / 3  # share of the compute that communication can hide behind (the backward pass)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def spec(self) -> tuple[str, float, float, float]:
        if self.gpu not in GPUS:
            from llmtrain.errors import ConfigError

            raise ConfigError("--gpu", f"unknown GPU {self.gpu!r}; choose one of {', '.join(GPUS)}")
        return GPUS[self.gpu]

    @property
    def memory_gib(self) -> float:
        return self.spec[1]

    def peak_flops(self, precision: str) -> float:
        """Dense FLOP/s of one GPU at `precision` (fp32 runs as TF32), from MFU's table."""
        from llmtrain.tracking.flops import lookup_peak_tflops

        tflops = lookup_peak_tflops(self.spec[0], precision)
        if tflops is None:
            raise KeyError(f"no {precision} peak for {self.spec[0]} in llmtrain.tracking.flops.PEAK_TFLOPS")
        return tflops * 1e12

    @property
    def bandwidth(self) -> float:
        """Bytes/s per GPU of the slowest link a ring crosses."""
        _, _, nvlink, inter = self.spec
        return (nvlink if self.nodes == 1 else inter) * 1e9


# activations ---------------------------------------------------------------------------------------------------
def activation_bytes(s: Shape, mixed_everywhere: bool) -> tuple[float, float]:
    """(bytes kept for the backward per token per layer, bytes of a checkpointed block's saved input per token).

    fp32: the profile's values at 4 bytes (GPT-2: 17·C). Autocast (single, ddp): the residual stream and the norms'
    inputs stay fp32, the matmul inputs and outputs are bf16/fp16 (GPT-2: 2·4C + 15·2C = 38·C bytes). A strategy
    that computes in the low precision throughout (FSDP's MixedPrecisionPolicy, DeepSpeed's bf16/fp16 weights):
    the fp32 step's values at 2 bytes."""
    c = s.n_embd
    if s.precision == "fp32":
        return 4.0 * s.act_values, 4.0 * c
    if mixed_everywhere:
        return 2.0 * s.act_values, 2.0 * c
    return 4.0 * s.act_fp32_autocast + 2.0 * s.act_low_autocast, 4.0 * c


def loss_buffers(s: Shape, act: int) -> float:
    """The fused linear + cross-entropy: the final norm's input and output and the hidden states' gradient
    (per token), the head's fp32 gradient, and one fp32 logits chunk with its softmax gradient."""
    rows = min(s.tokens, max(1, CHUNK_ELEMENTS // s.vocab_padded))
    return 3.0 * act * s.n_embd * s.tokens + 4.0 * s.vocab_padded * s.n_embd + 2 * 4.0 * rows * s.vocab_padded


def activations(s: Shape, mixed_everywhere: bool) -> float:
    per_layer, saved_input = activation_bytes(s, mixed_everywhere)
    if s.checkpointing:  # every block's input, plus the one block being recomputed in the backward pass
        return s.tokens * (s.n_layer * saved_input + per_layer)
    return s.tokens * s.n_layer * per_layer


# memory per strategy --------------------------------------------------------------------------------------------
def memory(s: Shape, strategy: str, world: int, zero_stage: int = 2, offload_optimizer: bool = False,
           offload_params: bool = False) -> Memory:
    """Bytes per GPU at the peak of a step (see the module docstring)."""
    n, nt, w = s.n_params, s.n_trainable, world
    low = 2 if s.precision != "fp32" else 4  # bytes of a low-precision copy
    opt = OPT_STATE_BYTES.get(s.optimizer, 8) * nt
    m = Memory()
    if strategy in ("single", "ddp"):
        m.weights, m.grads, m.optimizer = 4.0 * n, 4.0 * nt, opt
        m.activations = activations(s, mixed_everywhere=False)
        m.buffers = loss_buffers(s, 4 if s.precision == "fp32" else 2)
    elif strategy == "fsdp":
        m.weights = 4.0 * n / w + low * (s.root_params + 2 * s.block_params)  # shards + gathered units in flight
        unsharded = 4.0 * nt if s.accum > 1 else 4.0 * s.block_params  # no_sync keeps whole gradients
        m.grads, m.optimizer = 4.0 * nt / w + unsharded, opt / w
        m.activations = activations(s, mixed_everywhere=True)
        m.buffers = loss_buffers(s, low)
    elif strategy == "deepspeed":
        m.activations = activations(s, mixed_everywhere=True)
        m.buffers = loss_buffers(s, low)
        model = (low * n / w + low * 2 * s.block_params) if zero_stage == 3 else low * n
        if zero_stage == 3 and offload_params:
            model, m.host = low * 2 * s.block_params, low * n
        m.weights = model
        master = 4.0 * nt / w if zero_stage >= 1 else (4.0 * nt if s.precision != "fp32" else 0.0)
        state = opt / w if zero_stage >= 1 else opt
        bucket = min(nt, DS_BUCKET) * low
        if zero_stage == 0:
            grads = low * nt + (4.0 * nt if s.precision != "fp32" else 0.0)
        elif zero_stage == 1:
            grads = low * nt + 4.0 * nt / w
        else:
            grads = 4.0 * nt / w + bucket
        if offload_optimizer and zero_stage >= 1:
            m.host += master + state + 4.0 * nt / w
            master = state = 0.0
            grads = grads - 4.0 * nt / w if zero_stage >= 2 else grads
        m.weights += master
        m.grads, m.optimizer = grads, state
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    return m


def at_peak(s: Shape, m: Memory) -> tuple[Memory, str]:
    """What one GPU holds at the step's peak, by component, and which phase that is: the end of the forward pass
    (all activations kept, gradients only from earlier micro-steps) or the backward pass (gradients complete, one
    layer's activations, or with checkpointing the saved inputs and one recomputed block, left)."""
    fwd = Memory(m.weights, m.grads if s.accum > 1 else 0.0, m.optimizer, m.activations, m.buffers, m.host)
    per_layer = m.activations / max(1, s.n_layer) if not s.checkpointing else m.activations
    bwd = Memory(m.weights, m.grads, m.optimizer, per_layer, m.buffers, m.host)
    return (fwd, "forward") if fwd.total >= bwd.total else (bwd, "backward")


def peak(s: Shape, m: Memory) -> float:
    """Bytes on one GPU at the step's peak (at_peak's total)."""
    return at_peak(s, m)[0].total


# communication ---------------------------------------------------------------------------------------------
def communication(s: Shape, strategy: str, world: int, zero_stage: int = 2,
                  reshard_after_forward: bool = True) -> tuple[dict[str, float], float]:
    """({collective: bytes this rank hands over per optimizer step}, bytes on the wire per rank (ring))."""
    if world == 1:
        return {}, 0.0
    n, nt, k = s.n_params, s.n_trainable, s.accum
    low = 2 if s.precision != "fp32" else 4
    ring = (world - 1) / world
    if strategy in ("single", "ddp"):
        c = {"all_reduce": 4.0 * nt}  # fp32 gradients, once per step (no_sync before)
        return c, 2 * ring * c["all_reduce"]
    if strategy == "fsdp":
        gathered = n * low * k * (2 if reshard_after_forward else 1)  # forward, and again for the backward
        c = {"all_gather": gathered, "reduce_scatter": 4.0 * nt}
        return c, ring * (c["all_gather"] + c["reduce_scatter"])
    grads = nt * low * (k if zero_stage >= 2 else 1)  # ZeRO-2/3 reduce every micro-step, ZeRO-1 at the boundary
    if zero_stage == 3:  # parameters gathered for the forward, and again for the backward once they do not all
        # stay gathered (DeepSpeed keeps up to stage3_max_reuse_distance = 1e9 elements for reuse)
        c = {"all_gather": n * low * k * (2 if n > DS_REUSE else 1), "reduce_scatter": grads}
        return c, ring * sum(c.values())
    c = {"all_reduce": grads, "all_gather": n * low}  # bucketed gradient all-reduce; updated partitions gathered
    return c, ring * (2 * c["all_reduce"] + c["all_gather"])


# the plan --------------------------------------------------------------------------------------------------------
STRATEGIES = [("single", {}), ("ddp", {}), ("fsdp", {}), ("zero1", {"zero_stage": 1}), ("zero2", {"zero_stage": 2}),
              ("zero3", {"zero_stage": 3}), ("zero2+offload", {"zero_stage": 2, "offload_optimizer": True}),
              ("zero3+offload", {"zero_stage": 3, "offload_optimizer": True, "offload_params": True})]


def row(s: Shape, label: str, cluster: Cluster, **kw: Any) -> Row:
    strategy = "deepspeed" if label.startswith("zero") else label
    world = 1 if strategy == "single" else cluster.world
    m = memory(s, strategy, world, **kw)
    comm, wire = communication(s, strategy, world, kw.get("zero_stage", 2))
    peak_flops = cluster.peak_flops(s.precision)
    flops = s.flops_per_token * s.tokens * s.accum
    recompute = flops / 3 if s.checkpointing else 0.0  # one more forward pass
    t_compute = (flops + recompute) / (peak_flops * cluster.mfu_ceiling)
    t_comm = wire / cluster.bandwidth
    if kw.get("offload_optimizer"):
        t_comm += 2 * 4.0 * s.n_trainable / world / 25e9  # gradients down, weights up over PCIe (~25 GB/s)
    step = t_compute + max(0.0, t_comm - cluster.overlap * t_compute)
    r = Row(label, m, comm, wire, step, flops / (step * peak_flops), s.tokens * s.accum * world / step)
    r.memory, r.phase = at_peak(s, m)  # every column an amount held at that moment
    r.fits = r.memory.total <= cluster.memory_gib * GIB * 0.95  # the CUDA context and allocator slack take the rest
    return r


def plan(s: Shape, cluster: Cluster) -> list[Row]:
    return [row(s, label, cluster, **kw) for label, kw in STRATEGIES]


def shape_of(cfg: Any, device: str = "cuda") -> Shape:
    """The Shape of a composed config: its model built on the meta device (LoRA and freezing applied); a
    pretrained model's sizes come from its config.json. `device`: what trainer.precision=auto resolves for."""
    import torch

    from llmtrain.errors import ConfigError
    from llmtrain.models import adapters
    from llmtrain.models.base import DataInfo, get_model_spec
    from llmtrain.precision import Precision

    spec = get_model_spec(cfg.model.family)
    if spec.task != "lm":
        raise ConfigError("model", f"llmtrain-plan models language models (the gpt2 and llama families), not "
                                   f"{spec.name!r}")
    vocab = _vocab(cfg)
    info = DataInfo(task="lm", vocab_size=vocab, eos_token_id=vocab - 1)
    adapters.resolve_targets(cfg.model, spec.lora_targets(cfg.model))
    with torch.device("meta"):
        model = adapters.apply(spec.skeleton(cfg.model, info), cfg.model)
    p = spec.plan_profile(model)
    if p is None:
        why = "; a Llama, Qwen2, Mistral, Qwen3 or GPT-2 dir is planned as model=llama_tiny or model=gpt2_small with " \
              "model.pretrained=<dir> (the dir's sizes win)" if spec.name == "hf" else ""
        raise ConfigError("model", f"llmtrain-plan models the gpt2 and llama families, not {spec.name!r}{why}")
    params = list({id(x): x for x in model.parameters()}.values())
    n = sum(x.numel() for x in params)
    nt = sum(x.numel() for x in params if x.requires_grad)
    block_types = spec.block_classes(model)
    blocks = [sum(x.numel() for x in b.parameters()) for b in model.modules() if isinstance(b, block_types)]
    t = cfg.trainer
    precision = getattr(t.precision, "value", str(t.precision))
    if precision == "auto":  # bf16 on the GPUs planned for (all in the table have it), fp32 on CPU
        precision = Precision.bf16.value if device == "cuda" else Precision.fp32.value
    seq = int(cfg.data.seq_len)
    return Shape(n_params=n, n_trainable=nt, n_layer=p.n_layer, n_embd=p.n_embd, n_head=p.n_head,
                 vocab_padded=p.vocab_rows, block_params=max(blocks, default=0), root_params=n - sum(blocks),
                 seq_len=seq, micro_batch=int(t.micro_batch_size), accum=int(t.grad_accum_steps), precision=precision,
                 checkpointing=bool(t.gradient_checkpointing), optimizer=getattr(cfg.optim.name, "value", str(cfg.optim.name)),
                 flops_per_token=float(spec.flops_per_token(model, seq)), act_values=p.act_values,
                 act_fp32_autocast=p.act_fp32_autocast, act_low_autocast=p.act_low_autocast, family=spec.name)


def _vocab(cfg: Any) -> int:
    """The vocabulary the model will have, without preparing data: the model's, the tokenizer's, or GPT-2's."""
    if getattr(cfg.model, "vocab_size", None):
        return int(cfg.model.vocab_size)
    tok = getattr(cfg.data, "tokenizer", None)
    if tok == "byte":
        return 257
    if tok == "bpe":
        return int(cfg.data.vocab_size)
    return 50257  # GPT-2's BPE (the hub name gpt2, the shared tokenizer dir, pretrained GPT-2s)


# CLI ---------------------------------------------------------------------------------------------------------------
def table(rows: list[Row], cluster: Cluster, s: Shape) -> str:
    mem_gib = cluster.memory_gib
    head = (f"{s.family} {s.n_params / 1e6:,.1f}M params ({s.n_trainable / 1e6:,.1f}M trainable), {s.n_layer} layers × "
            f"{s.n_embd}, micro-batch {s.micro_batch} × {s.seq_len} × accum {s.accum}, {s.precision}"
            f"{', checkpointing' if s.checkpointing else ''}, {s.optimizer}; {cluster.nodes} node(s) × "
            f"{cluster.gpus_per_node} {cluster.gpu} ({mem_gib:g} GiB)")
    lines = [head, "", "GiB per GPU at the step's peak (the end of the forward pass or the backward pass), by what "
                       "it holds then:", "",
             "| strategy | weights | grads | optimizer | activations | buffers | total GiB | peak in | fits | "
             "comm GB/step | step s | MFU | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r.memory
        g = [f"{x / GIB:.2f}" for x in (m.weights, m.grads, m.optimizer, m.activations, m.buffers, m.total)]
        host = f" (+{m.host / GIB:.1f} host)" if m.host else ""
        lines.append(f"| {r.strategy} | {' | '.join(g[:5])} | {g[5]}{host} | {r.phase} | {'yes' if r.fits else 'no'} | "
                     f"{sum(r.comm.values()) / 1e9:.2f} | {r.step_s:.3f} | {r.mfu:.0%} | {r.tokens_per_s:,.0f} |")
    fit = [r.strategy for r in rows if r.fits]
    lines += ["", f"fits: {', '.join(fit) if fit else 'none: lower trainer.micro_batch_size, add checkpointing, '}"
                  + ("" if fit else "or shard over more GPUs")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from llmtrain.cli import report_and_exit
    from llmtrain.errors import ConfigError

    ap = argparse.ArgumentParser(prog="llmtrain-plan", description=__doc__.split("\n\n")[0],
                                 epilog="Other arguments are config overrides, as for llmtrain-train.")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)}")
    ap.add_argument("--mfu-ceiling", type=float, default=0.55, help="fraction of the peak the matmuls reach")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args, overrides = ap.parse_known_args(argv)
    try:
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise ConfigError("--nodes" if args.nodes < 1 else "--gpus-per-node", "must be >= 1")
        if not 0 < args.mfu_ceiling <= 1:
            raise ConfigError("--mfu-ceiling", f"must be in (0, 1] (got {args.mfu_ceiling})")
        cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu, args.mfu_ceiling)
        cluster.spec  # noqa: B018  (checks the GPU name)
        cfg = compose(overrides)
        s = shape_of(cfg)
        rows = plan(s, cluster)
    except ConfigError as e:
        report_and_exit(e)
    if args.json:
        print(json.dumps({"shape": asdict(s), "cluster": asdict(cluster), "rows": [r.as_dict() for r in rows]},
                         indent=1))
    else:
        print(table(rows, cluster, s))


def compose(overrides: list[str]) -> Any:
    """The training config for `overrides`, checked as llmtrain-train checks it (one line on a bad key)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from llmtrain.cli import hydra_error
    from llmtrain.config import check_known_keys, conf_dir, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            cfg = _compose(config_name="config", overrides=overrides)
        check_known_keys(cfg)
    except Exception as ex:
        err = hydra_error(ex)
        if err is None:
            raise
        raise err from None
    return cfg


if __name__ == "__main__":
    main(sys.argv[1:])
