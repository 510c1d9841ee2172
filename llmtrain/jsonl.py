"""The JSON Lines files a run appends to (metrics.jsonl, samples.jsonl), read so that a damaged line never
stops a run or a report; and the one warning line about any damaged run file.

A kill or a full disk during an append leaves a torn last line (no newline at its end, or half a JSON
object). `read_jsonl` drops such a line, and any other line that is not a JSON object, with one warning
line on stderr naming the file; `repair=True` also rewrites the file (atomically) without them, so that the
next append starts on a line of its own instead of gluing onto the fragment.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

_WARNED: set[tuple[str, int, int]] = set()  # (path, size, mtime) of files already warned about


def warn(path: Path, msg: str) -> None:
    """`llmtrain: warning: <path>: <msg>` on stderr, once per process for the same unchanged file."""
    try:
        st = path.stat()
    except OSError:
        pass
    else:
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key in _WARNED:
            return
        _WARNED.add(key)
    print(f"llmtrain: warning: {path}: {msg}", file=sys.stderr, flush=True)


def _scan(data: bytes) -> tuple[list[tuple[bytes, dict[str, Any]]], list[str]]:
    """(raw line, record) of every good line, and a few words on each dropped one."""
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the data ends with a newline, else a line cut off mid-write
    good, bad = [], []
    for no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            rec = None
        if isinstance(rec, dict):
            good.append((raw, rec))
        else:
            bad.append(f"line {no} is not a JSON object")
    if tail.strip():
        bad.append(f"line {len(lines) + 1} is torn: cut off mid-write, no newline at its end")
    return good, bad


def read_jsonl(path: Path, *, keep: Callable[[dict[str, Any]], bool] | None = None,
               repair: bool = False) -> list[dict[str, Any]]:
    """The JSON objects of `path`, one per line, in order ([] when there is no file).

    A line that is not a JSON object, or a last line without its newline, is dropped with one warning.
    keep: a filter on the records. repair: when a line was dropped or filtered out, rewrite the file
    atomically with only the records returned."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    good, bad = _scan(data)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        fixed = "; the file is rewritten without them" if repair else ""
        lines = f"{len(bad)} unreadable line{'s' if len(bad) > 1 else ''}"
        warn(path, f"dropped {lines} ({'; '.join(bad[:3])}{more}){fixed}")
    kept = good if keep is None else [(raw, rec) for raw, rec in good if keep(rec)]
    if repair and (bad or len(kept) != len(good)):
        from llmtrain.safeio import atomic_write_bytes

        atomic_write_bytes(path, b"".join(raw + b"\n" for raw, _ in kept))
    return [rec for _, rec in kept]
