"""Stopping a run cleanly: a signal asks every rank to stop after the current optimizer step.

Ctrl-C (SIGINT) once: the step in flight finishes, a checkpoint is written, the run exits 130 and says
how to resume. Ctrl-C twice: the step is abandoned at once (the newest checkpoint stays the resume point).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C"}


class StopRequest:
    """Which stop signal arrived (None while none did); handlers live only inside `installed()`."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT,), announce: bool = True) -> None:
        self.signals, self.announce = signals, announce
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abandon the step now
        self.signum = signum
        if self.announce:
            name = SIGNAL_NAMES.get(signum, signal.Signals(signum).name)
            again = " (Ctrl-C again to abandon it)" if signum == signal.SIGINT else ""
            print(f"\nllmtrain: {name}: stopping after this step and saving a checkpoint{again}",
                  file=sys.stderr, flush=True)

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle the stop signals within the block (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handle) for s in self.signals}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


_HELD: dict[int, object] = {}


def hold_signals(signals: tuple[int, ...] = (signal.SIGINT,)) -> None:
    """Ignore further stop signals while a stopped run cleans up (a second Ctrl-C then changes nothing);
    `release_signals()` gives the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in signals:
        _HELD.setdefault(s, signal.signal(s, signal.SIG_IGN))


def release_signals() -> None:
    while _HELD:
        s, handler = _HELD.popitem()
        signal.signal(s, handler)  # type: ignore[arg-type]
