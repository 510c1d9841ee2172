"""Run files with a torn tail (what a kill or a full disk during a write leaves): metrics.jsonl and
samples.jsonl resume bit for bit after one warning, their readers drop the torn line, and a damaged run.json,
wandb id file or instruct token cache is one warning, never a traceback."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import TINY_LM, compose, losses, samples

from llmtrain import checkpoint as ckpt
from llmtrain.jsonl import read_jsonl
from llmtrain.train import run

pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = [*TINY_LM, "trainer.max_steps=8", "trainer.ckpt_every=2", "trainer.eval_every=4",
        "trainer.keep_checkpoints=10", "model.dropout=0.1", "trainer.grad_accum_steps=2",
        "logger.tensorboard=false", "logger.plots=false", "trainer.sample_tokens=4", "trainer.sample_every=3",
        "trainer.sample_temperature=0", 'trainer.sample_prompts=["a","b"]']


def _cfg(run_dir: Path, *extra: str) -> Any:
    return compose([*ARGS, *extra, f"hydra.run.dir={run_dir}"])


def _warnings(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("llmtrain: warning:")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 steps, a checkpoint every 2, an eval every 4, two greedy samples every 3 steps and at the end."""
    run_dir = tmp_path_factory.mktemp("torn") / "ref"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests' resumed runs (one_thread): sums reduce in the same order
    try:
        run(_cfg(run_dir), run_dir)
    finally:
        torch.set_num_threads(threads)
    return run_dir


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _died_at(ref: Path, dest: Path, ckpt_step: int, metrics: list[bytes], samples_: list[bytes]) -> Path:
    """A run dir as `ref`'s run left it when killed after its checkpoint of `ckpt_step`, holding these lines
    of metrics.jsonl and samples.jsonl."""
    dest.mkdir(parents=True)
    for name in ("config.yaml", "run.json"):
        shutil.copy(ref / name, dest / name)
    for ck in ckpt.list_checkpoints(ref):
        if int(ck.name[5:]) <= ckpt_step:
            shutil.copytree(ck, dest / "checkpoints" / ck.name)
    (dest / "metrics.jsonl").write_bytes(b"".join(metrics))
    (dest / "samples.jsonl").write_bytes(b"".join(samples_))
    return dest


def _step(line: bytes) -> int:
    return json.loads(line)["step"]


