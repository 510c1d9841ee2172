"""Fault injection for the reliability tests and `tests/fault_harness.py` (off unless LLMTRAIN_FAULT is set).

`LLMTRAIN_FAULT=<action>:<point>:<n>[:<rank>]` makes the process fail at the n-th time (1-based) it reaches
`point` on `rank` (default 0):

* action `kill`: SIGKILL this process (a power cut, an OOM kill, `kill -9`);
* action `enospc`: the next file write raises OSError(ENOSPC) (a full disk);
* action `nan`: the loss of that micro-batch becomes NaN (point `loss` only);
* actions `term`, `usr1`: send this process SIGTERM / SIGUSR1 (a preemption notice).

Points: `step` (inside an optimizer step, after the backward passes, before the update), `save` (inside a
checkpoint save, after the strategy's files, before the manifest), `export` (inside an export, after the
weights are written, before the rename), `eval` (inside an evaluation, after its first batch), `loss` (each
micro-batch's loss), `write` (any file written through llmtrain.safeio), `metrics` and `samples` (inside an
append to metrics.jsonl / samples.jsonl, after the first half of the line is written and flushed: a kill
leaves a torn last line), `record` (inside a run.json update, after its temp file is written, before the
rename), and `time`: `kill:time:<ms>` kills the process that many milliseconds after it starts training.
`<n>+` matches the n-th time and every later one.
"""

from __future__ import annotations

import errno
import os
import signal
from typing import IO, Any

_SPEC: list[tuple[str, str, int, int, bool]] | None = None
_COUNTS: dict[str, int] = {}
_ARMED: set[str] = set()  # actions due at the next write
_SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "usr1": signal.SIGUSR1}


def _spec() -> list[tuple[str, str, int, int, bool]]:
    global _SPEC
    if _SPEC is None:
        _SPEC = []
        for item in filter(None, os.environ.get("LLMTRAIN_FAULT", "").split(",")):
            parts = item.split(":")
            action, at = parts[0], parts[1]
            n = parts[2] if len(parts) > 2 else "1"
            rank = int(parts[3]) if len(parts) > 3 else 0
            _SPEC.append((action, at, int(n.rstrip("+")), rank, n.endswith("+")))
    return _SPEC


def arm() -> None:
    """Start the clock of a `kill:time:<ms>` fault (called when training starts)."""
    import threading

    for action, at, n, rank, _ in _spec():
        if action == "kill" and at == "time" and rank == _rank():
            t = threading.Timer(n / 1000, os.kill, args=(os.getpid(), signal.SIGKILL))
            t.daemon = True
            t.start()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _hit(name: str) -> str | None:
    """Count a visit to `name`; the action due at this visit (None: none)."""
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    for action, at, n, rank, later in _spec():
        if at == name and rank == _rank() and (_COUNTS[name] == n or later and _COUNTS[name] > n):
            return action
    return None


def reset() -> None:
    """Forget the parsed spec and counts (tests that change LLMTRAIN_FAULT in-process)."""
    global _SPEC
    _SPEC = None
    _COUNTS.clear()
    _ARMED.clear()


def point(name: str) -> None:
    """A place where a fault may be injected; costs a list check when none is configured."""
    if not _spec():
        return
    action = _hit(name)
    if action in _SIGNALS:
        os.kill(os.getpid(), _SIGNALS[action])
    elif action == "enospc":
        _ARMED.add("enospc")


def torn_write(f: IO[str], text: str, name: str) -> None:
    """`f.write(text)`; with a fault configured, in two halves with the point `name` between them (the first
    half flushed, so a kill there leaves a torn line on disk)."""
    if not _spec():
        f.write(text)
        return
    half = len(text) // 2
    f.write(text[:half])
    f.flush()
    point(name)
    f.write(text[half:])


def poison(name: str, loss: Any) -> Any:
    """`loss`, or NaN when a `nan` fault is due at this visit of `name`."""
    if not _spec() or _hit(name) != "nan":
        return loss
    return loss * float("nan")


def disk_write(path: object) -> None:
    """Called before every safeio write: raises ENOSPC when armed (or at the n-th `write` point)."""
    if not _spec():
        return
    point("write")
    if "enospc" in _ARMED:
        _ARMED.discard("enospc")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
