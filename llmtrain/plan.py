"""`llmtrain-plan`: memory per GPU, bytes communicated per step and an estimated step time, for a config on a
cluster shape, under every strategy, ZeRO stage and parallel layout (tensor parallel, sequence parallel, HSDP);
which of them fit, and which layout is fastest.

    llmtrain-plan experiment=gpt2_xl trainer.micro_batch_size=4 --nodes 2 --gpus-per-node 8 --gpu h100
    llmtrain-plan model=llama3_8b cluster.gpus=16 cluster.gpus_per_node=8 cluster.gpu=h100
    llmtrain-plan experiment=gpt2_small trainer.gradient_checkpointing=true --gpu a100-40gb --json

The model is built on the meta device (no memory, no download beyond a pretrained model's config), so any
size plans in a second. What each number counts (the gpt2 and llama families, whose specs describe what a step
keeps: `ModelSpec.plan_profile`; docs/plan.md has the derivations):

* weights, gradients, optimizer state: bytes per parameter by precision and strategy (fp32 master weights
  and Adam moments; bf16 copies where the backend keeps them), divided by the world size where sharded;
  tensor parallelism (TP) divides the split projections, embedding and head by its degree, not the norms;
* activations: what the backward pass keeps per token and layer (GPT-2: 17·C values, the inputs of both layer
  norms, of the four projections and of GeLU, attention's q, k, v and output; Llama: 6·C + (3·nh + 2·nkv)·hd +
  4·I), in the dtypes the strategy computes in; with checkpointing, each block's input plus one block
  recomputed; TP divides those computed on split heads and MLP width, sequence parallelism (SP) the norms'
  too;
* buffers: the fused loss (hidden states, their gradient, the fp32 head gradient and one logits chunk; under
  TP the vocabulary shard's), FSDP's gathered units, DeepSpeed's gradient buckets;
* communication: bytes each rank hands to collectives per optimizer step (gradient all-reduce, parameter
  all-gathers, gradient reduce-scatters; "tp.*": the TP group's activation collectives), as counted in
  2-process runs (LLMTRAIN_COUNT_COMM=1), and the ring algorithms' bytes on the wire, by link;
* step time: model FLOPs (recomputation included, ÷ TP degree per GPU) at an assumed fraction of the peak,
  plus TP's communication at NVLink bandwidth (on the critical path), plus the part of the data-parallel
  communication that does not overlap the backward pass, at its link's bandwidth.

`choose` searches the layouts that use the whole cluster for the fastest that fits (tokens/s); `overrides_of`
turns a row into the strategy config it stands for.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
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
CHUNK_ELEMENTS = 1 << 28  # the fused loss's logits chunk (llmtrain.models.gpt2_native._chunk_rows, tp_loss)
DS_BUCKET = 500_000_000  # DeepSpeed's default reduce/allgather bucket (elements)
DS_REUSE = 1_000_000_000  # DeepSpeed's stage3_max_reuse_distance default (elements)
PCIE = 25e9  # bytes/s host ↔ GPU (offload)
FIT_SHARE = 0.95  # of a GPU's memory a step may take: the CUDA context and allocator slack take the rest


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
    # tensor parallelism
    n_kv_head: int = 0  # key/value heads (0: as many as n_head)
    mlp_width: int = 0  # the MLP's inner width (0: unknown, not checked)
    whole_params: int = 0  # parameters TP keeps whole on every rank (the norms), all of them
    block_whole: int = 0  # and those of the largest block
    act_split: float = 0.0  # of act_values: computed on split heads or MLP width (÷ tp)
    act_seq: float = 0.0  # of act_values: the norms' inputs and normalised values (÷ tp with SP)
    sequence_parallel: bool = True  # TP layouts split the sequence too (strategy.sequence_parallel, resolved)
    tp_vocab: bool = True  # TP splits the embedding and head over the vocabulary (a vocab-parallel loss)
    tp_off: str = ""  # why this config cannot use TP ("": it can)
    n_quantized: int = 0  # of n_params: frozen in 4 bits (model.quantize: the blocks' linear weights)
    quant_layer: int = 0  # the largest of those layers (dequantised for its matmul, one at a time)
    lora: bool = False  # LoRA adapters (model.lora): single and ddp only

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch on one GPU."""
        return self.seq_len * self.micro_batch

    def tp_degrees(self) -> list[int]:
        """The TP degrees > 1 the model's heads, key/value heads and MLP width split evenly (any count)."""
        if self.tp_off:
            return []
        sizes = [n for n in (self.n_head, self.n_kv_head, self.mlp_width) if n]
        return [t for t in range(2, self.n_head + 1) if all(n % t == 0 for n in sizes)]

    def split_sequence(self, tp: int) -> bool:
        """Whether a TP layout of degree `tp` runs sequence parallel: where the config lets it and tp divides S."""
        return tp > 1 and self.sequence_parallel and self.seq_len % tp == 0


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