# resumed runs ----------------------------------------------------------------------------------------------
def test_a_torn_metrics_line_is_dropped_and_the_resume_is_bit_identical(
        reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Killed halfway through the step-6 record (checkpoint 4 the newest): one warning, then the reference."""
    ref_m, ref_s = _lines(reference / "metrics.jsonl"), _lines(reference / "samples.jsonl")
    torn = next(ln for ln in ref_m if _step(ln) == 6)
    kept = [ln for ln in ref_m if _step(ln) <= 5]
    run_dir = _died_at(reference, tmp_path / "run", 4, [*kept, torn[: len(torn) // 2]],
                       [ln for ln in ref_s if _step(ln) <= 3])
    capsys.readouterr()
    run(_cfg(run_dir), run_dir)
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == 1 and f"{run_dir / 'metrics.jsonl'}: dropped 1 unreadable line" in warned[0], warned
    assert "torn" in warned[0]
    assert losses(run_dir) == losses(reference)  # bit for bit
    got = _lines(run_dir / "metrics.jsonl")
    assert got[:len([ln for ln in ref_m if _step(ln) <= 4])] == [ln for ln in ref_m if _step(ln) <= 4]
    assert [_step(ln) for ln in got] == [_step(ln) for ln in ref_m]
    assert (run_dir / "samples.jsonl").read_bytes() == (reference / "samples.jsonl").read_bytes()


def test_a_torn_samples_line_is_dropped_and_the_resume_is_bit_identical(
        reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Killed halfway through the second sample of step 3 (checkpoint 2 the newest)."""
    ref_m, ref_s = _lines(reference / "metrics.jsonl"), _lines(reference / "samples.jsonl")
    step3 = [ln for ln in ref_s if _step(ln) == 3]
    assert len(step3) == 2
    run_dir = _died_at(reference, tmp_path / "run", 2, [ln for ln in ref_m if _step(ln) <= 3],
                       [step3[0], step3[1][: len(step3[1]) // 2]])
    capsys.readouterr()
    run(_cfg(run_dir), run_dir)
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == 1 and f"{run_dir / 'samples.jsonl'}: dropped 1 unreadable line" in warned[0], warned
    assert (run_dir / "samples.jsonl").read_bytes() == (reference / "samples.jsonl").read_bytes()
    assert samples(run_dir) == samples(reference) and losses(run_dir) == losses(reference)


def test_a_fresh_start_never_appends_onto_a_torn_line_and_survives_a_garbled_run_record(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """No checkpoint to resume: the torn sample line is dropped with one warning, and so are the whole samples
    of the attempt that no checkpoint holds (the fresh run writes its own); a garbled run.json is one warning
    and is rewritten whole."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "samples.jsonl").write_text('{"step": 3, "prompt": "a", "text": "x"}\n{"step": 3, "pro')
    (run_dir / "run.json").write_text('{"status": "runn')
    (run_dir / ".run.json.tmp99999").write_text("{}")  # a writer killed before its rename
    capsys.readouterr()
    run(_cfg(run_dir, "trainer.max_steps=4", "trainer.eval_every=0"), run_dir)
    warned = _warnings(capsys.readouterr().err)
    assert sorted(w.split(": ")[2] for w in warned) == [str(run_dir / "run.json"),
                                                       str(run_dir / "samples.jsonl")]
    recs = [json.loads(ln) for ln in (run_dir / "samples.jsonl").read_text().splitlines()]  # strict: no glue
    assert [(r["step"], r["prompt"]) for r in recs] == [(3, "a"), (3, "b"), (4, "a"), (4, "b")]
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "complete" and rec["wall_s"] > 0
    assert not list(run_dir.glob(".run.json.tmp*"))


# readers ---------------------------------------------------------------------------------------------------
TRAIN1 = {"step": 1, "loss": 5.0, "lr": 0.1, "tokens_per_s": 10.0}
TRAIN2 = {"step": 2, "loss": 4.0, "lr": 0.1, "tokens_per_s": 12.0}
EVAL2 = {"step": 2, "eval_loss": 4.5, "perplexity": 90.0}


def _torn_run(run_dir: Path) -> Path:
    """A run dir whose metrics.jsonl has a garbled line in the middle and a torn last line."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: x\n")
    (run_dir / "run.json").write_text(json.dumps({"status": "running", "overrides": ["a=1"]}))
    lines = [json.dumps(TRAIN1), json.dumps(TRAIN2), "\x00\x00garbage", json.dumps(EVAL2)]
    (run_dir / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines) + '{"step": 3, "loss": 3.9')
    return run_dir


def test_last_metrics_drops_torn_and_garbled_lines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llmtrain.rundir import last_metrics

    run_dir = _torn_run(tmp_path / "run")
    before = (run_dir / "metrics.jsonl").read_bytes()
    assert last_metrics(run_dir) == {**TRAIN2, "eval_loss": 4.5, "perplexity": 90.0}
    assert last_metrics(run_dir)["step"] == 2  # read again: no second warning for the same file
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == 1 and "dropped 2 unreadable lines (line 3 is not a JSON object; line 5 is torn" \
        in warned[0], warned
    assert (run_dir / "metrics.jsonl").read_bytes() == before  # a reader leaves the file as it is


def test_the_sweep_report_and_plots_read_a_torn_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llmtrain.tracking.plots import loss_plot
    from llmtrain.tracking.report import report

    sweep = tmp_path / "sweep"
    run_dir = _torn_run(sweep / "a=1")
    rows = report(sweep)
    assert [(r["train_loss"], r["eval_loss"], r["tokens_per_s"], r["status"]) for r in rows] == \
        [(4.0, 4.5, 11.0, "running")]
    assert (sweep / "sweep.png").is_file()  # the eval curve, from the same records
    assert loss_plot(run_dir) == run_dir / "plots" / "loss.png"
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == 1 and str(run_dir / "metrics.jsonl") in warned[0], warned


def test_read_jsonl_repairs_so_that_the_next_append_is_a_line_of_its_own(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = b'{"step": 1}\n[1, 2]\n{"step": 2}\n{"step": 3}\n{"st\xff'
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}, {"step": 3}]
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}, {"step": 3}]  # the same damage: no second warning
    assert path.read_bytes() == data  # repair=False: untouched
    path = tmp_path / "g.jsonl"
    path.write_bytes(data)
    assert read_jsonl(path, keep=lambda r: r["step"] <= 2, repair=True) == [{"step": 1}, {"step": 2}]
    assert path.read_bytes() == b'{"step": 1}\n{"step": 2}\n'
    with open(path, "a") as f:
        f.write('{"step": 3}\n')
    assert [json.loads(ln) for ln in path.read_text().splitlines()] == [{"step": 1}, {"step": 2}, {"step": 3}]
    missing = tmp_path / "missing.jsonl"
    assert read_jsonl(missing, repair=True) == [] and not missing.exists()
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == 2 and "line 2 is not a JSON object; line 5 is torn" in warned[0], warned
    assert warned[1].endswith("the file is rewritten without them")


