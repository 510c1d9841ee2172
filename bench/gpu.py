"""GPT-2 124M (or Llama-3.2-1B) on one GPU, in one process: llmtrain against the loops people compare it with,
then llmtrain's own options, then the largest GPT-2-family model each strategy trains on this GPU.

    python bench/gpu.py                      # GPT-2: everything (about 10 minutes on an H100)
    python bench/gpu.py --only loops --steps 30
    python bench/gpu.py --model llama        # Llama-3.2-1B: the loops (add --only loops options for the options)
    python bench/gpu.py --device cpu --tiny  # a minute's dry run of every row on the CPU, tiny model
    python bench/gpu.py --device cpu --tiny --model llama --steps 6 --batch 2  # the Llama rows' dry run

Rows, each tokens/s (median step after warm-up), MFU (against the measured bf16 matmul peak and the
vendor's) and peak GPU memory, with llmtrain-plan's estimate of that memory beside it. Every row runs in bf16
(autocast, or llmtrain's trainer.precision=bf16), on the CPU too, so the rows of one table compare:

1. loops: a raw loop over transformers' GPT2LMHeadModel + torch.compile; a nanoGPT-style GPT-2 (fused QKV,
   SDPA, tied head) + compile; HF Trainer with torch_compile; llmtrain model.impl=hf; llmtrain
   model.impl=native (all bf16 autocast, fused AdamW, clip 1.0, sequence 1024, vocabulary 50304). With
   --model llama, Llama-3.2-1B's shape (16 layers x 2048, 32 query / 8 KV heads, SwiGLU 8192, vocabulary
   128256, tied embeddings, RoPE theta 500000 with llama3 scaling; sequence 2048, batch 4): a raw loop over
   transformers' LlamaForCausalLM (SDPA) + torch.compile; llmtrain model=hf on a dir holding that
   LlamaForCausalLM config (save_pretrained) and a tokenizer, model.random_init=true (transformers' modules);
   llmtrain model=llama3_2_1b (llmtrain's own Llama). With --tiny: llama_tiny's shape (4 layers x 128, 4 / 2
   heads, SwiGLU 352; sequence 64), the vocabulary still Llama 3's;
2. options: llmtrain native (GPT-2, or with --model llama llmtrain's Llama) with and without gradient
   checkpointing, under single, ddp, fsdp, DeepSpeed ZeRO-2 and ZeRO-3 at world size 1, and fine-tuning
   memory: LoRA r16 and QLoRA (model.quantize=nf4) with checkpointing;
3. largest (GPT-2 only): for each strategy (with checkpointing and, for DeepSpeed, CPU offload), the largest
   n_layer × n_embd of a doubling-then-bisecting search that trains 3 steps without running out of memory.

MFU counts 6·N + 12·L·T·(heads·head_dim) FLOPs per token, N every weight a token multiplies (a tied embedding
once, as the output layer); the llmtrain rows planned for use their model spec's count (the same formula).
Data: random token ids below the model's vocabulary (throughput does not depend on them). DeepSpeed's ops need
TORCH_CUDA_ARCH_LIST=9.0 on H100/H200 images whose default (9.0a) breaks its JIT build; this script sets it when
unset.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

VOCAB = 50304
RESULTS: list[dict[str, Any]] = []
# transformers LlamaConfig arguments: Llama-3.2-1B's published shape (conf/model/llama3_2_1b.yaml), and
# llama_tiny's (conf/model/llama_tiny.yaml) with Llama 3's vocabulary for the dry run
LLAMA_VOCAB = 128256
LLAMA_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 64, "intermediate_size": 8192, "vocab_size": LLAMA_VOCAB, "tie_word_embeddings": True,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}}
LLAMA_TINY = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 32, "intermediate_size": 352, "vocab_size": LLAMA_VOCAB, "tie_word_embeddings": True,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


class Setup:
    """The shared shape of every row: GPT-2 124M, or Llama-3.2-1B (model "llama")."""

    def __init__(self, device: str, tiny: bool, steps: int, batch: int | None, model: str = "gpt2") -> None:
        self.device = torch.device(device)
        self.tiny, self.model = tiny, model
        self.steps, self.batch = steps, batch or (16 if model == "gpt2" else 4)
        if model == "gpt2":
            self.seq = 64 if tiny else 1024
            self.n_layer, self.n_head, self.n_embd = (2, 2, 64) if tiny else (12, 12, 768)
            self.vocab, self.data_vocab = VOCAB, 50257  # the model's rows (padded), the ids the data holds
        else:
            self.seq = 64 if tiny else 2048
            self.llama = LLAMA_TINY if tiny else LLAMA_1B
            self.preset = "llama_tiny" if tiny else "llama3_2_1b"
            lc = self.llama
            self.n_layer, self.n_head, self.n_embd = (lc["num_hidden_layers"], lc["num_attention_heads"],
                                                      lc["hidden_size"])
            self.n_kv_head, self.head_dim, self.inner = (lc["num_key_value_heads"], lc["head_dim"],
                                                         lc["intermediate_size"])
            self.vocab = self.data_vocab = lc["vocab_size"]
        self.dtype = torch.bfloat16
        self.warmup = 3 if tiny else 10

    def describe(self) -> str:
        if self.model == "gpt2":
            return f"GPT-2 {self.n_layer}x{self.n_embd}"
        name = "Llama (llama_tiny's shape)" if self.tiny else "Llama-3.2-1B"
        return (f"{name} {self.n_layer}x{self.n_embd}, {self.n_head}/{self.n_kv_head} heads, SwiGLU {self.inner}, "
                f"vocabulary {self.vocab}")

    def model_overrides(self) -> list[str]:
        """llmtrain's model: GPT-2 at this shape, or the Llama preset (its vocabulary the model's, not the data's
        tokenizer's: llama_tiny's is unset)."""
        if self.model == "gpt2":
            return [f"model.n_layer={self.n_layer}", f"model.n_head={self.n_head}", f"model.n_embd={self.n_embd}",
                    f"model.n_positions={self.seq}", "model.vocab_size=50257"]
        return [f"model={self.preset}", f"model.vocab_size={self.vocab}"]

    def batches(self) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator(device="cpu").manual_seed(0)
        data = torch.randint(0, self.data_vocab, (64, self.seq + 1), generator=g)

        def next_batch(i: list[int] = [0]) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: B006
            rows = data[(torch.arange(self.batch) + i[0] * self.batch) % len(data)]
            i[0] += 1
            x, y = rows[:, :-1], rows[:, 1:]
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

        return next_batch

    def flops_per_token(self) -> float:
        """6·N + 12·L·T·(heads·head_dim): N every weight a token multiplies (the tied embedding once, as the output
        layer; GPT-2's position embeddings are a lookup), the attention scores and their weighted sum besides."""
        c, L, t = self.n_embd, self.n_layer, self.seq
        if self.model == "gpt2":
            n = L * (12 * c * c + 13 * c) + 2 * c + VOCAB * c
            return 6 * n + 12 * L * t * c
        nh, kv, hd = self.n_head, self.n_kv_head, self.head_dim
        attn = 2 * c * nh * hd + 2 * c * kv * hd  # q, o; k, v (grouped-query), no biases
        n = L * (attn + 3 * c * self.inner + 2 * c) + c + self.vocab * c  # SwiGLU, two RMSNorms; final norm; head
        return 6 * n + 12 * L * t * nh * hd


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def time_loop(s: Setup, step: Callable[[], None]) -> float:
    """Median seconds per step after warm-up (a device sync after each step: these loops read nothing)."""
    times = []
    for i in range(s.steps):
        t0 = time.perf_counter()
        step()
        sync(s.device)
        if i >= s.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def record(s: Setup, section: str, name: str, seconds: float | None, command: str, peak: float | None,
           plan_gib: float | None = None, extra: dict[str, Any] | None = None) -> None:
    tps = s.batch * s.seq / seconds if seconds else None
    RESULTS.append({"section": section, "row": name, "tokens_per_s": tps, "step_s": seconds, "peak_gib": peak,
                    "plan_gib": plan_gib, "command": command, **(extra or {})})
    mem = f"{peak:.1f} GiB" if peak is not None else "-"
    plan = f" (plan {plan_gib:.1f})" if plan_gib is not None else ""
    print(f"[{section}] {name}: {tps:,.0f} tok/s, {mem}{plan}" if tps else f"[{section}] {name}: failed", flush=True)
    if not tps and extra and extra.get("error"):
        print(f"    {extra['error']}", flush=True)


# 1. loops --------------------------------------------------------------------------------------------------------
def hf_model(s: Setup) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=s.seq, n_embd=s.n_embd, n_layer=s.n_layer, n_head=s.n_head,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(cfg).to(s.device)


def compiled_loop(s: Setup, model: nn.Module, loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
                  name: str, fn: str) -> None:
    """Time a plain loop: torch.compile, bf16 autocast, fused AdamW, clip 1.0."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=s.device.type == "cuda")
    compiled = torch.compile(model)
    nxt = s.batches()

    def step() -> None:
        x, y = nxt()
        with torch.autocast(s.device.type, dtype=s.dtype):
            value = loss(compiled, x, y)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak(s.device)
    record(s, "loops", name, time_loop(s, step), f"bench/gpu.py ({fn})", peak_gib(s.device))


def raw_hf_compile(s: Setup) -> None:
    compiled_loop(s, hf_model(s), lambda m, x, y: m(input_ids=x, labels=x).loss,
                  "raw loop, HF GPT2LMHeadModel + compile", "raw_hf_compile")


def llama_config(s: Setup) -> Any:
    from transformers import LlamaConfig

    cfg = LlamaConfig(**s.llama, attention_dropout=0.0)
    cfg._attn_implementation = "sdpa"
    return cfg


def raw_llama_compile(s: Setup) -> None:
    from transformers import LlamaForCausalLM

    with torch.device(s.device):  # initialised where it trains (1.2B parameters)
        model = LlamaForCausalLM(llama_config(s))
    compiled_loop(s, model, lambda m, x, y: m(input_ids=x, labels=x).loss,
                  "raw loop, HF LlamaForCausalLM + compile", "raw_llama_compile")


class NanoBlock(nn.Module):
    def __init__(self, c: int, nh: int) -> None:
        super().__init__()
        self.nh = nh
        self.ln_1, self.ln_2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.c_attn, self.c_proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.c_fc, self.mlp_proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.nh, C // self.nh).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    """nanoGPT's model: fused QKV, SDPA, tied head."""

    def __init__(self, s: Setup) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, s.n_embd), nn.Embedding(s.seq, s.n_embd)
        self.h = nn.ModuleList(NanoBlock(s.n_embd, s.n_head) for _ in range(s.n_layer))
        self.ln_f = nn.LayerNorm(s.n_embd)
        self.head = nn.Linear(s.n_embd, VOCAB, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.wte(x) + self.wpe(torch.arange(x.shape[1], device=x.device))
        for b in self.h:
            h = b(h)
        logits = self.head(self.ln_f(h))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))


