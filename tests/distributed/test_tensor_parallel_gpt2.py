"""Tensor parallelism (strategy.tp) on the native GPT-2 over 2 CPU processes (gloo), in one probe run
(tp_gpt2_probe.py): the fused [q; k; v] projection gives each rank its heads' rows of all three while storing
ColwiseParallel's contiguous rows; tp=2 alone trains as one process does (losses within 1e-6 relative, weights
within 1e-5), its DCP checkpoint reads back whole in one process, and resumes under fsdp dp=1 × tp=2."""

from __future__ import annotations

import json

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
