"""llmtrain-plan: its memory estimate against the memory a real step takes on this CPU (within 15%), its
parameter and FLOP counts, what it says fits, and its CLI. Its communication volumes are checked against
counted collective bytes in tests/distributed (test_strategies, test_deepspeed)."""

from __future__ import annotations

import ctypes
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import compose

from llmtrain.plan import GIB, GPUS, STRATEGIES, Cluster, communication, memory, peak, plan, shape_of


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):
        return None


LIBC = _libc()


def _in_use() -> int:
    """Bytes malloc has handed out and not taken back (heap + mmapped chunks): torch's CPU tensors live there."""
    m = LIBC.mallinfo2()
    return m.uordblks + m.hblkhd


def measure_step_peak(overrides: list[str]) -> tuple[float, object]:
    """Peak bytes of one training step (the highest of the third to fifth), through the single strategy and the
    model's spec: a thread samples malloc's in-use bytes throughout. What malloc holds at rest beyond weights and
    optimizer state (allocator caches of the math libraries, filled on first use) is subtracted, as a GPU's
    max_memory_allocated would not count it."""
    from llmtrain.distributed import SetupArgs, StrategyConfig, build_strategy
    from llmtrain.distributed.dist import Dist
    from llmtrain.models import adapters
    from llmtrain.models.base import DataInfo, get_model_spec
    from llmtrain.optim import build_optimizer
    from llmtrain.precision import Precision

    cfg = compose(overrides)
    t, spec = cfg.trainer, get_model_spec(cfg.model.family)
    info = DataInfo(task="lm", vocab_size=257, eos_token_id=256)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 257, (t.micro_batch_size, cfg.data.seq_len), generator=g),
                "labels": torch.randint(0, 257, (t.micro_batch_size, cfg.data.seq_len), generator=g)}
               for _ in range(t.grad_accum_steps)]
    base = _in_use()
    torch.manual_seed(0)
    model = adapters.apply(spec.build(cfg.model, info), cfg.model)
    s = build_strategy(StrategyConfig(), Dist(), torch.device("cpu"))
    s.setup(model, lambda m: build_optimizer(cfg.optim, m),
            SetupArgs(Precision.fp32, t.gradient_checkpointing, False, spec.block_classes(model), t.micro_batch_size,
                      t.grad_accum_steps, 1.0))
    high, stop = [0], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            high[0] = max(high[0], _in_use())

    def step() -> None:
        for i, b in enumerate(batches):
            with s.micro_step(sync_grads=i == len(batches) - 1):
                loss, n = spec.loss(s.model, b)
                s.backward(loss / n)
        s.clip_grad_norm(1.0)
        s.step()

    step()
    step()
    at_rest = _in_use()
    kept = sum(p.numel() * 4 for p in model.parameters()) + sum(
        v.numel() * v.element_size() for st in s.optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    sampler = threading.Thread(target=poll, daemon=True)
    sampler.start()
    for _ in range(3):  # the same step 3 times: a poll that misses a short-lived peak (the CPU busy with other
        step()  # tests) gets two more chances at it
    stop.set()
    sampler.join()
    runtime = at_rest - base - kept
    return high[0] - base - runtime, cfg


TINY = ["experiment=gpt2_tiny", "data.tokenizer=byte", "model.n_head=4", "trainer.precision=fp32", "optim=adamw"]
LLAMA = ["experiment=llama_tiny", "data.tokenizer=byte", "trainer.precision=fp32", "optim=adamw"]
SHAPES = {
    "6x256, 8x128": ["model.n_layer=6", "model.n_embd=256", "model.n_positions=128", "data.seq_len=128",
                     "trainer.micro_batch_size=8"],
    "6x256, 8x128, checkpointing": ["model.n_layer=6", "model.n_embd=256", "model.n_positions=128",
                                    "data.seq_len=128", "trainer.micro_batch_size=8",
                                    "trainer.gradient_checkpointing=true"],
    "6x256, 4x128 x accum 2": ["model.n_layer=6", "model.n_embd=256", "model.n_positions=128", "data.seq_len=128",
                               "trainer.micro_batch_size=4", "trainer.grad_accum_steps=2"],
    "8x512, 4x256, checkpointing": ["model.n_layer=8", "model.n_embd=512", "model.n_positions=256",
                                    "data.seq_len=256", "trainer.micro_batch_size=4",
                                    "trainer.gradient_checkpointing=true"],
}


LLAMA_SHAPES = {
    "llama 4x256 (8/2 heads, MLP 704), 8x128": ["model.n_layer=4", "model.n_embd=256", "model.n_head=8",
                                                "model.n_kv_head=2", "model.intermediate_size=704",
                                                "model.n_positions=128", "data.seq_len=128",
                                                "trainer.micro_batch_size=8"],
    "llama 4x256, 8x128, checkpointing": ["model.n_layer=4", "model.n_embd=256", "model.n_head=8", "model.n_kv_head=2",
                                          "model.intermediate_size=704", "model.n_positions=128", "data.seq_len=128",
                                          "trainer.micro_batch_size=8", "trainer.gradient_checkpointing=true"],
}


@pytest.mark.skipif(LIBC is None, reason="needs glibc's mallinfo2 to measure host memory")
@pytest.mark.parametrize("name", [*SHAPES, *LLAMA_SHAPES])
def test_memory_estimate_is_within_15_percent_of_a_real_step(name: str, one_thread: None) -> None:
    measured, cfg = measure_step_peak([*TINY, *SHAPES[name]] if name in SHAPES else [*LLAMA, *LLAMA_SHAPES[name]])
    s = shape_of(cfg)
    estimate = peak(s, memory(s, "single", 1))
    print(f"\n{name}: measured {measured / 2**20:.1f} MiB, planned {estimate / 2**20:.1f} MiB "
          f"({estimate / measured - 1:+.1%})")
    assert abs(estimate / measured - 1) <= 0.15


def test_parameters_and_flops_are_gpt2s() -> None:
    """GPT-2 124M: 124.4M parameters at the padded vocabulary, 0.855 GFLOP per token at 1024 (6N + 12LTC)."""
    s = shape_of(compose(["experiment=gpt2_small", "data.tokenizer=gpt2"]))
    assert s.vocab_padded == 50304 and s.n_layer == 12 and s.n_embd == 768
    assert s.n_params == 124_475_904  # wpe 1024x768 + wte 50304x768 (tied) + 12 blocks + ln_f
    assert s.flops_per_token == pytest.approx(0.855e9, rel=0.01)
    lora = shape_of(compose(["experiment=gpt2_small", "data.tokenizer=gpt2", "model.lora.enabled=true"]))
    assert lora.n_params > s.n_params and 0 < lora.n_trainable < s.n_params / 50


def test_what_fits_follows_the_memory() -> None:
    """GPT-2 XL full fine-tuning: too big for one 24 GB GPU alone, fits sharded over 8 H100s; offload moves
    the optimizer state to host memory; ZeRO-3 divides the weights by the world size."""
    s = shape_of(compose(["experiment=gpt2_xl", "data.tokenizer=gpt2", "trainer.micro_batch_size=1",
                          "trainer.gradient_checkpointing=true", "trainer.precision=bf16"]))
    one = {r.strategy: r for r in plan(s, Cluster(1, 1, "l4"))}
    assert not one["single"].fits and one["zero2+offload"].memory.host > 12 * GIB
    eight = {r.strategy: r for r in plan(s, Cluster(1, 8, "h100"))}
    assert eight["fsdp"].fits and eight["zero3"].fits
    z2, z3 = memory(s, "deepspeed", 8, zero_stage=2), memory(s, "deepspeed", 8, zero_stage=3)
    assert z3.weights < z2.weights / 2 and z3.optimizer == z2.optimizer
    assert communication(s, "deepspeed", 8, zero_stage=3)[1] > communication(s, "deepspeed", 8, zero_stage=2)[1]


@pytest.mark.parametrize("overrides", [["model=gpt2_xl", "data.tokenizer=gpt2"],
                                       ["model=llama3_8b", "data.tokenizer=byte", "trainer.grad_accum_steps=4"]])
def test_every_column_is_an_amount_held_at_the_peak(overrides: list[str]) -> None:
    """Each memory column is what a GPU holds at the step's peak (none negative, a credit hidden in a cost), the
    columns add up to the peak, and the phase named is the one whose total that is."""
    s = shape_of(compose([*overrides, "trainer.micro_batch_size=16"]))
    rows = plan(s, Cluster(1, 8, "h100"))
    for r in rows:
        m = r.memory
        parts = (m.weights, m.grads, m.optimizer, m.activations, m.buffers)
        assert min(parts) >= 0 and sum(parts) == pytest.approx(m.total), (r.strategy, parts)
        assert r.phase in ("forward", "backward")
    for label, kw in STRATEGIES:
        raw = memory(s, "deepspeed" if label.startswith("zero") else label, 1 if label == "single" else 8, **kw)
        assert {r.strategy: r for r in rows}[label].memory.total == pytest.approx(peak(s, raw))
    if s.accum == 1:  # unsharded gradients outweigh the activations; sharded ones do not: both phases occur
        assert {r.strategy: r.phase for r in rows if r.strategy in ("ddp", "fsdp")} == {"ddp": "backward",
                                                                                       "fsdp": "forward"}


def test_peaks_are_the_mfu_tables() -> None:
    """Every GPU the plan knows has a peak per precision in MFU's table (llmtrain.tracking.flops), read under
    the name torch reports for it."""
    from llmtrain.tracking.flops import lookup_peak_tflops

    for name, (device, *_) in GPUS.items():
        for precision in ("bf16", "fp16", "fp32"):
            tflops = lookup_peak_tflops(f"NVIDIA {device}", precision)
            assert tflops is not None, (name, precision)
            assert Cluster(gpu=name).peak_flops(precision) == tflops * 1e12, (name, precision)


def test_cli_table_json_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from llmtrain.plan import main

    main(["experiment=gpt2_small", "data.tokenizer=gpt2", "--nodes", "2", "--gpus-per-node", "8"])
    out = capsys.readouterr().out
    assert "| zero3 |" in out and "fits:" in out and "2 node(s) × 8 h100" in out
    main(["experiment=gpt2_small", "data.tokenizer=gpt2", "--json"])
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {r["strategy"] for r in rows} >= {"single", "ddp", "fsdp", "zero1", "zero2", "zero3"}
    for argv, key in ((["--gpu", "tpu9"], "--gpu"), (["trainer.micro_batchsize=3"], "trainer.micro_batchsize"),
                      (["experiment=linear_regression"], "model")):
        with pytest.raises(SystemExit) as ei:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert ei.value.code == 2 and len(err) == 1 and err[0].startswith(f"llmtrain: error: {key}"), err


def test_parameters_and_flops_of_the_llama_presets() -> None:
    """SmolLM2-135M and Llama-3-8B as published: their parameter counts, grouped KV heads and an untied head
    counted, FLOPs 6N + 12·L·T·(n_head·head_dim) at 2048 with N = every parameter but an untied input embedding."""
    small = shape_of(compose(["experiment=llama_tiny", "model=smollm2_135m", "data.seq_len=2048"]))
    assert small.family == "llama" and small.n_params == 134_515_008 and small.n_layer == 30
    assert small.flops_per_token == pytest.approx(6 * 134_515_008 + 12 * 30 * 2048 * 576, rel=1e-9)
    big = shape_of(compose(["experiment=llama_tiny", "model=llama3_8b", "data.seq_len=2048",
                            "trainer.micro_batch_size=1", "trainer.gradient_checkpointing=true"]))
    assert big.n_params == 8_030_261_248 and big.vocab_padded == 128256
    untied_input = 128256 * 4096
    assert big.flops_per_token == pytest.approx(6 * (8_030_261_248 - untied_input) + 12 * 32 * 2048 * 4096, rel=1e-9)
    eight = {r.strategy: r for r in plan(big, Cluster(1, 8, "h100"))}
    assert not eight["ddp"].fits and eight["fsdp"].fits  # 8B with Adam: sharded only


def test_a_transformers_model_is_one_line_naming_the_families_planned(tmp_path: Path) -> None:
    """model=hf has no plan profile: one line (no traceback from loading weights on the meta device)."""
    from transformers import AutoConfig

    from llmtrain.errors import ConfigError

    AutoConfig.for_model("gpt_neox", vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as ei:
        shape_of(compose(["model=hf", f"model.pretrained={tmp_path}", "data.tokenizer=byte"]))
    assert ei.value.key == "model" and "not 'hf'" in ei.value.message and "model=llama_tiny" in ei.value.message


# parallel layouts: tensor parallel (TP), sequence parallel (SP), HSDP, and the layout search -----------------------
LLAMA_SMALL = [*LLAMA, "model.n_layer=4", "model.n_embd=256", "model.n_head=8", "model.n_kv_head=2",
               "model.intermediate_size=704", "model.n_positions=128", "data.seq_len=128", "trainer.micro_batch_size=8",
               "trainer.precision=bf16"]


def _llama8b(*more: str) -> object:
    return shape_of(compose(["model=llama3_8b", "data.seq_len=2048", "trainer.micro_batch_size=1", *more]))


def test_tp_divides_the_block_weights_and_the_split_activations() -> None:
    """Llama-3-8B: TP=2 keeps the norms whole (65 of them, 4096 wide) and halves every other parameter; per token
    and layer 96,256 values are kept, of which (3·32 + 2·8)·128 + 4·14336 = 71,680 on split heads and MLP width
    (halved) and 4·4096 the norms' inputs and normalised values (halved with SP only)."""
    from llmtrain.plan import activation_bytes, tp_share

    s = _llama8b("trainer.precision=fp32")
    assert s.whole_params == 65 * 4096 and s.block_whole == 2 * 4096 and (s.n_kv_head, s.mlp_width) == (8, 14336)
    assert s.act_values == 96_256 and s.act_split == 71_680 and s.act_seq == 4 * 4096
    n, nt, block, _ = tp_share(s, 2)
    assert n == (8_030_261_248 - 65 * 4096) / 2 + 65 * 4096 and nt == n
    assert block == (s.block_params - 8192) / 2 + 8192
    one, two = memory(s, "ddp", 8), memory(s, "ddp", 8, tp=2)
    assert two.weights == 4 * n and two.weights < one.weights / 2 + 4 * 65 * 4096 + 1
    assert activation_bytes(s, False, tp=2)[0] == 4 * (96_256 - 71_680 / 2)
    assert activation_bytes(s, False, tp=2, sp=True)[0] == 4 * (96_256 - 71_680 / 2 - 4 * 4096 / 2)
    assert two.activations < one.activations and two.buffers < one.buffers
    fsdp1, fsdp2 = memory(s, "fsdp", 8), memory(s, "fsdp", 4, tp=2)  # 8 GPUs as dp8 or dp4×tp2
    assert fsdp2.weights < fsdp1.weights and fsdp2.activations < fsdp1.activations
    # GPT-2 124M splits its projections (c_attn's fused q, k, v with its bias) and wte (tied to the head): whole are
    # wpe, ln_f and per block both layer norms (4·768) and the two rowwise projections' biases (2·768)
    gpt2 = shape_of(compose(["experiment=gpt2_small", "data.tokenizer=gpt2"]))
    assert gpt2.block_whole == 6 * 768 and gpt2.whole_params == 1024 * 768 + 2 * 768 + 12 * 6 * 768
    assert (gpt2.act_split, gpt2.act_seq) == (13 * 768, 2 * 768)


def test_sequence_parallel_makes_activations_smaller_than_tp_alone() -> None:
    """SP splits the residual stream and the norms over the TP ranks: less kept per token than TP without it,
    with and without checkpointing (whose saved block inputs it splits too). The layouts use it where the config
    lets them and the TP degree divides the sequence."""
    for more in ((), ("trainer.gradient_checkpointing=true",)):
        s = _llama8b(*more)
        for strategy, world in (("fsdp", 4), ("ddp", 4), ("single", 1)):
            tp, sp = memory(s, strategy, world, tp=2), memory(s, strategy, world, tp=2, sp=True)
            assert sp.activations < tp.activations, (strategy, more)
            assert sp.weights == tp.weights and sp.buffers <= tp.buffers
    s = _llama8b()
    assert s.sequence_parallel and all(r.layout.sequence_parallel for r in plan(s, Cluster(1, 8)) if r.layout.tp > 1)
    assert replace(s, seq_len=2050).split_sequence(2) and not replace(s, seq_len=2050).split_sequence(4)
    off = _llama8b("strategy.sequence_parallel=false")  # as asked: the layouts keep the sequence whole
    assert not off.sequence_parallel and not any(r.layout.sequence_parallel for r in plan(off, Cluster(1, 8)))


def test_tp_communication_is_the_formula() -> None:
    """A small Llama (4 layers × 256, micro-batch 8 × 128: x = 1024 · 256 values per activation tensor) in bf16,
    written out by hand. FSDP computes in bf16 (2 bytes everywhere): without SP, per layer 2 all-reduces in the
    forward and 2 in the backward, the embedding's and the loss's: (4·4 + 2) · 2 bytes · x, plus the loss's 3
    reductions of 1024 fp32 values; with SP the same as reduce-scatters and as all-gathers (the same bytes on the
    wire), and the norms' weight gradients all-reduced. Tensor parallelism alone under autocast with checkpointing and 2 accumulation steps: the forward's
    all-reduces in bf16, o_proj's again in the recomputation (it stops before down_proj, whose output the backward
    does not need), the norms' gradients and the embedding in fp32: per micro-step 4·(3·2 + 2·4) + 4 + 2 = 62
    bytes · x."""
    from llmtrain.plan import Layout, tp_communication, transfers

    s = shape_of(compose(LLAMA_SMALL))
    x = 1024 * 256
    assert tp_communication(s, 2, False, True) == {"tp.all_reduce": 18 * 2 * x + 3 * 4 * 1024}
    norms = (2 * 4 + 1) * 256  # with SP the norms' weights see a shard of the tokens: their gradients summed
    assert tp_communication(s, 2, True, True) == {"tp.reduce_scatter": 18 * 2 * x, "tp.all_gather": 18 * 2 * x,
                                                  "tp.all_reduce": 3 * 4 * 1024 + 2 * norms}
    assert tp_communication(s, 1, False, True) == {}
    cluster = Cluster(1, 2, "h100")
    no_sp, sp = (transfers(s, Layout("fsdp", 2, 1, flag), cluster)[0] for flag in (False, True))
    assert no_sp.wire == sp.wire - 2 * norms == 18 * 2 * x + 3 * 4 * 1024  # ring over 2: ½ per gather, 1× per
    # all-reduce
    assert no_sp.link == "nvlink" and not no_sp.hidden  # on the critical path
    ck = shape_of(compose([*LLAMA_SMALL, "trainer.gradient_checkpointing=true", "trainer.grad_accum_steps=2"]))
    assert tp_communication(ck, 2, False, False) == {"tp.all_reduce": 2 * (62 * x + 3 * 4 * 1024)}
    gpt2 = shape_of(compose([*TINY, "model.n_layer=2", "model.n_embd=128", "data.seq_len=64",
                             "trainer.micro_batch_size=2", "trainer.precision=bf16"]))
    x2 = 2 * 64 * 128  # GPT-2: 2 layers × 4 all-reduces, the embedding's, the loss's, of x2 bf16 values
    assert gpt2.tp_vocab and tp_communication(gpt2, 2, False, True) == {"tp.all_reduce": 10 * x2 * 2 + 12 * 128}
    blocks_only = replace(gpt2, tp_vocab=False)  # a plan that leaves the embedding, head and loss whole
    assert tp_communication(blocks_only, 2, False, True) == {"tp.all_reduce": 8 * x2 * 2}
    assert memory(blocks_only, "fsdp", 2, tp=2).buffers == memory(gpt2, "fsdp", 2).buffers
    assert memory(gpt2, "fsdp", 2, tp=2).buffers < memory(gpt2, "fsdp", 2).buffers


def test_tp_rows_step_time_and_data_parallel_share() -> None:
    """fsdp dp4×tp2 on 8 GPUs: FSDP's collectives carry the TP shard (half the split parameters); the step is
    half the compute of dp8's micro-step plus TP's communication at NVLink speed, not overlapped."""
    s = _llama8b()
    cluster = Cluster(1, 8, "h100")
    rows = {r.strategy: r for r in plan(s, cluster)}
    dp8, tp2 = rows["fsdp"], rows["fsdp dp4×tp2"]
    assert tp2.layout.tp == 2 and tp2.layout.sequence_parallel and tp2.gpus == 8
    assert tp2.comm["reduce_scatter"] == pytest.approx(dp8.comm["reduce_scatter"] / 2, rel=1e-4)
    tp_wire = 0.5 * (tp2.comm["tp.reduce_scatter"] + tp2.comm["tp.all_gather"]) + tp2.comm["tp.all_reduce"]
    compute = s.flops_per_token * s.tokens / 2 / (cluster.peak_flops("bf16") * cluster.mfu_ceiling)
    assert tp2.step_s >= compute + tp_wire / cluster.link_bandwidth("nvlink")
    assert tp2.tokens_per_s == pytest.approx(s.tokens * 4 / tp2.step_s)


def test_hsdp_crosses_nodes_with_less_than_fsdp_over_every_gpu() -> None:
    """2 nodes × 8: HSDP 2×8 gathers and reduce-scatters within each node and all-reduces only its shard's fp32
    gradients (4 · 8,030,261,248 / 8 bytes, ring over 2: sent once) across nodes; FSDP over all 16 sends its
    gathers and reduce-scatter over the inter-node link."""
    s = _llama8b()
    rows = {r.strategy: r for r in plan(s, Cluster(2, 8, "h100"))}
    fsdp, hsdp = rows["fsdp"], rows["hsdp 2×8"]
    assert hsdp.wire_by_link["inter-node"] == 4 * 8_030_261_248 / 8
    assert hsdp.wire_by_link["inter-node"] < fsdp.wire_by_link["inter-node"] / 4
    assert hsdp.comm["all_reduce"] == 4 * 8_030_261_248 / 8 and hsdp.wire_by_link["nvlink"] > 0
    assert "nvlink" not in fsdp.wire_by_link and hsdp.step_s < fsdp.step_s
    assert hsdp.memory.optimizer == pytest.approx(2 * fsdp.memory.optimizer)  # sharded over 8, not 16
    assert {"hsdp 2×4×tp2", "hsdp 2×2×tp4", "fsdp dp8×tp2", "ddp dp8×tp2", "fsdp dp2×tp8"} <= set(rows)


def test_choose_finds_a_tp_layout_where_plain_fsdp_does_not_fit() -> None:
    """Llama-3-8B with micro-batch 16 × 128 on 8 L4s (24 GB): FSDP, ZeRO-3 and DDP do not fit; a TP layout
    does, is the fastest that fits, and the runner-up is named in the reason."""
    from llmtrain.plan import choose, overrides_of

    s = shape_of(compose(["model=llama3_8b"]))
    cluster = Cluster(1, 8, "l4")
    rows = {r.strategy: r for r in plan(s, cluster)}
    assert not rows["fsdp"].fits and not rows["zero3"].fits
    best, second, why = choose(s, cluster)
    assert best.fits and best.layout.tp > 1 and best.gpus == 8
    assert second is not None and second.fits and second.tokens_per_s <= best.tokens_per_s
    assert all(r.tokens_per_s <= best.tokens_per_s for r in rows.values() if r.fits and r.gpus == 8)
    assert f"next {second.strategy}" in why and "\n" not in why and "GiB of 24" in why
    assert overrides_of(best) == {"strategy.name": best.layout.strategy, "strategy.tp": best.layout.tp,
                                  "strategy.dp_replicate": 1, "strategy.sequence_parallel": True}
    assert overrides_of(rows["zero3+offload"]) == {"strategy.name": "deepspeed", "strategy.tp": 1,
                                                   "strategy.dp_replicate": 1, "strategy.zero_stage": 3,
                                                   "strategy.offload_optimizer": True, "strategy.offload_params": True}


def test_choose_when_nothing_fits_is_one_line_naming_what_to_change() -> None:
    """Llama-3-8B fits no layout of one L4 (not even ZeRO-3 with offload) at 4 × 2048 tokens, 64 × 2048 with
    checkpointing, or 1 × 65536 with checkpointing: a ConfigError naming checkpointing first, then the
    micro-batch, then the GPUs."""
    from llmtrain.errors import ConfigError
    from llmtrain.plan import choose

    ckpt = "trainer.gradient_checkpointing=true"
    for more, key in ((("data.seq_len=2048", "trainer.micro_batch_size=4"), "trainer.gradient_checkpointing"),
                      (("data.seq_len=2048", "trainer.micro_batch_size=64", ckpt), "trainer.micro_batch_size"),
                      (("data.seq_len=65536", "trainer.micro_batch_size=1", ckpt), "cluster.gpus")):
        with pytest.raises(ConfigError) as ei:
            choose(shape_of(compose(["model=llama3_8b", *more])), Cluster(1, 1, "l4"))
        assert ei.value.key == key and "\n" not in str(ei.value) and "no layout fits 1 × l4" in ei.value.message


def test_tp_never_crosses_a_node_nor_splits_what_does_not_divide() -> None:
    """TP degrees divide the GPUs per node and the heads (32), key/value heads (8) and MLP width: 2 GPUs per node
    offer tp2 only, 16 per node tp ≤ 8 (the 8 KV heads); GPT-2 small's 12 heads on 8 GPUs tp2 and tp4; none for
    transformers' GPT-2 (no TP plan), LoRA or GPT-2's dropout."""
    s = _llama8b()
    for cluster, most in ((Cluster(4, 2, "h100"), 2), (Cluster(1, 16, "h100"), 8), (Cluster(2, 4, "h100"), 4)):
        rows = plan(s, cluster)
        tps = {r.layout.tp for r in rows}
        assert max(tps) == most and all(cluster.gpus_per_node % t == 0 for t in tps), (cluster, tps)
    gpt2 = shape_of(compose(["experiment=gpt2_small", "data.tokenizer=gpt2"]))
    rows = [r for r in plan(gpt2, Cluster(1, 8)) if r.layout.tp > 1]
    assert {r.layout.tp for r in rows} == {2, 4}
    for more, why in ((["model.impl=hf"], "no tensor-parallel plan"),
                      (["model.dropout=0.1", "trainer.dropout_rng=global"], "dropout")):  # GPT-2's check_tp
        off = shape_of(compose(["experiment=gpt2_small", "data.tokenizer=gpt2", *more]))
        assert why in off.tp_off and "trainer.dropout_rng" not in off.tp_off, off.tp_off
        assert all(r.layout.tp == 1 for r in plan(off, Cluster(1, 8)))
    lora = _llama8b("model.lora.enabled=true")
    assert "LoRA" in lora.tp_off and lora.tp_degrees() == []


@pytest.mark.parametrize("more", [[], ["trainer.gradient_checkpointing=true", "trainer.grad_accum_steps=4"],
                                  ["trainer.precision=fp32", "trainer.micro_batch_size=4"]])
def test_every_column_of_the_layouts_is_an_amount_held_at_the_peak(more: list[str]) -> None:
    """The TP, SP and HSDP rows: no column negative, the columns add up to the peak, each row's memory is the
    peak of memory() for its layout, and the comm columns are positive for every collective named."""
    s = _llama8b(*more)
    rows = [r for r in plan(s, Cluster(2, 8, "h100")) if r.layout.tp > 1 or r.layout.dp_replicate > 1]
    assert len(rows) == 9
    for r in rows:
        m, lay = r.memory, r.layout
        parts = (m.weights, m.grads, m.optimizer, m.activations, m.buffers)
        assert min(parts) >= 0 and sum(parts) == pytest.approx(m.total), (r.strategy, parts)
        raw = memory(s, lay.strategy, r.gpus // lay.tp // lay.dp_replicate, tp=lay.tp, sp=lay.sequence_parallel)
        assert m.total == pytest.approx(peak(s, raw)) and r.phase in ("forward", "backward")
        assert all(v > 0 for v in r.comm.values()) and r.step_s > 0 and 0 < r.mfu < 1


def test_cli_cluster_overrides_choice_and_bad_cluster(capsys: pytest.CaptureFixture) -> None:
    """`cluster.gpus=16 cluster.gpus_per_node=8` plans 2 nodes × 8 (the items never reach Hydra), prints the
    layout rows and a last line `choice: <layout> (<reason>)`; --json has the rows and the choice; a cluster.gpus
    that is not a multiple of the GPUs per node, or an unknown cluster key, is one line and exit 2."""
    import json

    from llmtrain.plan import main

    main(["model=llama3_8b", "cluster.gpus=16", "cluster.gpus_per_node=8"])
    out = capsys.readouterr().out.strip().splitlines()
    assert "2 node(s) × 8 h100" in out[0] and "| fsdp dp8×tp2 |" in "\n".join(out)
    assert "| hsdp 2×4×tp2 |" in "\n".join(out) and out[-1].startswith("choice: ") and "next " in out[-1]
    main(["model=llama3_8b", "cluster.gpus=4", "cluster.gpu=a100", "--json"])
    got = json.loads(capsys.readouterr().out)
    assert got["cluster"]["nodes"] == 1 and got["cluster"]["gpus_per_node"] == 4 and got["cluster"]["gpu"] == "a100"
    assert {"tp4", "fsdp dp2×tp2"} <= {r["strategy"] for r in got["rows"]}
    assert got["choice"]["layout"] in {r["strategy"] for r in got["rows"]} and got["choice"]["overrides"]
    for argv, key in ((["cluster.gpus=12", "cluster.gpus_per_node=8"], "cluster.gpus"),
                      (["cluster.gpus=two"], "cluster.gpus"), (["cluster.nodes=2"], "cluster.nodes")):
        with pytest.raises(SystemExit) as ei:
            main(["model=llama3_8b", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert ei.value.code == 2 and len(err) == 1 and err[0].startswith(f"llmtrain: error: {key}"), err
