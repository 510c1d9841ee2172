"""llmtrain-plan: its memory estimate against the memory a real step takes on this CPU (within 15%), its
parameter and FLOP counts, what it says fits, and its CLI. Its communication volumes are checked against
counted collective bytes in tests/distributed (test_strategies, test_deepspeed)."""

from __future__ import annotations

import ctypes
import threading
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
    """Peak bytes of one training step (the third), through the single strategy and the GPT-2 spec: a thread
    samples malloc's in-use bytes throughout. What malloc holds at rest beyond weights and optimizer state
    (allocator caches of the math libraries, filled on first use) is subtracted, as a GPU's
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
    step()
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