def nanogpt_compile(s: Setup) -> None:
    compiled_loop(s, NanoGPT(s).to(s.device), lambda m, x, y: m(x, y), "nanoGPT-style GPT-2 + compile",
                  "nanogpt_compile")


def hf_trainer(s: Setup) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = hf_model(s)
    nxt = s.batches()
    rows = [nxt()[0][0].cpu() for _ in range(s.batch * 4)]

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": rows[i], "labels": rows[i]}

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            sync(s.device)
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            sync(s.device)
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=s.batch, max_steps=s.steps,
                                 bf16=True, torch_compile=True, logging_steps=10**9,
                                 save_strategy="no", report_to=[], dataloader_num_workers=0,
                                 use_cpu=s.device.type == "cpu", optim="adamw_torch_fused" if s.device.type == "cuda"
                                 else "adamw_torch", max_grad_norm=1.0)
        reset_peak(s.device)
        Trainer(model=model, args=args, train_dataset=Data(), callbacks=[Clock()]).train()
    record(s, "loops", "HF Trainer + torch_compile", statistics.median(times[s.warmup:]),
           "bench/gpu.py (hf_trainer)", peak_gib(s.device))


# llmtrain rows ---------------------------------------------------------------------------------------------------
def corpus(root: Path, s: Setup) -> Path:
    """A prepared dataset of random token ids below the model's vocabulary (uint16 for GPT-2's, uint32 for
    Llama 3's), as llmtrain-prepare writes it. Its tokenizer is GPT-2's (nothing is decoded)."""
    import numpy as np

    from llmtrain.data.shards import FORMAT_VERSION

    out = root / "data"
    if (out / "meta.json").is_file():
        return out
    out.mkdir(parents=True)
    g = np.random.default_rng(0)
    n_train, n_val = 4_000_000 if not s.tiny else 200_000, 100_000 if not s.tiny else 20_000
    vocab = s.data_vocab
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    shards = {}
    for split, n in (("train", n_train), ("val", n_val)):
        path = out / f"{split}_000.bin"
        g.integers(0, vocab, n, dtype=np.dtype(dtype)).tofile(path)
        shards[split] = [{"file": path.name, "tokens": n}]
    tok_dir = REPO.parent / "shared" / "data" / "gpt2-tokenizer"
    from llmtrain.data import tokenizers as toks

    tok = toks.build_tokenizer(str(tok_dir) if tok_dir.is_dir() else "byte", 0)
    tok.save_pretrained(str(out / "tokenizer"))
    meta = {"format": FORMAT_VERSION, "hash": "random", "train_tokens": n_train, "val_tokens": n_val,
            "vocab_size": vocab, "max_token_id": vocab - 1, "eos_token_id": vocab - 1, "dtype": dtype,
            "tokenizer": {"spec": "gpt2", "hash": toks.tokenizer_hash(tok), "dir": "tokenizer"},
            "sources": ["random"], "documents": 1, "characters": 0, "replaced_bytes": 0, "val_fraction": 0.0,
            "shard_tokens": n_train, "shards": shards, "seconds": 0}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def llama_hf_dir(root: Path, s: Setup) -> Path:
    """A Hugging Face model dir for model=hf: the raw loop's LlamaForCausalLM config (save_pretrained; no weights:
    model.random_init=true builds transformers' modules from it) and the data's tokenizer."""
    from llmtrain.data.tokenizers import Tokenizer

    out = root / "llama-hf"
    if not (out / "config.json").is_file():
        llama_config(s).save_pretrained(out)
        Tokenizer.from_dir(corpus(root, s) / "tokenizer").save_pretrained(out)
    return out


