"""Every file a user may receive is read without running code: one crafted file per kind (its payload would
create a marker file), read by the real command (resume, export, generate, eval, prepare), refused with one
`llmtrain: error:` line and a non-zero exit, and the marker never appears.

docs/reliability.md lists every file kind and how it is read; the rows whose tests live elsewhere name them.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import TINY_LM, compose

from llmtrain import checkpoint as ckpt

BASE = [*TINY_LM, "trainer.max_steps=4", "trainer.ckpt_every=2", "trainer.eval_every=0",
        "logger.tensorboard=false", "logger.plots=false"]


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _cfg(run_dir: Path, *extra: str):
    return compose([*BASE, *extra, f"hydra.run.dir={run_dir}"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished 4-step run of each checkpoint format (one process each), checkpoints at steps 2 and 4."""
    from llmtrain.train import run

    root = tmp_path_factory.mktemp("untrusted")
    out = {}
    for name in ("single", "fsdp", "deepspeed"):
        d = root / name
        run(_cfg(d, f"strategy={name}"), d)
        out[name] = d
    return out


def _copy(src: Path, dest: Path, final: bool = False) -> Path:
    """A copy of a run dir (a received run): without final/ unless asked, so readers take its checkpoint."""
    shutil.copytree(src, dest, ignore=None if final else shutil.ignore_patterns("final"))
    return dest


def _reseal(ck: Path) -> None:
    """Recompute a checkpoint's manifest checksums, as someone crafting a checkpoint would."""
    from llmtrain.safeio import describe_files

    m = ckpt.read_manifest(ck)
    m["files"] = describe_files(ck, sorted(str(p.relative_to(ck)) for p in ck.rglob("*")
                                           if p.is_file() and p.name != "manifest.json"))
    (ck / "manifest.json").write_text(json.dumps(m))


def _refused(capsys: pytest.CaptureFixture, fn: Callable[[], object], marker: Path, *words: str) -> str:
    """fn() exits non-zero with exactly one error line (holding `words`) and no traceback; no marker file."""
    with pytest.raises(SystemExit) as ei:
        fn()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("llmtrain: error:")]
    assert ei.value.code not in (0, None) and len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]
    assert not marker.exists(), "the payload ran"
    return lines[0]


# the commands ---------------------------------------------------------------------------------------------
def _resume(run_dir: Path, strategy: str, *extra: str) -> Callable[[], object]:
    from llmtrain.train import run

    return lambda: run(_cfg(run_dir, f"strategy={strategy}", "trainer.max_steps=6", *extra), run_dir)


def _export(run_dir: Path) -> Callable[[], object]:
    from llmtrain.export import main

    return lambda: main([str(run_dir)])


def _generate(source: Path) -> Callable[[], object]:
    from llmtrain.generation.cli import run

    return lambda: run(compose([f"source={source}", "prompt=x", "max_new_tokens=2"], "generate"))


def _eval(source: Path) -> Callable[[], object]:
    from llmtrain.generation.eval import run

    return lambda: run(compose([f"source={source}", "data.tokenizer=byte", "data.seq_len=16", "batches=1"],
                               "eval"))


COMMANDS = {"resume": None, "export": _export, "generate": _generate, "eval": _eval}


def _command(name: str, run_dir: Path, strategy: str) -> Callable[[], object]:
    return _resume(run_dir, strategy) if name == "resume" else COMMANDS[name](run_dir)


# checkpoints of single / ddp / fsdp ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["trainer.pt", "rng_rank0.pt"])
def test_trainer_state_and_rng_files(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                     target: str) -> None:
    run_dir = _copy(runs["single"], tmp_path / "run")
    ck, marker = run_dir / "checkpoints" / "step_00000004", tmp_path / "pwned"
    torch.save({"step": 4, "evil": Payload(marker)}, ck / target)
    _reseal(ck)
    _refused(capsys, _resume(run_dir, "single"), marker, "is refused", "'posix.system'")


