"""Who owns an output dir, and publishing a built dataset into it.

A dataset is built in a temp dir beside the output and renamed at the end (`publish`), so a dir holding
meta.json is complete; a concurrent builder with the same inputs that published first wins. A rebuild
replaces only what prepare wrote (meta.json, the shards it lists, tokenizer/, .verified.json): an output dir
holding anything else, a run dir, or a meta.json llmtrain did not write is refused with one line, force or
not, and left as it is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from llmtrain.data.shards import TOKENIZER_FILES, VERIFIED, VERIFIED_TMP, parse_meta
from llmtrain.errors import ConfigError
from llmtrain.rundir import RUN_FILES


def existing_output(out: Path) -> dict[str, Any] | None:
    """The meta.json of an output dir prepare wrote; None when `out` is absent or an empty dir. Refused with
    one line: a file, a run dir, a dir whose meta.json is not llmtrain's, any other non-empty dir."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ConfigError("data.out_dir", f"{out} is a file, not a dir; choose a new or empty dir")
    marker = next((name for name in RUN_FILES if (out / name).exists()), None)
    if marker is not None:
        raise ConfigError("data.out_dir", f"{out} is a run dir (it holds {marker}), not a prepared dataset; it is "
                                          "left as it is: choose a new or empty dir")
    if not (out / "meta.json").exists():
        if any(out.iterdir()):
            raise ConfigError("data.out_dir", f"{out} exists and is not a prepared dataset; choose a new or empty dir")
        return None
    meta = parse_meta(out)
    if isinstance(meta, str):
        raise ConfigError("data.out_dir", f"{out}/meta.json {meta}, so {out} is not a dir prepare wrote; it is "
                                          "left as it is: choose a new or empty dir")
    return meta


def _own(entry: Path, meta: dict[str, Any]) -> bool:
    """Whether `entry` (a top-level file of a prepared dir) is one prepare wrote, per its meta."""
    shards = {s["file"] for split in ("train", "val") for s in meta["shards"][split]}
    named = entry.name in shards or entry.name in ("meta.json", VERIFIED) or VERIFIED_TMP.fullmatch(entry.name)
    return bool(named) and entry.is_file() and not entry.is_symlink()


def foreign_entry(out: Path, meta: dict[str, Any]) -> str | None:
    """The first entry of `out` (by name) that prepare did not write there, per its meta.json; None when there
    is none. Its own: meta.json, the listed shard files, the tokenizer dir's files, .verified.json."""
    tok_dir = meta["tokenizer"].get("dir", "tokenizer")
    for entry in sorted(out.iterdir()):
        if entry.name == tok_dir and entry.is_dir() and not entry.is_symlink():
            for f in sorted(entry.iterdir()):
                if f.name not in TOKENIZER_FILES or f.is_symlink() or not f.is_file():
                    return f"{entry.name}/{f.name}"
        elif not _own(entry, meta):
            return entry.name
    return None


def refuse_foreign(out: Path, meta: dict[str, Any]) -> None:
    """ConfigError naming the first entry of `out` prepare did not write: such a dir is never replaced."""
    if (name := foreign_entry(out, meta)) is not None:
        raise ConfigError("data.out_dir", f"{out} holds {name!r}, which prepare did not write; nothing was replaced "
                                          "(force=true does not change that): move it out, or choose another dir")


def remove_prepared(out: Path, meta: dict[str, Any]) -> None:
    """Delete what prepare wrote in `out` (meta.json last, so a crash leaves a dir that is found damaged), then
    `out` itself; refused (refuse_foreign) when it holds anything else, and then nothing is deleted."""
    refuse_foreign(out, meta)
    tok_dir = out / meta["tokenizer"].get("dir", "tokenizer")
    for entry in sorted(out.iterdir()):
        if entry == tok_dir and entry.is_dir() and not entry.is_symlink():
            for f in entry.iterdir():
                if f.name in TOKENIZER_FILES and f.is_file() and not f.is_symlink():
                    f.unlink(missing_ok=True)
            with contextlib.suppress(FileNotFoundError):
                entry.rmdir()
        elif entry.name != "meta.json" and _own(entry, meta):
            entry.unlink(missing_ok=True)
    left = sorted(e.name for e in out.iterdir() if e.name != "meta.json") if out.exists() else []
    if left:  # arrived since the check: kept, with the meta.json that describes the rest
        raise ConfigError("data.out_dir", f"{out} holds {left[0]!r}, which prepare did not write; it was kept: "
                                          "move it out, or choose another dir")
    (out / "meta.json").unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        out.rmdir()


def publish(tmp: Path, out: Path, digest: str, replace: bool = False) -> None:
    """Rename tmp → out; a concurrent builder that won the race with the same inputs wins (unless `replace`:
    the existing one was found damaged or a rebuild was asked for). What is replaced is only what prepare
    wrote (existing_output, remove_prepared): a dir holding anything else is refused, and left as it is."""
    meta = existing_output(out)
    if meta is not None:
        if meta["hash"] == digest and not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        remove_prepared(out, meta)
    elif out.is_dir():
        with contextlib.suppress(OSError):
            out.rmdir()  # empty (existing_output refuses any other dir without meta.json)
    try:
        os.replace(tmp, out)
    except OSError:
        won = existing_output(out)  # another process published first
        if won is not None and won["hash"] == digest:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise ConfigError("data.out_dir", f"{out} was filled by someone else while preparing; nothing of it was "
                                          "changed: prepare again, or choose another dir") from None