def llmtrain_overrides(s: Setup, data: Path, extra: list[str], model: list[str] | None = None) -> list[str]:
    """The llmtrain-train command line of a row: `model` replaces the Setup's model (s.model_overrides())."""
    model = s.model_overrides() if model is None else model
    return ["experiment=gpt2_small", *model, f"data.source={data}", f"data.seq_len={s.seq}",
            f"trainer.micro_batch_size={s.batch}", "trainer.grad_accum_steps=1", f"trainer.max_steps={s.steps}",
            "trainer.eval_every=0",
            "trainer.ckpt_every=0", "trainer.sample_tokens=0", "logger.log_every=1", "logger.progress=false",
            "logger.tensorboard=false", "logger.plots=false", "trainer.compile=true",
            f"trainer.device={s.device.type}", "trainer.precision=bf16",  # every row of a table: one precision
            *extra]


def llmtrain_row(s: Setup, root: Path, section: str, name: str, extra: list[str],
                 model: list[str] | None = None) -> float | None:
    """One llmtrain run in this process; returns its median step time, records the row (with llmtrain-plan's
    memory estimate and the model spec's FLOPs per token, where the planner models the family)."""
    from llmtrain.errors import ConfigError
    from llmtrain.plan import Cluster, peak, plan, shape_of
    from llmtrain.train import run

    data = corpus(root, s)
    run_dir = root / f"run-{len(RESULTS)}"
    overrides = llmtrain_overrides(s, data, extra, model) + [f"hydra.run.dir={run_dir}"]
    cfg = compose(overrides)
    try:
        shape = shape_of(cfg)
    except ConfigError:  # a family the planner does not model (model=hf): no estimate
        shape = None
    strategy = cfg.strategy.name.value
    label = {"deepspeed": f"zero{cfg.strategy.zero_stage}"}.get(strategy, strategy)
    if strategy == "deepspeed" and (cfg.strategy.offload_optimizer or cfg.strategy.offload_params):
        label += "+offload"
    rows = {r.strategy: r for r in plan(shape, Cluster(1, 1, "h100"))} if shape else {}
    plan_gib = peak(shape, rows[label].memory) / 2**30 if label in rows else None
    flops = {"flops_per_token": shape.flops_per_token} if shape else {}
    reset_peak(s.device)
    try:
        run(cfg, run_dir)
    except (torch.OutOfMemoryError, SystemExit, RuntimeError, ConfigError) as e:
        record(s, section, name, None, "llmtrain-train " + " ".join(overrides), None, plan_gib,
               {"error": str(e).splitlines()[0][:200] if str(e) else type(e).__name__, **flops})
        return None
    finally:
        torch._dynamo.reset()
    from llmtrain.rundir import METRICS_FILE

    recs = [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]
    times = [r["step_time_s"] for r in recs if "step_time_s" in r][s.warmup:]
    t = statistics.median(times) if times else None
    record(s, section, name, t, "llmtrain-train " + " ".join(o for o in overrides if not o.startswith("hydra.")),
           peak_gib(s.device), plan_gib, flops)
    return t