@pytest.mark.parametrize("command", ["resume", "export", "generate", "eval"])
def test_a_legacy_checkpoint(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                             command: str) -> None:
    """llmtrain's earlier single/ddp format (model_optim.pt) still exports and generates, through the safe
    reader; resuming it is refused before anything is read."""
    run_dir = _copy(runs["single"], tmp_path / "run")
    ck, marker = run_dir / "checkpoints" / "step_00000004", tmp_path / "pwned"
    shutil.rmtree(ck / "dcp")
    torch.save({"model": {"evil": Payload(marker)}, "optimizer": {}}, ck / "model_optim.pt")
    _reseal(ck)
    words = ("earlier llmtrain", "llmtrain-export") if command == "resume" else ("is refused", "'posix.system'")
    _refused(capsys, _command(command, run_dir, "single"), marker, *words)


def _dcp_item(ck: Path, marker: Path, kind: str) -> None:
    """Point one item of the DCP checkpoint (a tensor of the model, or a non-tensor value) at a payload
    appended to its shard file."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta_path = ck / "dcp" / ".metadata"
    md = pickle.loads(meta_path.read_bytes())  # our own file: trusted here

    def wanted(fqn: str) -> bool:
        is_bytes = isinstance(md.state_dict_metadata[fqn], BytesStorageMetadata)
        return is_bytes if kind == "bytes" else not is_bytes and fqn.startswith("model.")

    index = next(i for i in md.storage_data if wanted(i.fqn))
    info = md.storage_data[index]
    shard = ck / "dcp" / info.relative_path
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    md.storage_data[index] = _StorageInfo(info.relative_path, offset, len(buf.getvalue()))
    meta_path.write_bytes(pickle.dumps(md))


DCP_CASES = [("single", "metadata", "resume"), ("single", "metadata", "export"), ("single", "metadata", "generate"),
             ("single", "tensor", "eval"), ("single", "bytes", "resume"), ("fsdp", "metadata", "resume"),
             ("fsdp", "metadata", "export"), ("fsdp", "tensor", "resume"), ("fsdp", "tensor", "export"),
             ("fsdp", "bytes", "resume")]


@pytest.mark.parametrize(("strategy", "target", "command"), DCP_CASES)
def test_dcp_checkpoint_files(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                              strategy: str, target: str, command: str) -> None:
    """The torch strategies' one format (torch.distributed.checkpoint): its metadata, a tensor and a value."""
    run_dir = _copy(runs[strategy], tmp_path / "run")
    ck, marker = run_dir / "checkpoints" / "step_00000004", tmp_path / "pwned"
    if target == "metadata":
        (ck / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    else:
        _dcp_item(ck, marker, target)
    _reseal(ck)
    _refused(capsys, _command(command, run_dir, strategy), marker, "is refused")


# checkpoints of DeepSpeed --------------------------------------------------------------------------------
def _legacy(path: Path, marker: Path) -> None:
    """torch's legacy format as torch.load reads it: the magic number's pickle first, then the payload where the
    protocol version's pickle belongs (the first pickle alone looks harmless)."""
    from torch.serialization import MAGIC_NUMBER

    path.write_bytes(pickle.dumps(MAGIC_NUMBER, protocol=2) + pickle.dumps(Payload(marker), protocol=2))


@pytest.mark.parametrize(("target", "form", "command"), [
    ("mp_rank_00_model_states.pt", "zip", "resume"), ("mp_rank_00_model_states.pt", "zip", "export"),
    ("mp_rank_00_model_states.pt", "legacy", "resume"), ("mp_rank_00_model_states.pt", "legacy", "export"),
    ("mp_rank_00_model_states.pt", "legacy", "generate"),
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "zip", "export"),
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "legacy", "export")])
def test_deepspeed_checkpoint_files(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                    target: str, form: str, command: str) -> None:
    run_dir = _copy(runs["deepspeed"], tmp_path / "run")
    ck, marker = run_dir / "checkpoints" / "step_00000004", tmp_path / "pwned"
    path = ck / "deepspeed" / target
    assert path.is_file()
    if form == "zip":
        torch.save({"module": {}, "evil": Payload(marker)}, path)
    else:
        _legacy(path, marker)
    _reseal(ck)
    words = ("is refused", "'posix.system'") if form == "zip" else ("is refused", "legacy")
    _refused(capsys, _command(command, run_dir, "deepspeed"), marker, *words)


