"""The single-process loop: accumulation ≡ one big batch, exact resume, run-dir contract, precisions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SHARED_DATA, TINY_LM, ckpt_state, compose, losses, read_metrics

from llmtrain import checkpoint as ckpt
from llmtrain.config import Config
from llmtrain.context import RunContext
from llmtrain.data.base import DataModule
from llmtrain.distributed import SetupArgs, StrategyConfig, build_strategy
from llmtrain.distributed.dist import Dist
from llmtrain.models.base import DataInfo, get_model_spec
from llmtrain.models.gpt2 import GPT2ModelConfig
from llmtrain.optim import OptimConfig, Scheduler, SchedulerConfig, build_optimizer
from llmtrain.precision import Precision
from llmtrain.tracking import LoggerConfig, MetricsLogger
from llmtrain.train import run
from llmtrain.trainer import Trainer, TrainerConfig


class PaddedLM:
    """16 sequences of length 12 whose targets are padded (-100) to uneven lengths."""

    def __init__(self, vocab: int = 50) -> None:
        g = np.random.default_rng(0)
        self.ids = torch.from_numpy(g.integers(0, vocab, size=(16, 12)))
        self.labels = torch.from_numpy(g.integers(0, vocab, size=(16, 12)))
        for i in range(16):  # sequence i keeps 1 + (5*i mod 12) targets
            self.labels[i, 1 + (5 * i) % 12 :] = -100

    def __len__(self) -> int:
        return 16

    def get(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        t = torch.from_numpy(idx)
        return {"input_ids": self.ids[t], "labels": self.labels[t]}


class PaddedData(DataModule):
    info = DataInfo(task="lm", vocab_size=50, eos_token_id=49)

    def split(self, name: str) -> PaddedLM:
        return PaddedLM()


def _one_step_params(micro: int, accum: int, optim: str) -> dict[str, torch.Tensor]:
    spec = get_model_spec("gpt2")
    torch.manual_seed(0)
    mcfg = GPT2ModelConfig(n_layer=2, n_head=2, n_embd=16, n_positions=16)
    model = spec.build(mcfg, PaddedData.info)
    strategy = build_strategy(StrategyConfig(), Dist(), torch.device("cpu"))
    tcfg = TrainerConfig(max_steps=1, micro_batch_size=micro, grad_accum_steps=accum, grad_clip=0.0,
                         eval_every=0, ckpt_every=0)
    strategy.setup(model, lambda m: build_optimizer(OptimConfig(name=optim, lr=0.1), m),
                   SetupArgs(Precision.fp32, False, False, (), micro, accum, 0.0))
    sched = Scheduler(SchedulerConfig(name="constant"), strategy.optimizer, 0.1, 1)
    logger = MetricsLogger(LoggerConfig(progress=False), Path("/nonexistent"), enabled=False, total_steps=1)
    conf = Config(model=mcfg, data=None, trainer=tcfg, logger=LoggerConfig(progress=False, log_every=1))
    ctx = RunContext(conf, Path("/nonexistent"), Dist(), torch.device("cpu"), Precision.fp32, spec, PaddedData(), {})
    trainer = Trainer(ctx, strategy, sched, logger)
    trainer.train_step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_accumulation_equals_one_big_batch_with_uneven_padding() -> None:
    # SGD: new params = old - lr * grad, so equal params mean equal gradients. (Adam's first step is
    # ~lr * sign(grad), which would turn rounding noise on near-zero gradients into lr-sized jumps.)
    optim = "sgd"
    big = _one_step_params(micro=8, accum=1, optim=optim)
    for micro, accum in [(4, 2), (2, 4), (1, 8)]:
        acc = _one_step_params(micro=micro, accum=accum, optim=optim)
        for k in big:
            torch.testing.assert_close(acc[k], big[k], rtol=1e-5, atol=1e-6, msg=f"{k} ({micro}x{accum})")


def _tiny(run_dir: Path, *extra: str):
    return compose([*TINY_LM, *extra, f"hydra.run.dir={run_dir}"])


def test_run_dir_contract(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    last = run(_tiny(run_dir, "trainer.max_steps=6", "trainer.eval_every=3", "trainer.ckpt_every=3",
                     "trainer.sample_tokens=16"), run_dir)
    assert (run_dir / "config.yaml").is_file()
    recs = read_metrics(run_dir)
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    for r in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"} <= set(r)
    assert [r["step"] for r in recs if "eval_loss" in r] == [3, 6]
    assert last["loss"] == train[-1]["loss"]
    steps = [p.name for p in ckpt.list_checkpoints(run_dir)]
    assert steps == ["step_00000003", "step_00000006"]
    files = set(ckpt.read_manifest(run_dir / "checkpoints" / "step_00000006")["files"])
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "trainer.pt", "rng_rank0.pt"} <= files
    state = ckpt.load_torch(run_dir / "checkpoints" / "step_00000006" / "trainer.pt")
    assert state["step"] == 6 and "loader" in state and "scheduler" in state
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(run_dir / "final")
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert model.config.vocab_size == len(tok) == 257  # byte tokenizer + <|endoftext|>
    assert tok.decode(tok("def f(x):\n")["input_ids"]) == "def f(x):\n"
    assert len((run_dir / "samples.txt").read_text()) > 0


@pytest.mark.parametrize("impl", ["native", "hf"])
def test_gpt2_loss_and_count_equal_cross_entropy_on_padded_labels(impl: str) -> None:
    """The spec's (loss sum, target count) on labels padded with -100 are F.cross_entropy's sum and the count
    of real targets, for both GPT-2 implementations (the chunked fused loss included)."""
    import torch.nn.functional as F

    spec = get_model_spec("gpt2")
    torch.manual_seed(0)
    model = spec.build(GPT2ModelConfig(n_layer=2, n_head=2, n_embd=16, n_positions=16, impl=impl),
                       PaddedData.info).eval()
    batch = PaddedLM().get(np.arange(16))
    with torch.no_grad():
        loss, count = spec.loss(model, batch)
        logits = model(input_ids=batch["input_ids"]) if impl == "native" else model(batch["input_ids"]).logits
    want = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100,
                           reduction="sum")
    assert int(count) == int((batch["labels"] != -100).sum()) == spec.count(batch) < batch["labels"].numel()
    torch.testing.assert_close(loss.float(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", [[], ["model.dropout=0.1", "trainer.grad_accum_steps=2", "data.prefetch=2"]],
                         ids=["plain", "dropout+accum+prefetch"])
def test_resume_is_bit_identical(tmp_path: Path, extra: list[str], capsys: pytest.CaptureFixture) -> None:
    """A run that died after step 6 (newest checkpoint: step 4) resumes from step 4 (it says so, and restores
    weights, optimizer state, RNG, data position and schedule) and ends bit-identical to the run that never
    stopped. The schedule warms up for 2 steps, then decays: the resumed steps are in the decay."""
    full = tmp_path / "full"
    args = ["trainer.max_steps=8", "trainer.ckpt_every=4", "trainer.keep_checkpoints=5", "trainer.eval_every=0",
            "scheduler=cosine", "scheduler.warmup_steps=2", *extra]
    run(_tiny(full, *args), full)
    lrs = [r["lr"] for r in read_metrics(full) if "lr" in r]
    assert lrs[0] < lrs[1] == lrs[2] and all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False)), lrs  # warmup, decay
    # A run that "died" after step 6 with its last checkpoint at step 4.
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000004", part / "checkpoints" / "step_00000004")
    shutil.copy(full / "config.yaml", part / "config.yaml")
    stale = [r for r in read_metrics(full) if r["step"] <= 6]
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    capsys.readouterr()
    run(_tiny(part, *args), part)
    assert f"resuming from {part / 'checkpoints' / 'step_00000004'} at step 4" in capsys.readouterr().out
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(1, 9))  # records after the checkpoint were replaced, not duplicated
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]  # bit-identical
    assert [r["lr"] for r in read_metrics(part) if "lr" in r] == lrs
    sa, sb = (ckpt_state(d / "checkpoints" / "step_00000008") for d in (full, part))
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k])
    moments = [(x["exp_avg"], y["exp_avg"], x["step"], y["step"])
               for x, y in zip(sa["optim"]["state"].values(), sb["optim"]["state"].values(), strict=True)]
    assert all(torch.equal(m, n) and int(s) == int(t) == 8 for m, n, s, t in moments)  # Adam's state restored


def test_interrupted_save_is_ignored(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run(_tiny(run_dir, "trainer.max_steps=2", "trainer.ckpt_every=1", "trainer.keep_checkpoints=5"), run_dir)
    # a crash mid-save: a temp dir and a dir without its manifest
    (run_dir / "checkpoints" / ".tmp-step_00000003").mkdir()
    broken = run_dir / "checkpoints" / "step_00000004"
    shutil.copytree(run_dir / "checkpoints" / "step_00000002", broken)
    (broken / "manifest.json").unlink()
    assert ckpt.resolve_resume("auto", run_dir).name == "step_00000002"


@pytest.mark.parametrize("override", ["trainer.resume=never", "model.n_layer=3"],
                         ids=["resume-never", "another-model"])
def test_refused_invocations_leave_the_run_untouched(tmp_path: Path, override: str) -> None:
    """resume=never on a run with checkpoints, or resuming it with another model: exit 2, nothing written."""
    run_dir = tmp_path / "run"
    run(_tiny(run_dir, "trainer.max_steps=2"), run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as ei:
        run(_tiny(run_dir, "trainer.max_steps=4", override), run_dir)
    assert ei.value.code == 2
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    if override.startswith("model"):
        run(_tiny(run_dir, "trainer.max_steps=4"), run_dir)  # extending max_steps is allowed
        assert sorted(losses(run_dir)) == [1, 2, 3, 4]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_tracks_fp32(tmp_path: Path, precision: str) -> None:
    ref = tmp_path / "fp32"
    run(_tiny(ref, "trainer.max_steps=5"), ref)
    mp = tmp_path / precision
    run(_tiny(mp, "trainer.max_steps=5", f"trainer.precision={precision}"), mp)
    a, b = losses(ref), losses(mp)
    assert all(np.isfinite(v) for v in b.values())
    assert max(abs(a[s] - b[s]) / a[s] for s in a) < 0.02  # bf16 keeps ~3 significant digits
    if precision == "fp16":
        assert all(r["loss_scale"] > 0 for r in read_metrics(mp) if "loss" in r)


def test_gradient_checkpointing_matches(tmp_path: Path) -> None:
    ref, gc = tmp_path / "ref", tmp_path / "gc"
    run(_tiny(ref, "trainer.max_steps=4"), ref)
    run(_tiny(gc, "trainer.max_steps=4", "trainer.gradient_checkpointing=true"), gc)
    a, b = losses(ref), losses(gc)
    assert max(abs(a[s] - b[s]) / a[s] for s in a) < 1e-6


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_pretrained_start(tmp_path: Path, dropout: float) -> None:
    """model.pretrained starts from the given weights, in train mode.

    Without dropout the first logged loss equals the pretrained model's loss on the first batch; with
    dropout it must differ from the eval-mode loss (from_pretrained hands models over in eval mode).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    src = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))
    src.save_pretrained(tmp_path / "pre")
    run_dir = tmp_path / "run"
    cfg = _tiny(run_dir, "trainer.max_steps=1", f"model.pretrained={tmp_path / 'pre'}")
    run(cfg, run_dir)
    from llmtrain.data.base import build_data

    data = build_data(cfg.data)
    loader = data.loader("train", 4, seed=cfg.trainer.seed, shuffle=True, rank=0, world_size=1,
                         device=torch.device("cpu"))
    src.eval()
    with torch.no_grad():
        s, n = get_model_spec("gpt2").loss(src, next(loader))
    if dropout == 0.0:
        assert losses(run_dir)[1] == pytest.approx((s / n).item(), rel=1e-6)
    else:
        assert abs(losses(run_dir)[1] - (s / n).item()) > 1e-3


