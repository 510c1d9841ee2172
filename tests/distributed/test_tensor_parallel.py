"""Tensor parallelism (strategy.tp) on the native Llama over CPU processes (gloo): tp=2 alone (strategy=single,
2 processes, sequence parallel), fsdp dp=2 × tp=2 (4 processes, sequence parallel, checkpointing), HSDP 2 × 2
and ddp dp=2 × tp=2 (no sequence parallelism) match one process with the same global batch over 12 steps,
accumulation 2, fp32, dropout 0 (losses within 1e-6 relative); their exports, and llmtrain-export of their DCP
checkpoints in one process, hold the same weights within 1e-5. A 2-process probe checks where each parameter
lives (colwise projections Shard(0), rowwise Shard(1) on the "tp" mesh dim, embedding and head rows Shard(0),
norms replicated), the split model's gradients, the sequence shard between blocks and the vocabulary-parallel
loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, base_env, fork_cli, losses, max_rel, read_metrics, train_cli
from test_llama_strategies import STEPS, TINY_LLAMA

pytestmark = pytest.mark.distributed

RTOL, WTOL = 1e-6, 1e-5
RUNS: dict[str, tuple[list[str], int]] = {
    "single": (["trainer.micro_batch_size=8"], 1),
    "tp2": (["strategy.tp=2", "trainer.micro_batch_size=8"], 2),
    "fsdp_dp2_tp2": (["strategy=fsdp", "strategy.tp=2", "trainer.micro_batch_size=4",
                      "trainer.gradient_checkpointing=true"], 4),  # checkpointing each split block
    "hsdp2x2": (["strategy=fsdp", "strategy.dp_replicate=2", "trainer.micro_batch_size=2"], 4),
    "ddp_dp2_tp2": (["strategy=ddp", "strategy.tp=2", "strategy.sequence_parallel=false",
                     "trainer.micro_batch_size=4"], 4),  # (the loss still vocabulary-parallel)
}
# a checkpoint at step 6 (test_tp_checkpoints_reshard); samples at steps 6 and 12 from the split weights
# gathered on rank 0, drawn at temperature 1 from the whole distribution (test_tp_samples_are_one_processes), of
# a model trained at the full learning rate from the first step (the samples of one a warmup left near its
# initial weights could not tell them from the trained ones)
CKPT_AND_SAMPLES = ["scheduler.warmup_steps=0", "trainer.ckpt_every=6", "trainer.sample_tokens=24", "trainer.sample_every=6",
                    "trainer.sample_temperature=1.0", "trainer.sample_top_k=0"]
COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")


def _grad_norms(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in read_metrics(run_dir) if "grad_norm" in r}


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    for name, (overrides, nproc) in RUNS.items():  # a checkpoint at step 6 too: test_tp_checkpoints_reshard
        env = {**base_env(), "LLMTRAIN_COUNT_COMM": "1"}  # bytes handed to collectives: test_tp_planned_communication
        train_cli([*TINY_LLAMA, *overrides, *CKPT_AND_SAMPLES], root / name, nproc=nproc, timeout=180, env=env)
    return {name: root / name for name in RUNS}


@pytest.mark.parametrize("name", ["tp2", "fsdp_dp2_tp2", "hsdp2x2", "ddp_dp2_tp2"])
def test_tp_parity_with_one_process(runs: dict[str, Path], name: str) -> None:
    got, want = losses(runs[name]), losses(runs["single"])
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    err = max_rel(got, want)
    print(f"\nllama {name} vs one process: max relative loss difference {err:.2e}")
    assert err <= RTOL
    assert want[STEPS] < want[1]  # it trains
    # the gradients' scale too (Adam and clipping would hide a gradient off by a constant factor in the losses)
    got_n, want_n = _grad_norms(runs[name]), _grad_norms(runs["single"])
    norm_err = max_rel(got_n, want_n)
    print(f"llama {name} vs one process: max relative grad-norm difference {norm_err:.2e}")
    assert norm_err <= 1e-5


@pytest.mark.parametrize("name", ["tp2", "fsdp_dp2_tp2", "hsdp2x2", "ddp_dp2_tp2"])
def test_tp_checkpoint_exports_in_one_process(runs: dict[str, Path], name: str, tmp_path: Path) -> None:
    """The run's own final/ (gathered from the split weights) and llmtrain-export of its DCP checkpoint
    (consolidated in one process) both equal one process's trained weights."""
    out = tmp_path / "export"
    res = fork_cli("llmtrain.export", [str(runs[name]), "--out", str(out)], timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    want = _weights(runs["single"] / "final")
    for got in (_weights(runs[name] / "final"), _weights(out)):
        assert sorted(got) == sorted(want)
        diff = max((got[k] - want[k]).abs().max().item() for k in want)
        print(f"\nllama {name}: max weight difference {diff:.2e}")
        assert diff <= WTOL


@pytest.mark.parametrize("name", ["tp2", "fsdp_dp2_tp2"])
def test_tp_samples_are_one_processes(runs: dict[str, Path], name: str) -> None:
    """In-training samples of a split model (gathered whole on rank 0) are one process's, token for token."""
    def samples(run: Path) -> list[tuple[int, str]]:
        rows = [json.loads(ln) for ln in (run / "samples.jsonl").read_text().splitlines()]
        return [(r["step"], r["text"]) for r in rows]

    got, want = samples(runs[name]), samples(runs["single"])
    assert [s for s, _ in want] == [6, 12] and all(t for _, t in want)
    assert got == want


# layout → the planner's Layout fields (strategy, tp, sequence parallel)
PLANNED = {"tp2": ("single", 2, True), "fsdp_dp2_tp2": ("fsdp", 2, True), "ddp_dp2_tp2": ("ddp", 2, False)}


@pytest.mark.parametrize("name", list(PLANNED))
def test_tp_planned_communication_matches_the_counted_bytes(runs: dict[str, Path], name: str) -> None:
    """llmtrain-plan's tensor-parallel bytes per optimizer step (the activations' all-reduces, or reduce-scatters
    and all-gathers with sequence parallelism, the vocabulary-parallel loss's) against the bytes rank 0 handed to
    collectives over its tp group in the run (the norms' and clipping's small reductions aside)."""
    from helpers import compose

    from llmtrain.plan import Cluster, Layout, layout_row, shape_of

    overrides, nproc = RUNS[name]
    counted = json.loads((runs[name] / "comm_rank0.json").read_text())
    per_step = {k: v / counted["steps"] for k, v in counted["bytes"].items() if k.startswith("tp.")}
    s = shape_of(compose([*TINY_LLAMA, *overrides]), device="cpu")
    strategy, tp, sp = PLANNED[name]
    planned = {k: v for k, v in layout_row(s, Layout(strategy, tp=tp, sequence_parallel=sp),
                                           Cluster(1, nproc, "h100")).comm.items() if k.startswith("tp.")}
    assert sorted(per_step) == sorted(planned) and planned
    for kind, want in planned.items():
        got = per_step[kind]
        print(f"\n{name} {kind}: planned {want / 1e3:.1f} kB/step, counted {got / 1e3:.1f} kB/step")
        assert got == pytest.approx(want, rel=0.1), (kind, got, want)


def _tp_placement(where: dict | None, strategy: str) -> str | None:
    """A parameter's placement on the "tp" mesh dim (None: a plain tensor); FSDP's own on "dp" checked too."""
    if where is None:
        return None
    assert where["dims"][-1] == "tp" and where["dims"][:-1] == (["dp"] if strategy == "fsdp" else []), where
    if strategy == "fsdp":  # FSDP's own shard of dim 0 on "dp" (strided over a tp-split dim 0)
        assert where["placements"][0] in ("Shard(dim=0)", "_StridedShard(dim=0, sf=2)"), where
    return where["placements"][-1]


def test_tp_parameters_are_split_on_the_tp_mesh_dim(tmp_path: Path) -> None:
    """Where every parameter lives, that the split model's loss and gradients are the unsplit one's, that sequence
    parallelism hands the blocks half the sequence, and that no rank's matmul ever outputs the whole vocabulary
    (the loss is vocabulary-parallel) while the unsplit model's does."""
    from tp_probe import T, V

    env = base_env()
    env["PYTHONPATH"] = f"{REPO}:{REPO / 'tests' / 'distributed'}"
    env["TP_PROBE_OUT"] = str(tmp_path)
    res = fork_cli("tp_probe", [], nproc=2, timeout=120, env=env, logs=tmp_path / "logs")
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        hsdp = got["hsdp"]  # replicated over the 2 groups, sharded within each (of 1 rank here)
        for name, where in hsdp["layout"].items():
            assert where["dims"] == ["dp_replicate", "dp_shard"], name
            assert where["placements"] == ["Replicate()", "Shard(dim=0)"], name
        for case in ("single", "single_nosp", "qwen3", "fsdp", "compiled"):
            r, strategy, sp = got[case], "fsdp" if case in ("fsdp", "compiled") else "single", case != "single_nosp"
            assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), case  # the same loss
            assert r["grad_error"] <= 1e-5, (case, r["grad_error"])  # and the same gradients
            print(f"\n{case} rank {rank}: loss {r['loss']:.6f} vs {r['ref_loss']:.6f}, gradients within "
                  f"{r['grad_error']:.1e}; blocks see {r['seq']} tokens, matmul widths {r['widths']}")
            assert r["seq"] == [T // 2 if sp else T] * 2 and r["ref_seq"] == [T] * 2, case  # between the blocks
            if case != "compiled":  # (no dispatch mode under compile)
                assert V not in r["widths"] and (V + 1 - rank) // 2 in r["widths"], case  # its vocabulary rows
            assert V in r["ref_widths"], case  # (the unsplit model does form whole-vocabulary logits)
            for name, where in r["layout"].items():
                leaf, placement = name.split(".")[-2], _tp_placement(where, strategy)
                if leaf in COLWISE + ROWWISE:
                    split = 0 if leaf in COLWISE else 1
                    assert placement == f"Shard(dim={split})", name
                    assert where["local"][split] * 2 == where["global"][split], name
                elif leaf in ("embed_tokens", "lm_head"):  # the vocabulary's rows: 34 and 33
                    assert placement == "Shard(dim=0)" and where["local"][0] == (V + 1 - rank) // 2, name
                elif sp or leaf in ("q_norm", "k_norm"):  # norms of a shard of the tokens or of the heads
                    assert placement == "Replicate()", name
                else:
                    assert placement is None or strategy == "fsdp", name  # whole on every rank
        fp16 = got["fp16"]  # an inf in rank 1's shard at step 2: both ranks skip it, the weights stay
        assert fp16["stepped"] == [True, False, True] and fp16["loss"][2] == fp16["loss"][1] != fp16["loss"][0]
        assert got["single"]["graphs"] == 0 < got["compiled"]["graphs"]  # (cumulative:) compiled blocks did run
        assert "lm_head.weight" in got["qwen3"]["layout"] and "lm_head.weight" not in got["single"]["layout"]


@pytest.mark.parametrize(("saved", "resumed"), [("tp2", "single"), ("single", "fsdp_dp2_tp2"),
                                                ("hsdp2x2", "tp2"), ("fsdp_dp2_tp2", "single")])
def test_tp_checkpoints_reshard(runs: dict[str, Path], saved: str, resumed: str, tmp_path: Path) -> None:
    """A checkpoint written under one layout (step 6 of 12) resumes under another (tensor-parallel degree,
    data-parallel degree and strategy changed), optimizer state and data position carried: steps 7-12 continue
    the uninterrupted one-process run's losses, and the final weights equal its weights."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs[saved], run)
    shutil.rmtree(run / "checkpoints" / "step_00000012")  # as if it had stopped after step 6's checkpoint
    shutil.rmtree(run / "final")
    kept = [ln for ln in (run / "metrics.jsonl").read_text().splitlines() if json.loads(ln).get("step", 0) <= 6]
    (run / "metrics.jsonl").write_text("\n".join(kept) + "\n")  # steps 7-12 must come from the resumed run
    overrides, nproc = RUNS[resumed]
    res = train_cli([*TINY_LLAMA, *overrides, *CKPT_AND_SAMPLES], run, nproc=nproc, timeout=180)
    assert "resuming from" in res.stdout and "at step 6" in res.stdout, res.stdout[-2000:]
    got, want = losses(run), losses(runs["single"])
    assert sorted(got) == list(range(1, STEPS + 1))
    err = max_rel(got, want, range(7, STEPS + 1))
    print(f"\nllama {saved} → {resumed}: max relative loss difference after the resume {err:.2e}")
    assert err <= RTOL
    want_w, got_w = _weights(runs["single"] / "final"), _weights(run / "final")
    assert max((got_w[k] - want_w[k]).abs().max().item() for k in want_w) <= WTOL