# exported and Hugging Face model dirs ------------------------------------------------------------------------
@pytest.fixture
def crafted_model_dir(runs: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """An exported GPT-2 dir whose weights are a pytorch_model.bin holding a payload (no model.safetensors)."""
    d, marker = tmp_path / "model", tmp_path / "pwned"
    shutil.copytree(runs["single"] / "final", d)
    (d / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": Payload(marker)}, d / "pytorch_model.bin")
    return d, marker


@pytest.mark.parametrize("command", ["generate", "eval", "pretrained", "pretrained-hf"])
def test_model_dir_weights(crafted_model_dir: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                           command: str) -> None:
    from llmtrain.train import run

    d, marker = crafted_model_dir
    if command.startswith("pretrained"):
        impl = "hf" if command.endswith("hf") else "native"
        fn = lambda: run(_cfg(tmp_path / "ft", f"model.pretrained={d}", f"model.impl={impl}",  # noqa: E731
                              f"data.tokenizer={d}"), tmp_path / "ft")
    else:
        fn = COMMANDS[command](d)
    _refused(capsys, fn, marker, str(d))


def test_received_run_from_its_final_dir(runs: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    """generate from a run dir reads its final/: the same safe reader."""
    run_dir = _copy(runs["single"], tmp_path / "run", final=True)
    marker = tmp_path / "pwned"
    (run_dir / "final" / "model.safetensors").unlink()
    torch.save({"x": Payload(marker)}, run_dir / "final" / "pytorch_model.bin")
    _refused(capsys, _generate(run_dir), marker, "is refused")


# tokenizer dirs --------------------------------------------------------------------------------------------
REMOTE_CODE = "import pathlib\npathlib.Path({marker!r}).touch()\n"


def test_tokenizer_dir_with_remote_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A tokenizer dir that asks for its own Python code (auto_map) is refused: transformers is never allowed to
    run code from a dir (trust_remote_code stays off, and no prompt asks for it)."""
    from llmtrain.prepare import run

    tok, marker = tmp_path / "tok", tmp_path / "pwned"
    tok.mkdir()
    (tok / "evil_tok.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    (tok / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil_tok.Tok", None]},
                                                           "tokenizer_class": "Tok"}))
    (tok / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil_tok.Cfg"}}))
    cfg = compose(["data.source=embedded", f"data.tokenizer={tok}", "data.embedded_max_bytes=20000",
                   f"data.out_dir={tmp_path / 'prep'}"], "prepare")
    _refused(capsys, lambda: run(cfg), marker, "data.tokenizer")


def test_tokenizer_json_garbled(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llmtrain.prepare import run

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
    cfg = compose(["data.source=embedded", f"data.tokenizer={tok}", "data.embedded_max_bytes=20000",
                   f"data.out_dir={tmp_path / 'prep'}"], "prepare")
    _refused(capsys, lambda: run(cfg), tmp_path / "pwned", "data.tokenizer", str(tok))


# a run's config.yaml -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["export", "generate", "eval"])
def test_config_yaml_with_a_python_tag(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                       command: str) -> None:
    """YAML is read with a safe loader: a `!!python/object/apply` tag is refused, never called."""
    run_dir = _copy(runs["single"], tmp_path / "run")
    marker = tmp_path / "pwned"
    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(f"evil: !!python/object/apply:os.system ['touch {marker}']\n{text}")
    _refused(capsys, COMMANDS[command](run_dir), marker, "config.yaml")


@pytest.mark.parametrize("value", ["auto", "bf17", 16])
def test_a_manifest_naming_no_precision_the_run_computed_in(runs: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture, value: object) -> None:
    """llmtrain-export rebuilds a frozen base in the precision the manifest names: anything but a resolved one
    (fp32, bf16, fp16) is one line, not a traceback."""
    run_dir = _copy(runs["single"], tmp_path / "run")
    ck = ckpt.list_checkpoints(run_dir)[-1]
    m = ckpt.read_manifest(ck)
    m["precision"] = value
    (ck / "manifest.json").write_text(json.dumps(m))
    _refused(capsys, _export(run_dir), tmp_path / "pwned", "manifest names precision")