# run.json --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b'{"status": "compl', b"[1, 2]\n", b"\xff\xfe{}"])
def test_an_unreadable_run_record_is_one_warning_and_then_rewritten(tmp_path: Path, content: bytes,
                                                                    capsys: pytest.CaptureFixture) -> None:
    from llmtrain.rundir import read_run_record, write_run_record

    (tmp_path / "run.json").write_bytes(content)
    assert read_run_record(tmp_path) == {}
    write_run_record(tmp_path, status="running")
    write_run_record(tmp_path, wall_s=1.5)
    assert json.loads((tmp_path / "run.json").read_text()) == {"status": "running", "wall_s": 1.5}
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == 1 and f"{tmp_path / 'run.json'}: cannot be read" in warned[0], warned


# the wandb id ----------------------------------------------------------------------------------------------
class _FakeRun:
    def define_metric(self, *args: Any, **kwargs: Any) -> None:
        pass


ID_FILES = [(None, False), (b"ab12cd34\n", True), (b"", False), (b"\n\n", False), (b"ab12\x00\xffzz", False),
            (b"two words", False)]  # (content, whether the id is kept)


@pytest.mark.parametrize("content,kept", ID_FILES)
def test_the_wandb_id_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                           content: bytes | None, kept: bool) -> None:
    """A kept id resumes its wandb run; an empty or garbled one gives a fresh id with one warning; the id file
    is written through safeio (atomically)."""
    import llmtrain.safeio as safeio
    from llmtrain.tracking.logger import LoggerConfig
    from llmtrain.tracking.sinks import WANDB_ID, WandbSink

    ids: list[str] = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        init=lambda **kw: ids.append(kw["id"]) or _FakeRun(), Settings=lambda **kw: kw))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    written: list[Path] = []
    atomic = safeio.atomic_write
    monkeypatch.setattr(safeio, "atomic_write", lambda path, *a: written.append(path) or atomic(path, *a))
    id_file = tmp_path / "wandb_id"
    if content is not None:
        id_file.write_bytes(content)
    WandbSink(LoggerConfig(wandb=True, wandb_mode="offline"), tmp_path, None, None)
    assert len(ids) == 1 and WANDB_ID.fullmatch(ids[0])
    assert (ids[0] == "ab12cd34") == kept
    assert id_file.read_text() == ids[0] + "\n" and written == [id_file]
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == (0 if kept or content is None else 1), warned
    assert all(f"{id_file}: " in w and "new wandb run" in w for w in warned)


# the instruct token cache ----------------------------------------------------------------------------------
def _savez(path: Path, arrays: dict[str, np.ndarray], **changed: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez(f, **{**arrays, **changed})


CACHE_DAMAGE = {
    "truncated": lambda p, a: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "garbage": lambda p, a: p.write_bytes(b"not a zip file"),
    "flipped byte": lambda p, a: p.write_bytes(p.read_bytes().replace(a["tokens"].tobytes()[:8],
                                                                      bytes(8), 1)),
    "empty": lambda p, a: p.write_bytes(b""),
    "a pickle inside": lambda p, a: _savez(p, a, tokens=np.array([{"a": 1}], dtype=object)),
    "arrays that do not fit": lambda p, a: _savez(p, a, offsets=a["offsets"][:-1]),
}


@pytest.mark.parametrize("damage", list(CACHE_DAMAGE))
def test_a_damaged_instruct_cache_is_encoded_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture, damage: str) -> None:
    from llmtrain.data.instruct import InstructDataConfig, encode_file
    from llmtrain.data.tokenizers import byte_tokenizer

    monkeypatch.setenv("LLMTRAIN_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"q{i} ", "completion": f"a{i}"}) + "\n" for i in range(5)))
    cfg, tok = InstructDataConfig(source=str(src)), byte_tokenizer()
    want = encode_file(src, cfg, tok, "data.source")
    (cache,) = (tmp_path / "cache" / "instruct").glob("*.npz")
    CACHE_DAMAGE[damage](cache, want)
    capsys.readouterr()
    got = encode_file(src, cfg, tok, "data.source")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == 1, warned
    assert f"{cache}: the cached tokens of train.jsonl cannot be read" in warned[0]
    with np.load(cache, allow_pickle=False) as z:  # written again, whole
        assert all(np.array_equal(z[k], want[k]) for k in want)
