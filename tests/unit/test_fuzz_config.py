"""Property: whatever values and types a user gives, in any group, a run trains its step or stops with exit 1
or 2 and one `llmtrain: error:` line: never a traceback, never a hang. The CLI's main() runs in-process on a
tiny model (Hydra composition, validation and the run itself); LLMTRAIN_FUZZ_EXAMPLES=500 explores more."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections import Counter

import pytest
from helpers import TINY_LM

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("LLMTRAIN_FUZZ_EXAMPLES", "40"))
BASE = [*TINY_LM, "trainer.max_steps=1", "trainer.eval_every=0", "trainer.ckpt_every=0", "logger.tensorboard=false",
        "logger.plots=false"]

INTS = st.sampled_from(["-1", "0", "1", "2", "3", "7", "1000000", "1.5", "abc", "null", "true", "[1]", "''"])
FLOATS = st.sampled_from(["-1", "0", "0.0", "1e-3", "0.5", "1", "2", "1e30", "nan", "inf", "abc", "null", "[0.1]"])
BOOLS = st.sampled_from(["true", "false", "1", "0", "yes", "maybe", "null", "2"])
WORDS = st.sampled_from(["''", "abc", "null", "1", "true", "[a]", "'a b'", "${oops}", "/nonexistent/x"])
# key -> values: small ones that run in a second, and every kind of wrong one
KEYS: dict[str, st.SearchStrategy[str]] = {
    "trainer.max_steps": st.sampled_from(["-1", "0", "1", "2", "abc", "1.5", "null"]),
    "trainer.micro_batch_size": INTS, "trainer.grad_accum_steps": st.sampled_from(["-1", "0", "1", "2", "x"]),
    "trainer.precision": st.sampled_from(["fp32", "bf16", "fp16", "auto", "fp8", "32", "null"]),
    "trainer.grad_clip": FLOATS, "trainer.gradient_checkpointing": BOOLS, "trainer.eval_every": INTS,
    "trainer.eval_batches": INTS, "trainer.ckpt_every": INTS, "trainer.keep_checkpoints": INTS,
    "trainer.seed": INTS, "trainer.resume": st.sampled_from(["auto", "never", "/nonexistent", "''", "1"]),
    "trainer.device": st.sampled_from(["auto", "cpu", "cuda", "tpu", "''", "1"]),
    "trainer.sample_tokens": st.sampled_from(["0", "-1", "3", "x"]),
    "trainer.sample_temperature": FLOATS, "trainer.sample_top_k": INTS, "trainer.keep_best": BOOLS,
    "trainer.early_stop_patience": INTS, "trainer.max_bad_steps": INTS, "trainer.preempt_grace_s": FLOATS,
    "optim": st.sampled_from(["sgd", "momentum", "rmsprop", "adam", "adamw", "adamw8bit", "lion"]),
    "optim.lr": FLOATS, "optim.weight_decay": FLOATS, "optim.eps": FLOATS, "optim.momentum": FLOATS,
    "optim.betas": st.sampled_from(["[0.9,0.95]", "[0.9]", "[2,3]", "[-1,0.5]", "0.9", "[a,b]", "null"]),
    "optim.fused": BOOLS,
    "scheduler": st.sampled_from(["cosine", "linear", "constant", "step"]),
    "scheduler.warmup_steps": INTS, "scheduler.min_lr_ratio": FLOATS,
    "model.n_layer": st.sampled_from(["-1", "0", "1", "3", "x", "1.5"]),
    "model.n_head": st.sampled_from(["-1", "0", "1", "3", "4", "x"]),
    "model.n_embd": st.sampled_from(["-1", "0", "16", "33", "x"]),
    "model.n_positions": st.sampled_from(["-1", "0", "8", "64", "x"]),
    "model.dropout": FLOATS, "model.impl": st.sampled_from(["native", "hf", "jax", "''"]),
    "model.pretrained": WORDS, "model.freeze": st.sampled_from(["[]", "[transformer.wte.*]", "[nomatch*]", "x"]),
    "model.lora.enabled": BOOLS, "model.lora.r": INTS,
    "data.seq_len": st.sampled_from(["-1", "0", "8", "64", "65", "x"]),
    "data.tokenizer": st.sampled_from(["byte", "''", "/nonexistent", "not/a/hub-name", "null"]),
    "data.val_fraction": FLOATS, "data.source": WORDS, "data.prefetch": INTS,
    "strategy": st.sampled_from(["single", "ddp", "fsdp", "deepspeed", "horovod"]),
    "strategy.zero_stage": INTS, "strategy.timeout_s": FLOATS, "strategy.offload_optimizer": BOOLS,
    "logger.log_every": INTS, "logger.progress": BOOLS, "logger.peak_tflops": FLOATS,
    "logger.wandb_mode": st.sampled_from(["online", "offline", "disabled", "sometimes"]),
    "+trainer.max_step": INTS, "+model.n_layers": INTS, "+nonsense": WORDS,
}
OUTCOMES: Counter[str] = Counter()


def _main(argv: list[str]) -> tuple[int, str]:
    """The CLI's main() in this process: (exit code, stderr)."""
    import llmtrain.train as train

    err = io.StringIO()
    code: int | str | None = 0
    saved = sys.argv
    sys.argv = ["llmtrain-train", *argv]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            train.main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = saved
    return (code if isinstance(code, int) else 1 if code else 0), err.getvalue()


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted(KEYS)), st.just(None), min_size=1, max_size=3).flatmap(
    lambda d: st.fixed_dictionaries({k: KEYS[k] for k in d})))
def test_any_config_trains_or_fails_in_one_line(tmp_path_factory: pytest.TempPathFactory,
                                                overrides: dict[str, str]) -> None:
    run_dir = tmp_path_factory.mktemp("fuzz") / "run"
    argv = [*BASE, *(f"{k}={v}" for k, v in overrides.items()), f"hydra.run.dir={run_dir}"]
    env = {"WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", *env)}
    os.environ.update(env)
    try:
        code, err = _main(argv)
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    errors = [ln for ln in err.splitlines() if ln.startswith("llmtrain: error:")]
    OUTCOMES[f"exit {code}"] += 1
    assert "Traceback" not in err, f"{overrides}: a traceback\n{err[-3000:]}"
    assert code in (0, 1, 2), f"{overrides}: exit {code}\n{err[-3000:]}"
    if code == 0:
        assert (run_dir / "metrics.jsonl").is_file() or "is complete" in err, f"{overrides}: exit 0, no step\n{err}"
    else:
        assert len(errors) == 1, f"{overrides}: exit {code} with {len(errors)} error lines\n{err[-3000:]}"


def test_zz_report_outcomes() -> None:
    """The counts, for the record (the property above is the test)."""
    print(f"\nfuzzed configs: {dict(OUTCOMES)}")
    assert sum(OUTCOMES.values()) in (0, EXAMPLES) or sum(OUTCOMES.values()) >= 1