def test_compile_matches_eager(tmp_path: Path) -> None:
    """trainer.compile wraps the plain model; losses match eager and export has plain keys."""
    eager, comp = tmp_path / "eager", tmp_path / "compiled"
    base = ["experiment=linear_regression", "trainer.max_steps=10", "logger.log_every=1", "logger.progress=false"]
    run(compose([*base, f"hydra.run.dir={eager}"]), eager)
    run(compose([*base, "trainer.compile=true", f"hydra.run.dir={comp}"]), comp)
    a, b = losses(eager), losses(comp)
    assert max(abs(a[s] - b[s]) / a[s] for s in a) < 1e-5
    from safetensors.torch import load_file

    keys = set(load_file(comp / "final" / "model.safetensors"))
    assert keys == set(load_file(eager / "final" / "model.safetensors")) and not any("_orig_mod" in k for k in keys)


def test_val_split_smaller_than_a_batch_is_evaluated_in_smaller_batches(tmp_path: Path) -> None:
    """A val split of fewer blocks than a micro-batch (a few fine-tuning examples) is evaluated whole, in one
    smaller batch; the train split must still hold a global micro-batch."""
    run_dir = tmp_path / "run"
    cfg = _tiny(run_dir, "trainer.micro_batch_size=64", "data.val_fraction=0.01", "trainer.max_steps=2")
    last = run(cfg, run_dir)
    from llmtrain.data.base import build_data

    n_val = len(build_data(cfg.data).split("val"))
    assert 0 < n_val < 64 and "eval_loss" in last, (n_val, last)
    with pytest.raises(SystemExit) as ei:
        run(_tiny(tmp_path / "big", "trainer.micro_batch_size=100000"), tmp_path / "big")
    assert ei.value.code == 2
    assert not (tmp_path / "big" / "metrics.jsonl").exists()


