"""One writer per run dir: `<run>/.lock`, held (flock) by the job that trains into the dir.

The lock file records who holds it (host, pid, start time, command). A second job on the same dir is
refused with one line naming the holder. The kernel drops the lock when its holder dies (even by kill -9),
so a lock left behind by a dead job is simply taken over. Rank 0 holds it for the whole job.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from llmtrain.errors import ConfigError

LOCK_FILE = ".lock"


class RunLock:
    """An exclusive, non-blocking lock on a run dir."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, hint: str = "wait for that run to end or stop it, or train into another dir (name=... or "
                                  "hydra.run.dir=...)") -> str | None:
        """Take the lock, or raise ConfigError naming its holder (and `hint`, what to do instead); returns a
        note when a stale lock was taken over (its holder is gone)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # the file may be unlinked by its holder between our open and our lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise ConfigError("run dir", f"{self.run_dir} is in use by {_who(holder)}; {hint}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked a file its holder has just removed: try the new one
                os.close(fd)
                continue
            stale = _read(fd)
            self._fd = fd
            _write(fd, {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                        "command": " ".join(sys.argv)})
            if stale.get("pid") and not _same_process(stale):
                return f"llmtrain: took over the lock of {_who(stale)}, which is no longer running"
            return None
        raise ConfigError("run dir", f"cannot lock {self.path}: it keeps changing under us")

    def release(self) -> None:
        """Drop the lock (the file goes first, so nobody takes a lock on a file about to vanish)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 1 << 16).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _write(fd: int, rec: dict[str, Any]) -> None:
    data = (json.dumps(rec) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _same_process(rec: dict[str, Any]) -> bool:
    return rec.get("host") == socket.gethostname() and rec.get("pid") == os.getpid()


def _who(rec: dict[str, Any]) -> str:
    if not rec:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec["started"])) if rec.get("started") else "?"
    return f"pid {rec.get('pid', '?')} on {rec.get('host', '?')} (since {since}: {rec.get('command', '?')[:120]})"
