"""Verified, atomic checkpoints: a step directory appears complete or not at all, and is checked before use.

Layout: <run>/checkpoints/step_00000100/{manifest.json, trainer.pt, rng_rank<r>.pt, <strategy files>}.
Every rank writes into a hidden temp dir; the ranks hash the files between them, rank 0 writes the
manifest (every file's size and sha256) last, then renames the dir. A crash mid-save leaves only a temp
dir, which discovery ignores and the next save replaces. Discovery checks that every listed file is there
with its size; resume also checks the checksums, and falls back to the newest checkpoint that passes,
with one warning line for each one it skips. Nothing is unpickled but through `safeio.load_torch`.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtrain import faults
from llmtrain.distributed.dist import Dist
from llmtrain.errors import ConfigError, RunFailed
from llmtrain.rundir import CKPT_SUBDIR
from llmtrain.safeio import (
    UnsafeFile,
    atomic_write_text,
    describe_files,
    find_cause,
    load_torch,
    replace_dir,
    save_torch,
    verify_files,
)

MANIFEST = "manifest.json"
TRAINER_FILE = "trainer.pt"
FORMAT = 3  # 3: "layout" (dcp | deepspeed); 2: "files" as {name: {size, sha256}}; 1: a list of names


# RNG --------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every RNG a step draws from, as tensors and plain numbers (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    """random.setstate wants tuples where a round trip may give lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# discovery ---------------------------------------------------------------------------------------------
def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CKPT_SUBDIR / f"step_{step:08d}"


def read_manifest(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / MANIFEST).read_text())


def problem(ckpt: Path, checksums: bool = False) -> str | None:
    """What makes `ckpt` unusable (in a few words), or None: its manifest must parse and list every file
    with its size (and, with `checksums`, its sha256)."""
    try:
        manifest = read_manifest(ckpt)
    except FileNotFoundError:
        return f"it has no {MANIFEST} (an unfinished save)"
    except (OSError, ValueError) as e:
        return f"its {MANIFEST} is unreadable ({type(e).__name__})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("step"), int):
        return f"its {MANIFEST} has no step"
    files = manifest.get("files")
    if isinstance(files, list):  # format 1: names only
        missing = [n for n in files if not (ckpt / n).is_file()]
        return f"{missing[0]} is missing" if missing else None
    if not isinstance(files, dict) or TRAINER_FILE not in files:
        return f"its {MANIFEST} lists no files"
    return verify_files(ckpt, files, checksums=checksums)


def is_complete(ckpt: Path) -> bool:
    return ckpt.is_dir() and problem(ckpt) is None