def compose(overrides: list[str]) -> Any:
    from llmtrain.plan import compose as _compose

    return _compose(overrides)


# 3. the largest model --------------------------------------------------------------------------------------------
def trains(s: Setup, root: Path, layers: int, width: int, extra: list[str]) -> bool:
    """Whether 3 steps of an n_layer × n_embd GPT-2 fit (batch 1 × seq, checkpointing on)."""
    from llmtrain.train import run

    heads = max(1, width // 128)
    overrides = llmtrain_overrides(s, corpus(root, s), [*extra, f"model.n_layer={layers}", f"model.n_embd={width}",
                                                         f"model.n_head={heads}", "trainer.micro_batch_size=1",
                                                         "trainer.max_steps=3", "trainer.compile=false",
                                                         "trainer.gradient_checkpointing=true"])
    run_dir = root / f"big-{len(RESULTS)}-{layers}x{width}"
    try:
        run(compose([*overrides, f"hydra.run.dir={run_dir}"]), run_dir)
        return (run_dir / "final").is_dir()
    except (torch.OutOfMemoryError, SystemExit, RuntimeError):
        return False
    finally:
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


def largest(s: Setup, root: Path, label: str, extra: list[str]) -> None:
    """Grow GPT-2 at its aspect ratio (layers : width as in the XL, 48 : 1600) until a run fails, then bisect."""
    def size(k: float) -> tuple[int, int]:
        width = max(64, int(round(1600 * k / 64)) * 64)
        return max(1, int(round(48 * k))), width

    lo, hi, k = 0.0, None, 1.0 if not s.tiny else 0.05
    while hi is None and k < (64 if not s.tiny else 0.2):  # the dry run stops growing early
        if trains(s, root, *size(k), extra):
            lo, k = k, k * 2
        else:
            hi = k
    for _ in range(4 if hi is not None and not s.tiny else 0):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if trains(s, root, *size(mid), extra) else (lo, mid)
    layers, width = size(lo) if lo else (0, 0)
    n = layers * (12 * width * width + 13 * width) + width * (VOCAB + s.seq + 2)
    RESULTS.append({"section": "largest", "row": label, "n_layer": layers, "n_embd": width, "params": n,
                    "command": f"bench/gpu.py --only largest ({' '.join(extra)})"})
    print(f"[largest] {label}: {layers} x {width} ({n / 1e9:.2f}B parameters)", flush=True)


def matmul_peak(device: torch.device) -> float | None:
    """Measured bf16 matmul TFLOP/s (8192³, best of 20), the reference for MFU."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    best = math.inf
    for _ in range(20):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * 8192**3 / best / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny model: a dry run of every row")
    ap.add_argument("--model", choices=["gpt2", "llama"], default="gpt2",
                    help="GPT-2 124M (sequence 1024), or Llama-3.2-1B (sequence 2048)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 16 for gpt2, 4 for llama)")
    ap.add_argument("--only", nargs="+", choices=["loops", "options", "largest"],
                    help="sections (default: all three for gpt2, loops for llama; largest is GPT-2's)")
    ap.add_argument("--out", type=Path, help="default bench-gpu.json (gpt2), bench-gpu-llama.json (llama)")
    a = ap.parse_args()
    only = a.only or (["loops", "options", "largest"] if a.model == "gpt2" else ["loops"])
    if a.model == "llama" and "largest" in only:
        ap.error("--only largest grows GPT-2's shape; with --model llama choose loops and/or options")
    out = a.out or Path("bench-gpu.json" if a.model == "gpt2" else f"bench-gpu-{a.model}.json")
    s = Setup(a.device, a.tiny, a.steps, a.batch, a.model)
    if s.device.type == "cpu":  # the dry run's QLoRA row: bitsandbytes' CPU path (a run refuses it otherwise)
        os.environ.setdefault("LLMTRAIN_QUANTIZE_ON_CPU", "1")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    measured = matmul_peak(s.device)
    name = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "cpu"
    from llmtrain.tracking.flops import lookup_peak_tflops

    table = lookup_peak_tflops(name, "bf16")
    print(f"{datetime.date.today()} · {name} · torch {torch.__version__} · measured bf16 matmul peak "
          f"{measured or 0:.0f} TFLOP/s (table {table or 0:.0f})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "loops" in only:
            for fn in (raw_hf_compile, nanogpt_compile, hf_trainer) if s.model == "gpt2" else (raw_llama_compile,):
                try:
                    fn(s)
                except Exception as e:  # a row that fails is reported, the others still run
                    record(s, "loops", fn.__name__, None, f"bench/gpu.py ({fn.__name__})", None, None,
                           {"error": f"{type(e).__name__}: {str(e)[:200]}"})
                finally:
                    torch._dynamo.reset()
            if s.model == "gpt2":
                llmtrain_row(s, root, "loops", "llmtrain model.impl=hf", ["model.impl=hf"])
                llmtrain_row(s, root, "loops", "llmtrain model.impl=native", [])
            else:  # transformers' LlamaForCausalLM through llmtrain, then llmtrain's own Llama
                hf = ["model=hf", f"model.pretrained={llama_hf_dir(root, s)}", "model.random_init=true",
                      "model.attn_implementation=sdpa"]
                llmtrain_row(s, root, "loops", "llmtrain model=hf (LlamaForCausalLM)", [], hf)
                llmtrain_row(s, root, "loops", f"llmtrain model={s.preset}", [])
        if "options" in only:
            llmtrain_row(s, root, "options", "native, gradient checkpointing", ["trainer.gradient_checkpointing=true"])
            for label, extra in (("single", []), ("ddp", ["strategy=ddp"]), ("fsdp", ["strategy=fsdp"]),
                                 ("zero2", ["strategy=deepspeed", "strategy.zero_stage=2", "trainer.compile=false"]),
                                 ("zero3", ["strategy=deepspeed", "strategy.zero_stage=3", "trainer.compile=false"])):
                llmtrain_row(s, root, "options", f"native, {label} (world size 1)", extra)  # DeepSpeed: eager
            lora = ["model.lora.enabled=true", "model.lora.r=16", "model.lora.alpha=32", "model.lora.dropout=0",
                    "trainer.gradient_checkpointing=true"]
            for label, extra in (("LoRA r16", lora), ("QLoRA (nf4 base) r16", [*lora, "model.quantize=nf4"])):
                llmtrain_row(s, root, "options", f"native, {label}, gradient checkpointing", extra)
        if "largest" in only:
            for label, extra in (("single", []), ("fsdp", ["strategy=fsdp"]),
                                 ("zero2+offload", ["strategy=deepspeed", "strategy.zero_stage=2",
                                                    "strategy.offload_optimizer=true"]),
                                 ("zero3+offload", ["strategy=deepspeed", "strategy.zero_stage=3",
                                                    "strategy.offload_optimizer=true", "strategy.offload_params=true"])):
                largest(s, root, label, extra)
    fpt = s.flops_per_token()
    print(f"\n{datetime.date.today()} · {name} · {s.describe()}, seq {s.seq}, batch {s.batch}, "
          f"{fpt / 1e9:.3f} GFLOP/token\n")
    print("| section | row | tokens/s | MFU (measured peak) | MFU (table) | peak GiB | plan GiB |\n|---|---|---|---|---|---|---|")
    for r in RESULTS:
        if r["section"] == "largest":
            print(f"| largest | {r['row']} | {r['n_layer']} x {r['n_embd']} = {r['params'] / 1e9:.2f}B params | | | | |")
            continue
        tps, f = r["tokens_per_s"], r.get("flops_per_token") or fpt  # llmtrain rows: their model spec's count
        mfu_m = f"{f * tps / (measured * 1e12):.1%}" if tps and measured else "-"
        mfu_t = f"{f * tps / (table * 1e12):.1%}" if tps and table else "-"
        cells = [f"{tps:,.0f}" if tps else "failed", mfu_m, mfu_t,
                 f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-",
                 f"{r['plan_gib']:.1f}" if r.get("plan_gib") is not None else "-"]
        print(f"| {r['section']} | {r['row']} | {' | '.join(cells)} |")
    out.write_text(json.dumps({"date": str(datetime.date.today()), "device": name, "model": s.describe(),
                               "seq": s.seq, "batch": s.batch, "measured_tflops": measured, "table_tflops": table,
                               "flops_per_token": fpt, "rows": RESULTS}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