@dataclass(frozen=True)
class Layout:
    """How a row uses the GPUs: the strategy config it stands for (see overrides_of)."""

    strategy: str  # single | ddp | fsdp | deepspeed
    tp: int = 1  # ranks per model (strategy.tp)
    dp_replicate: int = 1  # HSDP's replica groups (fsdp)
    sequence_parallel: bool = False  # with tp > 1
    zero_stage: int = 2  # deepspeed
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class Row:
    """One strategy on one cluster shape."""

    strategy: str  # the row's label: single, fsdp, zero3, fsdp dp8×tp2, hsdp 2×8, tp8, ...
    memory: Memory
    comm: dict[str, float] = field(default_factory=dict)  # collective → bytes handed over per step per rank
    wire_bytes: float = 0.0  # bytes each rank sends per step (ring algorithms)
    step_s: float | None = None
    mfu: float | None = None
    tokens_per_s: float | None = None
    fits: bool | None = None
    phase: str = ""  # the phase `memory` is held at: forward (its end) or backward
    layout: Layout | None = None
    gpus: int = 1  # GPUs the row runs on
    wire_by_link: dict[str, float] = field(default_factory=dict)  # nvlink | inter-node → bytes sent per step

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
        """Bytes/s per GPU of the slowest link a ring over every GPU crosses."""
        return self.link_bandwidth("nvlink" if self.nodes == 1 else "inter-node")

    def link_bandwidth(self, link: str) -> float:
        """Bytes/s per GPU of `link`: nvlink (within a node) or inter-node."""
        _, _, nvlink, inter = self.spec
        return (nvlink if link == "nvlink" else inter) * 1e9

    def spans(self, ranks: int) -> str:
        """The link a group of `ranks` consecutive ranks (or one strided over all nodes) crosses."""
        return "inter-node" if ranks > self.gpus_per_node else "nvlink"


# activations ---------------------------------------------------------------------------------------------------
def tp_share(s: Shape, tp: int) -> tuple[float, float, float, float]:
    """(parameters, trainable ones, the largest block's, the root's) one TP rank holds: the split projections,
    embedding and head ÷ tp, the norms whole."""
    if tp == 1:
        return s.n_params, s.n_trainable, s.block_params, s.root_params
    root_whole = max(0, s.whole_params - s.n_layer * s.block_whole)
    n = (s.n_params - s.whole_params) / tp + s.whole_params
    block = (s.block_params - s.block_whole) / tp + s.block_whole
    root = (s.root_params - root_whole) / tp + root_whole
    return n, s.n_trainable * n / s.n_params, block, root


def activation_bytes(s: Shape, mixed_everywhere: bool, tp: int = 1, sp: bool = False) -> tuple[float, float]:
    """(bytes kept for the backward per token per layer, bytes of a checkpointed block's saved input per token).

    fp32: the profile's values at 4 bytes (GPT-2: 17·C). Autocast (single, ddp): the residual stream and the norms'
    inputs stay fp32, the matmul inputs and outputs are bf16/fp16 (GPT-2: 2·4C + 15·2C = 38·C bytes). A strategy
    that computes in the low precision throughout (FSDP's MixedPrecisionPolicy, DeepSpeed's bf16/fp16 weights):
    the fp32 step's values at 2 bytes. TP (`tp` > 1): the values on split heads and MLP width ÷ tp; with
    sequence parallelism (`sp`) the norms' inputs and normalised values and the saved block input ÷ tp too (the
    norms' outputs, gathered whole for the projections, are not)."""
    c, seq = s.n_embd, (tp if sp else 1)
    split, along = (s.act_split, s.act_seq) if tp > 1 else (0.0, 0.0)
    if s.precision == "fp32" or mixed_everywhere:
        b = 4.0 if s.precision == "fp32" else 2.0
        return b * (s.act_values - split - along + split / tp + along / seq), b * c / seq
    return 4.0 * s.act_fp32_autocast / seq + 2.0 * (s.act_low_autocast - split + split / tp), 4.0 * c / seq