@pytest.mark.skipif(not (SHARED_DATA / "gpt2-tokenizer").is_dir(), reason="needs ../shared/data/gpt2-tokenizer")
def test_pretrained_vocab_checked_against_ids_present(tmp_path: Path) -> None:
    """The shared GPT-2 tokenizer lists 50258 entries (an unused padding id); a stock 50257-row GPT-2
    fine-tunes on it, while a model whose embeddings miss ids the data holds is refused."""
    from transformers import GPT2Config, GPT2LMHeadModel

    corpus = tmp_path / "c.txt"
    corpus.write_text("Hello world, this is a tiny corpus for a fine-tuning check.\n" * 200)
    for vocab, ok in ((50257, True), (1000, False)):
        pre = tmp_path / f"pre{vocab}"
        GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(pre)
        run_dir = tmp_path / f"run{vocab}"
        cfg = _tiny(run_dir, "trainer.max_steps=1", f"model.pretrained={pre}", f"data.source={corpus}",
                    f"data.tokenizer={SHARED_DATA / 'gpt2-tokenizer'}", "data.val_fraction=0.2")
        if ok:
            run(cfg, run_dir)
            assert len(losses(run_dir)) == 1
        else:
            with pytest.raises(SystemExit):
                run(cfg, run_dir)


FORBIDDEN = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")  # reads that wait for a device


