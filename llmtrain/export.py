"""Consolidated export (`final/`) and `llmtrain-export <run_dir>` for any strategy's checkpoint."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmtrain import faults
from llmtrain.models.base import DataInfo, ModelSpec
from llmtrain.restore import checkpoint_state, plain_model
from llmtrain.safeio import replace_dir

if TYPE_CHECKING:
    from llmtrain.context import RunContext
    from llmtrain.distributed.base import Strategy

EXPORT_RECORD = "llmtrain_export.json"  # which checkpoint step an export holds


def quiet_transformers() -> None:
    """No per-file progress bars or advisory warnings from transformers inside our own output.

    Only when transformers is in use: the plain model families never import it."""
    if "transformers" not in sys.modules:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def read_export_record(out: Path) -> dict[str, Any] | None:
    """The record an export wrote into its dir (step, run dir, its files); None: not an llmtrain export."""
    try:
        rec = json.loads((out / EXPORT_RECORD).read_text())
        int(rec["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rec if isinstance(rec, dict) else None


def read_export_step(out: Path) -> int | None:
    """The training step an exported dir was written from (None: not an llmtrain export)."""
    rec = read_export_record(out)
    return int(rec["step"]) if rec is not None else None


def _files(root: Path) -> list[str]:
    """Every file under root, relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def check_target(out: Path, key: str, step: int | None = None, force: bool = True) -> None:
    """Refuse (one line) an export target that holds anything an export did not write: a file, a run dir, a
    foreign dir, or an export with files added to it. `step`: without `force`, an export of another step is
    refused too."""
    from llmtrain.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(key, f"{out} is a file; give a dir for the export")
    if not out.is_dir() or not any(out.iterdir()):
        return
    from llmtrain.rundir import is_run_dir

    if is_run_dir(out):
        raise ConfigError(key, f"{out} is a run dir (its checkpoints, config and metrics), which an export never "
                               f"replaces; give a new or empty dir, e.g. {out / 'final'}")
    rec = read_export_record(out)
    present = _files(out)
    if rec is None:
        raise ConfigError(key, f"{out} holds files that no export wrote ({present[0]}, ...), which an export "
                               "never replaces (not even with --force); give a new or empty dir")
    listed = rec.get("files")
    foreign = [f for f in present if f != EXPORT_RECORD and f not in listed] if isinstance(listed, list) else []
    if foreign:
        raise ConfigError(key, f"{out} holds {foreign[0]}, which its export did not write; move it out (an export "
                               "replaces its dir whole, --force included) or give another dir")
    held = int(rec["step"])
    if step is not None and not force and held != step:
        raise ConfigError(key, f"{out} holds the export of step {held}; pass --force to replace it, or --out <dir> "
                               f"to write step {step} elsewhere")


def write_final(spec: ModelSpec, model_cfg: Any, info: DataInfo, state: dict[str, torch.Tensor],
                run_dir: Path, step: int, out: Path | None = None, record: dict[str, Any] | None = None) -> Path:
    """Load `state` into a fresh plain model and export it atomically to `out` (default run_dir/final), which
    must hold nothing but an earlier export (check_target).

    A LoRA model's state is merged into the plain model's weights, and its adapter also goes to adapter/."""
    from llmtrain.models import adapters

    quiet_transformers()
    final = out or run_dir / "final"
    check_target(final, "export")
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lora = adapters.lora_settings(model_cfg)
    if lora is not None:
        adapters.save_adapter(state, lora, tmp / "adapter", getattr(model_cfg, "pretrained", None),
                              fan_in_fan_out=spec.adapter_fan_in_fan_out(model_cfg))
    model = plain_model(spec, model_cfg, info, state)
    spec.export(model, model_cfg, info, tmp)
    if info.tokenizer is not None:  # the data's tokenizer beside the weights: generation and eval read it there
        info.tokenizer.save_pretrained(tmp)
    rec = {"step": step, "run_dir": str(run_dir.resolve()), **(record or {}), "files": _files(tmp)}
    (tmp / EXPORT_RECORD).write_text(json.dumps(rec) + "\n")
    faults.point("export")
    replace_dir(tmp, final)
    return final


def export_final(ctx: RunContext, strategy: Strategy, step: int, out: Path | None = None,
                 record: dict[str, Any] | None = None) -> Path | None:
    """Gather the trained weights (rank 0) and write final/ (or `out`); every rank calls this."""
    state = strategy.full_state_dict()
    final = None
    if ctx.dist.is_main:
        final = write_final(ctx.spec, ctx.cfg.model, ctx.data.info, state, ctx.run_dir, step, out, record)
    ctx.dist.barrier()
    return final


def main(argv: list[str] | None = None) -> None:
    """llmtrain-export <run_dir> [<checkpoint dir>]: consolidate a checkpoint into <run_dir>/final (or --out)."""
    from llmtrain.cli import run_app

    run_app(lambda: _export(argv))


def _export(argv: list[str] | None) -> None:
    import argparse

    from llmtrain.errors import ConfigError
    from llmtrain.runlock import RunLock

    ap = argparse.ArgumentParser(prog="llmtrain-export", description=main.__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("checkpoint", type=Path, nargs="?", help="default: the run's newest complete checkpoint")
    ap.add_argument("--out", type=Path, help="where to write (default: <run_dir>/final)")
    ap.add_argument("--force", action="store_true", help="replace an export of another step")
    args = ap.parse_args(argv)
    lock = RunLock(args.run_dir)
    try:
        from llmtrain import checkpoint as ckpt
        from llmtrain.rundir import read_config

        cfg = read_config(args.run_dir, "run_dir")
        out = args.out or args.run_dir / "final"
        inside = out.resolve().is_relative_to(args.run_dir.resolve())
        if inside:  # writing inside the run: not while it trains
            lock.acquire(hint="wait for it to end (a run exports its own final/ when it ends), or export with "
                              "--out <a dir outside the run>")
        ck = args.checkpoint or ckpt.resolve_resume("auto", args.run_dir, aside=inside)
        if ck is None or not ckpt.is_complete(ck):
            raise ConfigError("checkpoint", f"no complete checkpoint in {args.run_dir}")
        step = int(ckpt.read_manifest(ck)["step"])
        check_target(out, "--out", step, args.force)
        spec, data, state = checkpoint_state(cfg, ck)
        final = write_final(spec, cfg.model, data.info, state, args.run_dir, step, out=out)
    finally:
        lock.release()
    print(f"exported {ck} (step {step}) → {final}", file=sys.stderr)


if __name__ == "__main__":
    main()