def loss_buffers(s: Shape, act: int, tp: int = 1, sp: bool = False) -> float:
    """The fused linear + cross-entropy: the final norm's input and output and the hidden states' gradient
    (per token), the head's fp32 gradient, and one fp32 logits chunk with its softmax gradient. Under TP
    (distributed/tp_loss.py) each rank holds its vocabulary rows' head gradient and logits (a chunk of up to
    2²⁸ of them); with SP the final norm's input and output are sequence shards and the gathered states whole."""
    vocab = -(-s.vocab_padded // tp)  # torch.chunk's rows per rank
    rows = min(s.tokens, max(1, CHUNK_ELEMENTS // vocab))
    hidden = (2.0 / tp + 2.0 if sp and tp > 1 else 3.0) * act * s.n_embd * s.tokens
    return hidden + 4.0 * vocab * s.n_embd + 2 * 4.0 * rows * vocab


def activations(s: Shape, mixed_everywhere: bool, tp: int = 1, sp: bool = False) -> float:
    per_layer, saved_input = activation_bytes(s, mixed_everywhere, tp, sp)
    if s.checkpointing:  # every block's input, plus the one block being recomputed in the backward pass
        return s.tokens * (s.n_layer * saved_input + per_layer)
    return s.tokens * s.n_layer * per_layer


# memory per strategy --------------------------------------------------------------------------------------------
def memory(s: Shape, strategy: str, world: int, zero_stage: int = 2, offload_optimizer: bool = False,
           offload_params: bool = False, tp: int = 1, sp: bool = False) -> Memory:
    """Bytes per GPU at the peak of a step (see the module docstring). `world`: the ranks the state is sharded
    over (fsdp: dp, or HSDP's shard group); `tp`, `sp`: tensor and sequence parallelism inside each."""
    n, nt, block, root = tp_share(s, tp)
    w = world
    low = 2 if s.precision != "fp32" else 4  # bytes of a low-precision copy
    opt = OPT_STATE_BYTES.get(s.optimizer, 8) * nt
    m = Memory()
    if strategy in ("single", "ddp"):
        m.weights, m.grads, m.optimizer = 4.0 * n, 4.0 * nt, opt
        m.activations = activations(s, False, tp, sp)
        m.buffers = loss_buffers(s, 4 if s.precision == "fp32" else 2, tp if s.tp_vocab else 1, sp)
        if s.n_quantized:  # a 4-bit base: codes and scales, and one layer's weight dequantised at a time
            from llmtrain.models.quantize import quantized_bytes

            m.weights = low * (n - s.n_quantized - nt) + 4.0 * nt + quantized_bytes(s.n_quantized)
            m.buffers += low * s.quant_layer
    elif strategy == "fsdp":
        m.weights = 4.0 * n / w + low * (root + 2 * block)  # shards + gathered units in flight
        unsharded = 4.0 * nt if s.accum > 1 else 4.0 * block  # no_sync keeps whole gradients
        m.grads, m.optimizer = 4.0 * nt / w + unsharded, opt / w
        m.activations = activations(s, True, tp, sp)
        m.buffers = loss_buffers(s, low, tp if s.tp_vocab else 1, sp)
    elif strategy == "deepspeed" and tp == 1:
        _deepspeed_memory(s, m, w, zero_stage, offload_optimizer, offload_params)
    else:
        raise ValueError(f"unknown strategy {strategy!r}" + (f" with tp={tp}" if tp > 1 else ""))
    return m


def _deepspeed_memory(s: Shape, m: Memory, w: int, zero_stage: int, offload_optimizer: bool,
                      offload_params: bool) -> None:
    """DeepSpeed ZeRO-`zero_stage`'s bytes per GPU into `m`."""
    n, nt = s.n_params, s.n_trainable
    low = 2 if s.precision != "fp32" else 4
    opt = OPT_STATE_BYTES.get(s.optimizer, 8) * nt
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
                  reshard_after_forward: bool = True, tp: int = 1) -> tuple[dict[str, float], float]:
    """({collective: bytes this rank hands over per optimizer step}, bytes on the wire per rank (ring)) of the
    data-parallel group of `world` ranks; with `tp` > 1 each rank's share is its TP shard's."""
    if world == 1:
        return {}, 0.0
    n, nt, _, _ = tp_share(s, tp)
    k = s.accum
    low = 2 if s.precision != "fp32" else 4
    if strategy in ("single", "ddp"):
        c = {"all_reduce": 4.0 * nt}  # fp32 gradients, once per step (no_sync before)
    elif strategy == "fsdp":
        gathered = n * low * k * (2 if reshard_after_forward else 1)  # forward, and again for the backward
        c = {"all_gather": gathered, "reduce_scatter": 4.0 * nt}
    elif zero_stage == 3:  # parameters gathered for the forward, and again for the backward once they do not all
        # stay gathered (DeepSpeed keeps up to stage3_max_reuse_distance = 1e9 elements for reuse)
        c = {"all_gather": n * low * k * (2 if n > DS_REUSE else 1), "reduce_scatter": nt * low * k}
    else:  # bucketed gradient all-reduce (ZeRO-2 every micro-step, ZeRO-1 at the boundary); partitions gathered
        c = {"all_reduce": nt * low * (k if zero_stage >= 2 else 1), "all_gather": n * low}
    return c, wire(c, world)


def wire(c: dict[str, float], ranks: int) -> float:
    """Bytes a rank sends for the collectives `c` over a ring of `ranks`: (ranks−1)/ranks of each gather and
    reduce-scatter, twice that of an all-reduce (a reduce-scatter then an all-gather)."""
    ring = (ranks - 1) / ranks
    return sum(ring * b * (2 if name.endswith("all_reduce") else 1) for name, b in c.items())


def tp_communication(s: Shape, tp: int, sp: bool, fsdp2: bool) -> dict[str, float]:
    """{"tp.<collective>": bytes this rank hands over per optimizer step} within its TP group (the whole
    activation tensor per collective: x = B·S·C values). Per micro-step, without SP: per layer and forward pass
    an all-reduce of o_proj's and down_proj's outputs (with checkpointing o_proj's again in the recomputation,
    which stops before down_proj: nothing the backward needs comes after it), per layer in the backward one
    of each norm's output gradient, the embedding's output, the loss's hidden-state gradient, and the loss's
    three reductions of B·S fp32 values. With SP each all-reduce is a reduce-scatter and an all-gather (the
    norms' outputs gathered before the projections, the rowwise outputs' gradients in the backward, the
    embedding's gradient, the final norm's output before the loss), and the gradients of the parameters kept
    whole (the norms: computed from a shard of the tokens) are all-reduced. Matmul outputs travel in the compute
    dtype, the residual stream (norm outputs, embedding) in fp32 under autocast (tp alone; `fsdp2`: FSDP2 runs the
    step, fsdp and ddp × tp, in the low precision throughout). A family whose plan
    leaves the embedding and head whole (`tp_vocab` false: GPT-2) has no collective outside the blocks."""
    if tp == 1:
        return {}
    mm = 4.0 if s.precision == "fp32" else 2.0
    res = mm if fsdp2 else 4.0
    x, layers, fwd = s.tokens * s.n_embd, s.n_layer, 2 if s.checkpointing else 1
    # o_proj, down_proj outputs: all-reduce (reduce-scatter with SP); a checkpointed block's recomputation
    # stops once the tensors its backward needs are back, before the block's last projection (down_proj)
    rowwise = layers * (2 + (fwd - 1)) * x * mm
    norm_grads = 2 * layers * x * res  # the norms' output gradients: all-reduce (reduce-scatter with SP)
    emb, loss_h = x * res, x * mm  # the embedding's output, the loss's hidden states (or their gradient)
    reductions = 3 * 4.0 * s.tokens  # max, sum of exps, target logit
    # with SP the whole parameters (norms) see a shard of the tokens: their gradients are summed over the ranks
    # (FSDP2 reduces them with its own, once per optimizer step; autocast's replicas every micro-step)
    partial = (s.whole_params * res if sp else 0.0) / (s.accum if fsdp2 else 1)
    if not s.tp_vocab:  # embedding, head and loss replicated: no collective outside the blocks
        emb = loss_h = reductions = 0.0
    k = s.accum
    if not sp:
        return {"tp.all_reduce": k * (rowwise + norm_grads + emb + loss_h + reductions)}
    gathers = 2 * layers * fwd * x * res + 2 * layers * x * mm + emb + loss_h  # the mirror of each scatter
    return {"tp.reduce_scatter": k * (rowwise + norm_grads + emb + loss_h), "tp.all_gather": k * gathers,
            "tp.all_reduce": k * (reductions + partial)}


@dataclass
class Transfer:
    """Collectives of one group over one link: bytes handed over and sent per step per rank."""

    comm: dict[str, float]
    wire: float
    link: str  # nvlink | inter-node
    hidden: bool  # may overlap the backward pass (data parallel); TP's may not


def transfers(s: Shape, lay: Layout, cluster: Cluster) -> list[Transfer]:
    """The groups a rank of `lay` talks to on `cluster`: its TP group (consecutive ranks of a node), its
    data-parallel group (strided over every node), or HSDP's shard group (world / (R·tp) · tp consecutive
    ranks) and replica group (across nodes)."""
    world = lay.tp if lay.strategy == "single" else cluster.world
    dp, out = world // lay.tp, []
    if lay.tp > 1:
        # (ddp × tp runs as FSDP2's hybrid mode with shards of one rank: distributed/__init__.build_strategy)
        tc = tp_communication(s, lay.tp, lay.sequence_parallel, lay.strategy in ("fsdp", "ddp"))
        out.append(Transfer(tc, wire(tc, lay.tp), "nvlink", False))
    if dp == 1:
        return out
    link = "nvlink" if cluster.nodes == 1 else "inter-node"
    if lay.dp_replicate > 1:
        shard = dp // lay.dp_replicate
        c, w = communication(s, lay.strategy, shard, tp=lay.tp)
        out.append(Transfer(c, w, cluster.spans(world // lay.dp_replicate), True))
        rc = {"all_reduce": 4.0 * tp_share(s, lay.tp)[1] / shard}  # the shard's fp32 gradients, once per step
        out.append(Transfer(rc, wire(rc, lay.dp_replicate), "inter-node", True))
        return out
    c, w = communication(s, lay.strategy, dp, lay.zero_stage, tp=lay.tp)
    out.append(Transfer(c, w, link, True))
    return out


# the plan --------------------------------------------------------------------------------------------------------
STRATEGIES = [("single", {}), ("ddp", {}), ("fsdp", {}), ("zero1", {"zero_stage": 1}), ("zero2", {"zero_stage": 2}),
              ("zero3", {"zero_stage": 3}), ("zero2+offload", {"zero_stage": 2, "offload_optimizer": True}),
              ("zero3+offload", {"zero_stage": 3, "offload_optimizer": True, "offload_params": True})]


def label_of(lay: Layout, world: int) -> str:
    """fsdp dp8×tp2, hsdp 2×8, hsdp 2×4×tp2, ddp dp8×tp2, tp8 (+ " no-sp" without sequence parallelism)."""
    dp, tp = world // lay.tp, f"tp{lay.tp}"
    if lay.strategy == "single":
        text = tp if lay.tp > 1 else "single"
    elif lay.dp_replicate > 1:
        text = f"hsdp {lay.dp_replicate}×{dp // lay.dp_replicate}" + (f"×{tp}" if lay.tp > 1 else "")
    else:
        text = f"{lay.strategy} dp{dp}×{tp}" if lay.tp > 1 else lay.strategy
    return text + (" no-sp" if lay.tp > 1 and not lay.sequence_parallel else "")


def layout_row(s: Shape, lay: Layout, cluster: Cluster, label: str | None = None) -> Row:
    """The row of `lay` on `cluster`: memory at the peak, communication, step time, whether it fits."""
    world = lay.tp if lay.strategy == "single" else cluster.world
    dp = world // lay.tp
    m = memory(s, lay.strategy, dp // lay.dp_replicate, lay.zero_stage, lay.offload_optimizer, lay.offload_params,
               lay.tp, lay.sequence_parallel)
    ts = transfers(s, lay, cluster)
    peak_flops = cluster.peak_flops(s.precision)
    flops = s.flops_per_token * s.tokens * s.accum
    recompute = flops / 3 if s.checkpointing else 0.0  # one more forward pass
    t_compute = (flops + recompute) / lay.tp / (peak_flops * cluster.mfu_ceiling)
    t_tp = sum(t.wire / cluster.link_bandwidth(t.link) for t in ts if not t.hidden)
    t_dp = sum(t.wire / cluster.link_bandwidth(t.link) for t in ts if t.hidden)
    if lay.offload_optimizer:
        t_dp += 2 * 4.0 * s.n_trainable / world / PCIE  # gradients down, weights up over PCIe
    step = t_compute + t_tp + max(0.0, t_dp - cluster.overlap * t_compute)
    r = Row(label or label_of(lay, world), m, _merged(t.comm for t in ts), sum(t.wire for t in ts), step,
            flops / lay.tp / (step * peak_flops), s.tokens * s.accum * dp / step, layout=lay, gpus=world)
    r.wire_by_link = _merged({t.link: t.wire} for t in ts)
    r.memory, r.phase = at_peak(s, m)  # every column an amount held at that moment
    r.fits = r.memory.total <= cluster.memory_gib * GIB * FIT_SHARE
    return r


def _merged(dicts: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v
    return out


def row(s: Shape, label: str, cluster: Cluster, **kw: Any) -> Row:
    """The row of one of STRATEGIES (single runs on one GPU, the others on the whole cluster)."""
    return layout_row(s, Layout("deepspeed" if label.startswith("zero") else label, **kw), cluster, label)


def layouts(s: Shape, cluster: Cluster) -> list[Layout]:
    """The parallel layouts beyond STRATEGIES for `cluster`: for each TP degree that divides gpus_per_node and
    the model's heads, key/value heads and MLP width (TP never crosses a node), fsdp dp×tp and ddp dp×tp (dp > 1),
    or TP alone (strategy=single) when it takes the whole cluster; HSDP for each replica count R > 1 dividing
    the nodes, with and without TP, while each replica still shards (world / (R·tp) > 1)."""
    world, gpn = cluster.world, cluster.gpus_per_node
    degrees = [t for t in s.tp_degrees() if gpn % t == 0]
    out = []
    for t in degrees:
        sp = s.split_sequence(t)
        out += [Layout("single", t, 1, sp)] if world == t else [Layout("fsdp", t, 1, sp), Layout("ddp", t, 1, sp)]
    for r in (r for r in range(2, cluster.nodes + 1) if cluster.nodes % r == 0):
        out += [Layout("fsdp", t, r, s.split_sequence(t)) for t in [1, *degrees] if world // (r * t) > 1]
    return out


def plan(s: Shape, cluster: Cluster) -> list[Row]:
    """Every row: STRATEGIES, then the parallel layouts (`layouts`); LoRA (and a 4-bit base under it): single and
    ddp only, as adapters.check allows."""
    if s.lora or s.n_quantized:
        return [row(s, label, cluster) for label in ("single", "ddp")]
    return [row(s, label, cluster, **kw) for label, kw in STRATEGIES] + [
        layout_row(s, lay, cluster) for lay in layouts(s, cluster)]


def choose(s: Shape, cluster: Cluster, allow: Callable[[Row], bool] | None = None) -> tuple[Row, Row | None, str]:
    """(the fastest row that fits, the runner-up or None, a one-line reason) among the rows that use every GPU of
    `cluster` (plan's rows with `gpus` == cluster.world: single only on one GPU, TP alone only over a whole
    node-sized cluster). Fastest: most tokens per second (each layout's global batch is micro × accum × dp, so
    a TP layout's step is shorter on fewer tokens); ties keep plan's order. Nothing fits: ConfigError, one line
    naming the setting to change (checkpointing, the micro-batch, or more GPUs) and the smallest peak found.
    `allow`: which rows may be chosen (strategy=auto: DeepSpeed's only where it is installed)."""
    rows = [r for r in plan(s, cluster) if r.gpus == cluster.world and (allow is None or allow(r))]
    fit = sorted((r for r in rows if r.fits), key=lambda r: -(r.tokens_per_s or 0.0))
    if not fit:
        raise _no_fit(s, cluster, rows)
    best, second = fit[0], (fit[1] if len(fit) > 1 else None)
    why = f"fits in {best.memory.total / GIB:.1f} GiB of {cluster.memory_gib:g}, {best.step_s:.2f} s/step, " \
          f"{best.tokens_per_s:,.0f} tokens/s"
    if second is not None:
        slower = 1 - (second.tokens_per_s or 0.0) / (best.tokens_per_s or 1.0)
        why += f"; next {second.strategy} {second.step_s:.2f} s/step, {second.tokens_per_s:,.0f} tokens/s " \
               f"({slower:.0%} slower)"
    return best, second, why


def _no_fit(s: Shape, cluster: Cluster, rows: list[Row]) -> Exception:
    from llmtrain.errors import ConfigError

    small = min(rows, key=lambda r: r.memory.total)
    if s.lora and not s.n_quantized and small.memory.weights > cluster.memory_gib * GIB * FIT_SHARE / 2:
        key, fix = "model.quantize", (f"the frozen base alone takes {small.memory.weights / GIB:.1f} GiB; hold it in "
                                      "4 bits with model.quantize=nf4 (QLoRA)")
    elif not s.checkpointing:
        key, fix = "trainer.gradient_checkpointing", "set trainer.gradient_checkpointing=true"
    elif s.micro_batch > 1:
        key, fix = "trainer.micro_batch_size", f"lower trainer.micro_batch_size (now {s.micro_batch})"
    else:
        key, fix = "cluster.gpus", "plan more GPUs or GPUs with more memory"
    return ConfigError(key, f"no layout fits {cluster.world} × {cluster.gpu} ({cluster.memory_gib:g} GiB): the "
                            f"smallest, {small.strategy}, needs {small.memory.total / GIB:.1f} GiB; {fix}")


def overrides_of(r: Row) -> dict[str, Any]:
    """The strategy config overrides `r` stands for: strategy.name, tp, dp_replicate, sequence_parallel (TP),
    and DeepSpeed's zero_stage and offloads. The batch settings are left as planned (micro × accum per dp rank)."""
    lay = r.layout or Layout(r.strategy)
    out: dict[str, Any] = {"strategy.name": lay.strategy, "strategy.tp": lay.tp,
                           "strategy.dp_replicate": lay.dp_replicate}
    if lay.tp > 1:
        out["strategy.sequence_parallel"] = lay.sequence_parallel
    if lay.strategy == "deepspeed":
        out.update({"strategy.zero_stage": lay.zero_stage, "strategy.offload_optimizer": lay.offload_optimizer,
                    "strategy.offload_params": lay.offload_params})
    return out


def shape_of(cfg: Any, device: str = "cuda") -> Shape:
    """The Shape of a composed config: its model built on the meta device (LoRA and freezing applied); a
    pretrained model's sizes come from its config.json. `device`: what trainer.precision=auto resolves for.
    Tensor parallelism: the key/value heads and MLP width from the built model, the parameters its plan keeps
    whole, and why this config cannot use it (`tp_off`), as config.py's checks of strategy.tp say."""
    import torch

    from llmtrain.errors import ConfigError
    from llmtrain.models import adapters, quantize
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
        model = spec.skeleton(cfg.model, info)
        # model.quantize: the layers a 4-bit base would hold in 4 bits (quantize.apply's), counted on the plain model
        quant = [model.get_submodule(q).weight.numel() for q in quantize.quantizable(model, spec.block_classes(model))
                 ] if quantize.setting(cfg.model) else []
        model = adapters.apply(model, cfg.model)
    p = spec.plan_profile(model)
    if p is None:
        why = "; a Llama, Qwen2, Mistral, Qwen3 or GPT-2 dir is planned as model=llama_tiny or model=gpt2_small with " \
              "model.pretrained=<dir> (the dir's sizes win)" if spec.name == "hf" else ""
        raise ConfigError("model", f"llmtrain-plan models the gpt2 and llama families, not {spec.name!r}{why}")
    params = list({id(x): x for x in model.parameters()}.values())
    n = sum(x.numel() for x in params)
    nt = sum(x.numel() for x in params if x.requires_grad)
    block_types = spec.block_classes(model)
    block_mods = [b for b in model.modules() if isinstance(b, block_types)]
    blocks = [sum(x.numel() for x in b.parameters()) for b in block_mods]
    t = cfg.trainer
    precision = getattr(t.precision, "value", str(t.precision))
    if precision == "auto":  # bf16 on the GPUs planned for (all in the table have it), fp32 on CPU
        precision = Precision.bf16.value if device == "cuda" else Precision.fp32.value
    seq = int(cfg.data.seq_len)
    s = Shape(n_params=n, n_trainable=nt, n_layer=p.n_layer, n_embd=p.n_embd, n_head=p.n_head,
              vocab_padded=p.vocab_rows, block_params=max(blocks, default=0), root_params=n - sum(blocks),
              seq_len=seq, micro_batch=int(t.micro_batch_size), accum=int(t.grad_accum_steps), precision=precision,
              checkpointing=bool(t.gradient_checkpointing),
              optimizer=getattr(cfg.optim.name, "value", str(cfg.optim.name)),
              flops_per_token=float(spec.flops_per_token(model, seq)), act_values=p.act_values,
              act_fp32_autocast=p.act_fp32_autocast, act_low_autocast=p.act_low_autocast, family=spec.name,
              n_quantized=sum(quant), quant_layer=max(quant, default=0),
              lora=adapters.lora_settings(cfg.model) is not None)
    return _with_tp(s, cfg, spec, model, block_mods)


def _with_tp(s: Shape, cfg: Any, spec: Any, model: Any, blocks: list[Any]) -> Shape:
    """`s` with what tensor parallelism needs: widths, whole parameters, activation split, whether it applies."""
    from llmtrain.models.gpt2 import core

    dims = getattr(core(model), "dims", None)
    kv = int(getattr(dims, "num_key_value_heads", s.n_head))
    width = int(getattr(dims, "intermediate_size", 0) or 4 * s.n_embd)  # GPT-2's MLP: 4·C
    s = replace(s, n_kv_head=kv, mlp_width=width, tp_off=_tp_off(cfg, spec, s.precision))
    if s.tp_off:
        return s
    root = spec.tp_root_plan(cfg.model) or {}
    whole, block_whole = _tp_whole(model, blocks, spec.tp_plan(cfg.model), root)
    split, along = _act_split(s)
    asked = getattr(cfg.strategy, "sequence_parallel", None)
    sp = bool(root) if asked is None else bool(asked) and bool(root)
    return replace(s, whole_params=whole, block_whole=block_whole, act_split=split, act_seq=along,
                   sequence_parallel=sp and not getattr(cfg.model, "dropout", 0.0),
                   tp_vocab="head" in root.values())


def _tp_off(cfg: Any, spec: Any, precision: str) -> str:
    """Why `cfg` cannot run tensor parallelism (config.py's strategy.tp checks, the family's `check_tp` of what no
    degree can split, e.g. GPT-2's dropout), or ""."""
    from llmtrain.errors import ConfigError
    from llmtrain.models import adapters, quantize

    t = cfg.trainer
    if spec.tp_plan(cfg.model) is None:
        return f"model={spec.name} has no tensor-parallel plan"
    try:
        spec.check_tp(cfg.model, 1)  # sizes always split 1 way: what it refuses, it refuses for every degree
    except ConfigError as e:
        return e.message
    if quantize.setting(cfg.model):
        return "a 4-bit base is not split over tensor-parallel ranks"
    if adapters.lora_settings(cfg.model) is not None:
        return "LoRA adapters are not split over tensor-parallel ranks"
    if t.compile:
        return "trainer.compile with tensor parallelism is not supported"
    if precision == "fp16":
        return "trainer.precision=fp16 with tensor parallelism is not supported"
    if getattr(cfg.model, "dropout", 0.0) and t.dropout_rng != "global":
        return "model.dropout > 0 needs trainer.dropout_rng=global under tensor parallelism"
    return ""


def _tp_whole(model: Any, blocks: list[Any], block_plan: dict[str, str] | None,
              root_plan: dict[str, str] | None) -> tuple[int, int]:
    """(parameters TP keeps whole on every rank, those of the largest block): all but the colwise projections,
    the rowwise projections' weights, and the embedding and head of the root plan."""
    split: set[int] = set()
    for b in blocks:
        for path, style in (block_plan or {}).items():
            if style.endswith(("colwise", "rowwise")):  # colwise, qkv_colwise: all; rowwise: the weight
                split |= {id(x) for name, x in b.get_submodule(path).named_parameters()
                          if style.endswith("colwise") or name == "weight"}
    for path, style in (root_plan or {}).items():
        if style in ("embedding", "head"):
            split |= {id(x) for x in model.get_submodule(path).parameters()}
    params = {id(x): x for x in model.parameters()}
    whole = sum(x.numel() for i, x in params.items() if i not in split)
    per_block = [sum(x.numel() for x in b.parameters() if id(x) not in split) for b in blocks]
    return whole, max(per_block, default=0)


def _act_split(s: Shape) -> tuple[float, float]:
    """(values per token and layer on split heads or MLP width, the norms' inputs and normalised values) of
    the family's profile: Llama's 6·C + (3·nh + 2·nkv)·hd + 4·I splits (3·nh + 2·nkv)·hd + 4·I over the TP
    ranks, and 4·C of the rest along the sequence with SP (the two norms' outputs, gathered, stay whole);
    GPT-2's 17·C splits 13·C (q, k, v, the attention's output, c_proj's input, GeLU's input and the MLP
    projection's) and keeps the layer norms' inputs (2·C) and outputs (2·C) whole."""
    if s.family == "llama":
        return s.act_values - 6.0 * s.n_embd, 4.0 * s.n_embd
    if s.family == "gpt2":
        return 13.0 * s.n_embd, 2.0 * s.n_embd
    return 0.0, 0.0


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
    q = f", {s.n_quantized / 1e6:,.1f}M in 4 bits" if s.n_quantized else ""
    head = (f"{s.family} {s.n_params / 1e6:,.1f}M params ({s.n_trainable / 1e6:,.1f}M trainable{q}), "
            f"{s.n_layer} layers × {s.n_embd}, micro-batch {s.micro_batch} × {s.seq_len} × accum {s.accum}, "
            f"{s.precision}"
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
    if s.tp_off:
        lines.append(f"tensor parallel layouts: none ({s.tp_off})")
    return "\n".join(lines)


CLUSTER_KEYS = ("gpus", "gpus_per_node", "gpu")


def split_cluster(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """({gpus | gpus_per_node | gpu: value} of the `cluster.*` items, the config overrides left for compose)."""
    from llmtrain.errors import ConfigError

    found, rest = {}, []
    for o in overrides:
        key, eq, value = o.lstrip("+").partition("=")
        if not key.startswith("cluster."):
            rest.append(o)
            continue
        name = key.removeprefix("cluster.")
        if name not in CLUSTER_KEYS or not eq or not value:
            raise ConfigError(key, f"expected one of {', '.join(f'cluster.{k}=<value>' for k in CLUSTER_KEYS)}")
        found[name] = value
    return found, rest


def cluster_of(args: argparse.Namespace, found: dict[str, str]) -> Cluster:
    """The cluster of --nodes/--gpus-per-node/--gpu and the `cluster.*` overrides (which win): cluster.gpus must
    be a multiple of the GPUs per node (8 unless given; fewer GPUs than that: one node of them)."""
    from llmtrain.errors import ConfigError

    gpn = _count(found, "gpus_per_node") or (8 if args.gpus_per_node is None else args.gpus_per_node)
    nodes = args.nodes
    if "gpus" in found:
        gpus = _count(found, "gpus")
        gpn = gpus if "gpus_per_node" not in found and args.gpus_per_node is None and gpus < gpn else gpn
        if gpus % gpn:
            raise ConfigError("cluster.gpus", f"{gpus} is not a multiple of cluster.gpus_per_node={gpn}; use "
                                              f"{max(gpn, gpus - gpus % gpn)} or {gpus + gpn - gpus % gpn}")
        nodes = gpus // gpn
    if nodes < 1 or gpn < 1:
        raise ConfigError("--nodes" if nodes < 1 else "--gpus-per-node", "must be >= 1")
    return Cluster(nodes, gpn, found.get("gpu", args.gpu), args.mfu_ceiling)


def _count(found: dict[str, str], name: str) -> int | None:
    from llmtrain.errors import ConfigError

    if name not in found:
        return None
    try:
        n = int(found[name])
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"cluster.{name}", f"must be a whole number >= 1 (got {found[name]!r})")
    return n


def main(argv: list[str] | None = None) -> None:
    from llmtrain.cli import report_and_exit
    from llmtrain.errors import ConfigError

    ap = argparse.ArgumentParser(prog="llmtrain-plan", description=__doc__.split("\n\n")[0],
                                 epilog="Other arguments are config overrides, as for llmtrain-train, and "
                                        "cluster.gpus=N cluster.gpus_per_node=M cluster.gpu=NAME.")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=None, help="8 unless given")
    ap.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)}")
    ap.add_argument("--mfu-ceiling", type=float, default=0.55, help="fraction of the peak the matmuls reach")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args, overrides = ap.parse_known_args(argv)
    try:
        if not 0 < args.mfu_ceiling <= 1:
            raise ConfigError("--mfu-ceiling", f"must be in (0, 1] (got {args.mfu_ceiling})")
        found, overrides = split_cluster(overrides)
        cluster = cluster_of(args, found)
        cluster.spec  # noqa: B018  (checks the GPU name)
        cfg = compose(overrides)
        s = shape_of(cfg)
        rows = plan(s, cluster)
    except ConfigError as e:
        report_and_exit(e)
    choice = _choice(s, cluster)
    if args.json:
        print(json.dumps({"shape": asdict(s), "cluster": asdict(cluster), "rows": [r.as_dict() for r in rows],
                          "choice": choice}, indent=1))
    else:
        print(table(rows, cluster, s))
        print(f"choice: {choice['layout'] or 'none'} ({choice['reason']})")


def _choice(s: Shape, cluster: Cluster) -> dict[str, Any]:
    """choose's answer for the CLI: {layout, reason, runner_up, overrides}; layout None when nothing fits."""
    from llmtrain.errors import ConfigError

    try:
        best, second, why = choose(s, cluster)
    except ConfigError as e:
        return {"layout": None, "reason": str(e), "runner_up": None, "overrides": None}
    return {"layout": best.strategy, "reason": why, "runner_up": second.strategy if second else None,
            "overrides": overrides_of(best)}


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