def test_no_host_reads_between_log_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the loop reads the device on log steps only. With that cadence forced on the CPU, any tensor
    read (item, int(), bool(), tolist, ...) inside a step that is not a log step fails the test: the step's
    counts come from the host batch, the non-finite guard and the loss stay on the device."""
    from llmtrain.trainer import Trainer

    monkeypatch.setattr(Trainer, "read_every_step_on_cpu", False)
    guarded = {"on": False, "reads": []}

    def forbid(name: str):
        orig = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            if guarded["on"]:
                guarded["reads"].append(name)
                raise AssertionError(f"Tensor.{name} between log steps")
            return orig(self, *a, **k)
        return read

    for name in FORBIDDEN:
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    one_step = Trainer._one_step

    def step(self):  # steps 1-3 and 5-7 are not log steps (logger.log_every=4)
        guarded["on"] = (self.step + 1) % 4 != 0 and self.step + 1 != self.cfg.max_steps
        try:
            return one_step(self)
        finally:
            guarded["on"] = False

    monkeypatch.setattr(Trainer, "_one_step", step)
    run_dir = tmp_path / "run"
    run(_tiny(run_dir, "trainer.max_steps=8", "trainer.eval_every=0", "trainer.ckpt_every=0", "logger.log_every=4",
              "trainer.grad_accum_steps=2"), run_dir)
    assert guarded["reads"] == [] and [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [4, 8]
