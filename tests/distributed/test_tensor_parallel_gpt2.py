"""Tensor parallelism (strategy.tp) on the native GPT-2 over 2 CPU processes (gloo), in one probe run
(tp_gpt2_probe.py): the fused [q; k; v] projection gives each rank its heads' rows of all three while storing
ColwiseParallel's contiguous rows; tp=2 alone trains as one process does (losses within 1e-6 relative, weights
within 1e-5), its DCP checkpoint reads back whole in one process, and resumes under fsdp dp=1 × tp=2. Then
through the CLI on 4 processes: fsdp 2 × tp 2 (sequence parallel, checkpointing), ddp 2 × tp 2 and HSDP 2 × 2
train as one process does (12 steps, accumulation 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, base_env, fork_cli

pytestmark = pytest.mark.distributed

RTOL, WTOL = 1e-6, 1e-5


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("tp_gpt2")
    env = base_env()
    env["PYTHONPATH"] = f"{REPO}:{REPO / 'tests' / 'distributed'}"
    env["TP_PROBE_OUT"] = str(out)
    res = fork_cli("tp_gpt2_probe", [], nproc=2, timeout=180, env=env, logs=out / "logs")
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _rel(got: float, want: float) -> float:
    return abs(got - want) / abs(want)


def test_gpt2_c_attn_rank_computes_its_heads_rows(probe: list[dict]) -> None:
    """Rank r stores rows [r·3C/2, (r+1)·3C/2) of c_attn (one box of the full weight: DCP, FSDP) and multiplies
    by [q_r; k_r; v_r]: its output is the full projection's q, k and v columns of its heads."""
    for rank, got in enumerate(probe):
        c = got["c_attn"]
        assert c["stored_rows"] and c["full"], (rank, c)
        assert c["computed_rows"], (rank, c)
        assert c["output_shape"] == [2, 5, 48] and c["output_diff"] <= 1e-6, (rank, c)


@pytest.mark.parametrize("case", ["single", "fsdp_resumed"])
def test_gpt2_tp_matches_one_process(probe: list[dict], case: str) -> None:
    """Each step's loss and gradient norm as the unsplit model's; the final weights (gathered export, and the
    DCP checkpoint read whole in one process) the unsplit model's, under the same names."""
    for got in probe:
        r = got[case]
        assert len(r["got"]) == len(r["want"]) > 0
        loss_err = max(_rel(g[0], w[0]) for g, w in zip(r["got"], r["want"], strict=True))
        norm_err = max(_rel(g[1], w[1]) for g, w in zip(r["got"], r["want"], strict=True))
        print(f"\ngpt2 {case}: max relative loss difference {loss_err:.2e}, grad norm {norm_err:.2e}")
        assert loss_err <= RTOL and norm_err <= 1e-5
    r = probe[0][case]
    for what in ("export", "dcp") if case == "single" else ("export",):
        names, want_names, diff = r[what]
        print(f"gpt2 {case} {what}: max weight difference {diff:.2e}")
        assert names == want_names and diff <= WTOL, (what, diff)
    assert probe[0]["moved"] > 100 * WTOL  # the weights did train


# The layouts of 4 processes, through the CLI: 12 steps, accumulation 2, fp32, against one process with the same
# global batch (losses within 1e-6 relative, the exported weights within 1e-5).
GPT2_TINY = ["experiment=gpt2_tiny", "model.n_layer=2", "model.n_head=4", "model.n_embd=32", "model.n_positions=64",
             "data.tokenizer=byte", "data.seq_len=32", "data.embedded_max_bytes=200000", "trainer.max_steps=12",
             "trainer.grad_accum_steps=2", "trainer.precision=fp32", "trainer.eval_every=0", "trainer.ckpt_every=0",
             "trainer.sample_tokens=0", "logger.log_every=1", "logger.progress=false", "logger.tensorboard=false",
             "logger.plots=false"]
LAYOUTS: dict[str, tuple[list[str], int]] = {
    "single": (["trainer.micro_batch_size=8"], 1),
    "fsdp_dp2_tp2": (["strategy=fsdp", "strategy.tp=2", "trainer.micro_batch_size=4",
                      "trainer.gradient_checkpointing=true"], 4),  # sequence parallel, each split block recomputed
    "ddp_dp2_tp2": (["strategy=ddp", "strategy.tp=2", "trainer.micro_batch_size=4"], 4),
    "hsdp2x2": (["strategy=fsdp", "strategy.dp_replicate=2", "trainer.micro_batch_size=2"], 4),
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from helpers import train_cli

    root = tmp_path_factory.mktemp("gpt2_layouts")
    for name, (overrides, nproc) in LAYOUTS.items():
        train_cli([*GPT2_TINY, *overrides], root / name, nproc=nproc, timeout=180)
    return {name: root / name for name in LAYOUTS}


@pytest.mark.parametrize("name", ["fsdp_dp2_tp2", "ddp_dp2_tp2", "hsdp2x2"])
def test_gpt2_layouts_of_four_processes_match_one(layouts: dict[str, Path], name: str) -> None:
    from helpers import losses, max_rel
    from safetensors.torch import load_file

    got, want = losses(layouts[name]), losses(layouts["single"])
    assert sorted(got) == sorted(want) == list(range(1, 13))
    err = max_rel(got, want)
    w_got, w_want = (load_file(str(layouts[n] / "final" / "model.safetensors")) for n in (name, "single"))
    diff = max((w_got[k] - w_want[k]).abs().max().item() for k in w_want)
    print(f"\ngpt2 {name} vs one process: max relative loss difference {err:.2e}, max weight difference {diff:.2e}")
    assert err <= RTOL and sorted(w_got) == sorted(w_want) and diff <= WTOL
    assert want[12] < want[1]  # it trains
