"""What a newcomer meets in-process: run dirs that never collide, finished runs left alone, unknown keys
refused in every group, presets that yield to group choices, precision auto, export that asks first."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY_LM, compose, losses

from llmtrain import checkpoint as ckpt
from llmtrain import rundir
from llmtrain.config import checked
from llmtrain.errors import ConfigError
from llmtrain.export import main as export_main
from llmtrain.export import read_export_step
from llmtrain.models.base import format_count
from llmtrain.precision import Precision, resolve, slow_precision_warning
from llmtrain.train import run

pytestmark = pytest.mark.usefixtures("one_thread")
SHORT = [*TINY_LM, "trainer.max_steps=4", "trainer.ckpt_every=2", "trainer.eval_every=0"]


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_run_on_more_processes_finds_its_dir_when_its_global_batch_is_kept(tmp_path: Path) -> None:
    """The default run dir follows the global batch, not the strategy or the micro-batch: a run moved from one
    process (micro-batch 8) to two (micro-batch 4 each) finds its dir and resumes there; with micro-batch 8 on
    two processes the global batch doubles and the run goes to a dir of its own."""
    base = tmp_path / "runs" / "gpt2_tiny"
    rundir.write_config(base, compose([*SHORT, "trainer.micro_batch_size=8"]))
    rundir.write_run_record(base, world_size=1)
    kept = rundir.fingerprint(compose([*SHORT, "strategy=ddp", "trainer.micro_batch_size=4"]), world_size=2)
    assert rundir.pick(base, kept) == (base, None)
    doubled = rundir.fingerprint(compose([*SHORT, "strategy=fsdp", "trainer.micro_batch_size=8"]), world_size=2)
    where, note = rundir.pick(base, doubled)
    assert where == base.with_name("gpt2_tiny-2") and "(global batch: 8 there, 16 here)" in note
    deepspeed = rundir.fingerprint(compose([*SHORT, "strategy=deepspeed", "trainer.micro_batch_size=8"]))
    assert rundir.pick(base, deepspeed)[0] == base.with_name("gpt2_tiny-2")  # its own checkpoint format


def test_default_run_dir_never_collides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """runs/<name> holding another configuration sends the run to runs/<name>-2, which a rerun finds again."""
    base = tmp_path / "runs" / "gpt2_tiny"
    run(compose(SHORT), base, pick_dir=True)
    first = _snapshot(base)
    bigger = [*SHORT, "model.n_layer=3"]
    run(compose(bigger), base, pick_dir=True)
    err = capsys.readouterr().err
    assert f"{base} holds a run of another configuration (model.n_layer: 2 there, 3 here); this run uses " \
           f"{base}-2" in err
    assert _snapshot(base) == first  # the first run is untouched
    assert sorted(losses(tmp_path / "runs" / "gpt2_tiny-2")) == [1, 2, 3, 4]
    # the same command again finds its own dir: complete, nothing to do
    before = _snapshot(tmp_path / "runs" / "gpt2_tiny-2")
    last = run(compose(bigger), base, pick_dir=True)
    out = capsys.readouterr().out
    assert f"{base}-2 is complete (step 4 of 4" in out and "nothing to do" in out
    assert _snapshot(tmp_path / "runs" / "gpt2_tiny-2") == before
    assert last["loss"] == losses(tmp_path / "runs" / "gpt2_tiny-2")[4] and "eval_loss" in last
    # an explicit dir is the user's choice: another model there is refused, not redirected
    with pytest.raises(SystemExit) as ei:
        run(compose(bigger), base)
    assert ei.value.code == 2 and _snapshot(base) == first


def test_finished_run_is_not_redone_but_can_be_extended(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    run(compose(SHORT), run_dir)
    assert read_export_step(run_dir / "final") == 4
    before = _snapshot(run_dir)
    run(compose(SHORT), run_dir)
    assert "is complete (step 4 of 4" in capsys.readouterr().out
    assert _snapshot(run_dir) == before  # no new checkpoint, export or sample
    run(compose([*SHORT, "trainer.max_steps=6"]), run_dir)
    out = capsys.readouterr().out
    assert "resuming from" in out and "at step 4" in out
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5, 6] and read_export_step(run_dir / "final") == 6


def test_finished_run_without_its_export_exports(tmp_path: Path) -> None:
    """A run that died while exporting: the rerun trains nothing and writes final/."""
    run_dir = tmp_path / "run"
    run(compose(SHORT), run_dir)
    shutil.rmtree(run_dir / "final")
    run(compose(SHORT), run_dir)
    assert read_export_step(run_dir / "final") == 4 and sorted(losses(run_dir)) == [1, 2, 3, 4]


GROUP_KEYS = ["+model.n_layr=3", "+data.seq_length=8", "+optim.learning_rate=1", "+scheduler.warmup=3",
              "+strategy.zero=3", "+trainer.max_step=5", "+logger.tensorbord=true", "+nme=x"]


@pytest.mark.parametrize("override", GROUP_KEYS)
def test_unknown_keys_refused_in_every_group(override: str) -> None:
    """Hydra accepts `+key=value` on a typed node; the run must refuse it, naming the real key."""
    cfg = compose([override])
    with pytest.raises(ConfigError) as ei:
        checked(cfg)
    key = override[1:].split("=")[0]
    assert ei.value.key == key and "no such key" in str(ei.value) and "\n" not in str(ei.value)
    suggestions = {"+trainer.max_step=5": "did you mean trainer.max_steps?", "+model.n_layr=3": "model.n_layer?",
                   "+strategy.zero=3": "strategy.zero_stage?", "+nme=x": "did you mean name?"}
    if override in suggestions:
        assert suggestions[override] in str(ei.value)


def test_group_choices_win_over_the_preset() -> None:
    cfg = compose(["experiment=gpt2_small", "trainer=debug"])
    assert cfg.trainer.max_steps == 10 and cfg.trainer.ckpt_every == 5  # debug, not the preset's 5000
    assert cfg.trainer.micro_batch_size == 8 and cfg.data.tokenizer == "gpt2"  # the rest of the preset stays
    assert compose(["experiment=gpt2_small"]).trainer.max_steps == 5000
    assert compose(["experiment=gpt2_small", "optim=sgd"]).optim.name.value == "sgd"


def test_precision_auto_and_the_slow_bf16_warning(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    assert resolve("auto", cpu) == Precision.fp32 and resolve("bf16", cpu) == Precision.bf16
    assert compose(["experiment=gpt2_small"]).trainer.precision == Precision.auto
    flags = tmp_path / "cpuinfo"
    from llmtrain import precision as prec

    for line, warns in (("flags : fpu sse avx2", True), ("flags : fpu avx512f avx512_bf16", False)):
        flags.write_text(line + "\n")
        prec.cpu_has_native_bf16.cache_clear()
        native = prec.cpu_has_native_bf16(str(flags))
        assert native is (not warns)
        prec.cpu_has_native_bf16.cache_clear()
    prec.cpu_has_native_bf16.cache_clear()
    real = prec.cpu_has_native_bf16()
    msg = slow_precision_warning(Precision.bf16, cpu)
    assert (msg is not None) == (real is False)
    if msg:
        assert "use trainer.precision=fp32" in msg and "\n" not in msg
    assert slow_precision_warning(Precision.fp32, cpu) is None


def test_format_count() -> None:
    assert [format_count(n) for n in (9, 641, 62006, 1_093_120, 124_439_808, 1_557_611_200)] == \
           ["9", "641", "62K", "1.09M", "124M", "1.56B"]


def test_export_asks_before_replacing_another_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    run(compose([*SHORT, "trainer.keep_checkpoints=5"]), run_dir)
    older = ckpt.step_dir(run_dir, 2)
    final = _snapshot(run_dir / "final")
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        export_main([str(run_dir), str(older)])
    assert ei.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"llmtrain: error: --out: {run_dir / 'final'} holds the export of step 4; pass --force to "
                   f"replace it, or --out <dir> to write step 2 elsewhere")
    assert _snapshot(run_dir / "final") == final
    export_main([str(run_dir), str(older), "--out", str(tmp_path / "step2")])
    assert read_export_step(tmp_path / "step2") == 2 and _snapshot(run_dir / "final") == final
    export_main([str(run_dir)])  # the newest step again: same export, no --force needed
    assert read_export_step(run_dir / "final") == 4
    export_main([str(run_dir), str(older), "--force"])
    assert read_export_step(run_dir / "final") == 2


def test_remove_if_empty_stops_at_files_and_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "keep.txt").write_text("x")
    rundir.remove_if_empty(Path("runs/a"))
    assert not (tmp_path / "runs" / "a").exists() and (tmp_path / "runs").is_dir()
    (tmp_path / "runs" / "keep.txt").unlink()
    (tmp_path / "runs" / "b").mkdir()
    rundir.remove_if_empty(Path("runs/b"))
    assert not (tmp_path / "runs").exists() and tmp_path.is_dir()


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory) -> Path:
    """A finished run that bad invocations must leave untouched."""
    d = tmp_path_factory.mktemp("existing")
    (d / "config.yaml").write_text("name: old\n")
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return d


@pytest.mark.parametrize("override,key", [
    ("optim.lr=0", "optim.lr"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
    ("data.seq_len=4096", "data.seq_len"),
    ("data.source=/no/such/corpus.txt", "data.source"),
    ("data.tokenizer=/no/such/tokenizer_dir", "data.tokenizer"),
    ("model.family=gpt5", "model.family"),
])
def test_semantic_error_one_line_exit_2(override: str, key: str, existing_run: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    """A bad value: one stderr line naming the key, exit 2, every byte of an existing run dir unchanged
    (the CLI's exit path is tested in e2e/test_cli.py)."""
    before = _snapshot(existing_run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        run(compose([*TINY_LM, override]), existing_run)
    assert ei.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"llmtrain: error: {key}: "), lines
    assert _snapshot(existing_run) == before
