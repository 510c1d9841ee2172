"""Atomic checkpoints: a step directory appears complete or not at all.

Layout: <run>/checkpoints/step_00000100/{manifest.json, trainer.pt, rng_rank<r>.pt, <strategy files>}.
Every rank writes into a hidden temp dir; rank 0 writes the manifest last, then renames the dir.
A crash mid-save leaves only a temp dir, which discovery ignores and the next save replaces.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_SUBDIR = "checkpoints"
MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_torch(obj: Any, path: Path) -> None:
    """torch.save through a temp file and rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_torch(path: Path, map_location: Any = "cpu") -> Any:
    return torch.load(path, map_location=map_location, weights_only=False)


# RNG ----------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# discovery ------------------------------------------------------------------------------------------
def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CKPT_SUBDIR / f"step_{step:08d}"


def is_complete(ckpt: Path) -> bool:
    return (ckpt / MANIFEST).is_file()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / CKPT_SUBDIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def read_manifest(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / MANIFEST).read_text())


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """Checkpoint to resume from: 'auto' → newest in run_dir, 'never' → None, else a path.

    A path may name a checkpoint dir or a run dir (its newest checkpoint is taken).
    """
    from llmtrain.errors import ConfigError

    if resume == "never":
        return None
    if resume == "auto":
        ckpts = list_checkpoints(run_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume).expanduser()
    if is_complete(path):
        return path
    ckpts = list_checkpoints(path)
    if ckpts:
        return ckpts[-1]
    raise ConfigError("trainer.resume", f"no complete checkpoint at {path}; give a checkpoint dir, a run dir, "
                                        "'auto' or 'never'")


# save / load ------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, step: int, strategy: Any, trainer_state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write checkpoint `step` atomically; every rank calls this."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if strategy.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    strategy.barrier()
    strategy.save(tmp)
    save_torch(rng_state(), tmp / f"rng_rank{strategy.rank}.pt")
    if strategy.is_main:
        save_torch(trainer_state, tmp / "trainer.pt")
    strategy.barrier()
    if strategy.is_main:
        manifest = {"step": step, "world_size": strategy.world_size, "strategy": type(strategy).__name__,
                    "config": trainer_state.get("config"),
                    "early_stopped": bool(trainer_state.get("early_stopped", False)),
                    "files": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():  # re-saving a step: keep the old one until the new one is in place
            old = final.with_name(f".old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
        for stale in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    strategy.barrier()
    return final


def saved_fingerprint(ckpt: Path) -> dict[str, Any] | None:
    """The config fingerprint a checkpoint was written with (None for checkpoints that hold none)."""
    manifest = read_manifest(ckpt)
    if "config" in manifest:
        return manifest["config"]
    return load_torch(ckpt / "trainer.pt").get("config")


def load_checkpoint(ckpt: Path, strategy: Any) -> dict[str, Any]:
    """Restore model/optimizer through the strategy, this rank's RNG, and return the trainer state."""
    from llmtrain.errors import ConfigError

    manifest = read_manifest(ckpt)
    if manifest["world_size"] != strategy.world_size:
        raise ConfigError("trainer.resume", f"checkpoint {ckpt} was written by {manifest['world_size']} "
                                            f"processes, this run has {strategy.world_size}; resume on the same "
                                            "world size or export it with llmtrain-export")
    strategy.load(ckpt)
    trainer_state = load_torch(ckpt / "trainer.pt")
    set_rng_state(load_torch(ckpt / f"rng_rank{strategy.rank}.pt"))
    return trainer_state