def _step_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / CKPT_SUBDIR
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=step_of)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (manifest + every file at its size), oldest first."""
    return [p for p in _step_dirs(run_dir) if problem(p) is None]


def warn(msg: str) -> None:
    print(f"llmtrain: warning: {msg}", file=sys.stderr, flush=True)


def step_of(ckpt: Path) -> int:
    return int(ckpt.name[5:])


def set_aside(ckpt: Path) -> Path:
    """Rename a checkpoint that failed verification to `step_N.damaged` (kept for inspection): discovery,
    resume and pruning never count it again."""
    dest, n = ckpt.with_name(f"{ckpt.name}.damaged"), 1
    while dest.exists():
        n += 1
        dest = ckpt.with_name(f"{ckpt.name}.damaged-{n}")
    ckpt.rename(dest)
    return dest


def newest_valid(candidates: list[Path], say: Callable[[str], None] = warn, aside: bool = False) -> Path | None:
    """The newest of `candidates` (oldest first) that passes the full check; one line for each skipped.
    aside: the skipped ones are renamed `step_N.damaged` (this run's own checkpoints only)."""
    for ckpt in reversed(candidates):
        why = problem(ckpt, checksums=True)
        if why is None:
            return ckpt
        older = [c for c in candidates if step_of(c) < step_of(ckpt)]
        nxt = f"trying {older[-1].name}" if older else "no older checkpoint is left: starting from step 0"
        kept = f", kept as {set_aside(ckpt).name}" if aside else ""
        say(f"checkpoint {ckpt} is not usable: {why}; it is not loaded{kept}, {nxt}")
    return None


def resolve_resume(resume: str, run_dir: Path, say: Callable[[str], None] = warn, aside: bool = True) -> Path | None:
    """Checkpoint to resume from: 'auto' → the newest valid one in run_dir (those that fail are set aside,
    unless `aside` is False: a reader that does not hold the run's lock), 'never' → None, else a path (a
    checkpoint dir, or a run dir whose newest valid checkpoint is taken; nothing of it is renamed)."""
    if resume == "never":
        return None
    if resume == "auto":
        return newest_valid(_step_dirs(run_dir), say, aside=aside)
    path = Path(resume).expanduser()
    if (path / MANIFEST).is_file():
        why = problem(path, checksums=True)
        if why is not None:
            raise ConfigError("trainer.resume", f"checkpoint {path} is not usable: {why}")
        return path
    found = newest_valid(_step_dirs(path), say)
    if found is None:
        raise ConfigError("trainer.resume", f"no complete checkpoint at {path}; give a checkpoint dir, a run dir, "
                                            "'auto' or 'never'")
    return found


# save / load ------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, step: int, strategy: Any, dist: Dist, trainer_state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write checkpoint `step` atomically and with checksums; every rank calls this. `strategy.save(dir)` writes
    the model and optimizer state (the backend's own collectives), `dist` agrees on the rest.

    A write error on any rank (a full disk, say) stops every rank with one line; the temp dir is removed and
    the previous checkpoints stay as they were."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    err: BaseException | None = None
    try:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        strategy.save(tmp)
        faults.point("save")
        save_torch(rng_state(), tmp / f"rng_rank{dist.rank}.pt")
        if dist.is_main:
            save_torch(trainer_state, tmp / TRAINER_FILE)
    except Exception as e:  # every rank must learn of it, or the others wait for this one forever
        err = e
    if dist.any(err is not None):
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        io = find_cause(err, (OSError,))
        said = dist.gather(None if err is None else str(io or f"{type(err).__name__}: {err}"))
        if err is not None and io is None:
            raise err  # not a write error: a bug, with its traceback
        what = next((w for w in said or [] if w), "")
        prev = list_checkpoints(run_dir)
        keep = f"the newest good checkpoint stays {prev[-1]}" if prev else "no earlier checkpoint exists"
        raise RunFailed(f"checkpoint: cannot write step {step} to {final.parent} ({what}); {keep}",
                        quiet=not dist.is_main) from None
    dist.barrier()
    names = dist.broadcast(sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
                           if dist.is_main else None)
    mine = describe_files(tmp, names[dist.rank::dist.world_size])  # the ranks share the hashing
    parts = dist.gather(mine)
    if dist.is_main:
        files = {k: v for part in parts for k, v in part.items()}
        manifest = {"format": FORMAT, "step": step, "world_size": dist.world_size, "layout": strategy.layout,
                    "strategy": type(strategy).__name__, "precision": strategy.args.precision.value,
                    "config": trainer_state.get("config"),
                    "early_stopped": bool(trainer_state.get("early_stopped", False)), "files": files}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        replace_dir(tmp, final)  # durable: it fsyncs the parent dir
        prune(run_dir, keep_last, newest=final)
    dist.barrier()
    return final


def prune(run_dir: Path, keep_last: int, newest: Path) -> None:
    """Keep the `keep_last` newest complete checkpoints up to `newest` (the one just written, verified): older
    ones go, and none newer than `newest` is ever removed (a run resumed from an earlier checkpoint)."""
    if keep_last <= 0:
        return
    complete = list_checkpoints(run_dir)
    if newest not in complete:  # the new one did not verify: keep everything older
        return
    upto = [c for c in complete if step_of(c) <= step_of(newest)]
    for stale in upto[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)


def saved_fingerprint(ckpt: Path) -> dict[str, Any] | None:
    """The config fingerprint a checkpoint was written with (None for checkpoints that hold none)."""
    manifest = read_manifest(ckpt)
    if "config" in manifest:
        return manifest["config"]
    return _load(ckpt / TRAINER_FILE).get("config")


def _load(path: Path, map_location: Any = "cpu") -> Any:
    try:
        return load_torch(path, map_location=map_location)
    except UnsafeFile as e:
        raise ConfigError("trainer.resume", e.message) from None


def check_compatible(ckpt: Path, strategy: Any, dist: Dist) -> None:
    """One line when this strategy cannot resume `ckpt`: another checkpoint layout (DeepSpeed's own against the
    one single, ddp and fsdp share, or llmtrain's earlier single/ddp format), or a world size it cannot reshard."""
    from llmtrain.distributed.consolidate import layout

    manifest = read_manifest(ckpt)
    saved = layout(ckpt)  # what its files are (the manifest of an earlier llmtrain names no layout)
    if saved != strategy.layout:
        run = ckpt.parent.parent
        way_out = (f"or start a new run from its weights: llmtrain-export {run} {ckpt} --out <dir>, then "
                   "model.pretrained=<dir>")
        if saved == "legacy":
            why = f"is in the format of an earlier llmtrain (model_optim.pt), which no strategy resumes now; {way_out}"
        else:
            fits = "strategy=deepspeed" if saved == "deepspeed" else "strategy=single, ddp or fsdp"
            why = f"was written in the {saved} layout, which {type(strategy).__name__} does not read; resume it with " \
                  f"{fits}, {way_out}"
        raise ConfigError("trainer.resume", f"checkpoint {ckpt} {why}")
    saved_world = int(manifest["world_size"])
    if saved_world != dist.world_size and (why := strategy.reshard_refusal(saved_world, ckpt)) is not None:
        raise ConfigError("trainer.resume", why)


def load_checkpoint(ckpt: Path, strategy: Any, dist: Dist) -> dict[str, Any]:
    """Restore model/optimizer through the strategy, this rank's RNG, and return the trainer state.

    A checkpoint of another world size loads where the strategy can reshard it (`reshard_refusal` says why
    not); RNG streams then start from the seed (rank r takes rank r's saved stream when there is one)."""
    check_compatible(ckpt, strategy, dist)
    try:
        strategy.load(ckpt)
    except UnsafeFile as e:
        raise ConfigError("trainer.resume", e.message) from None
    trainer_state = _load(ckpt / TRAINER_FILE)
    rng = ckpt / f"rng_rank{dist.rank}.pt"
    if rng.is_file():
        set_rng_state(_load(rng))
    return trainer_state
