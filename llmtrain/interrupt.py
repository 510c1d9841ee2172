"""Stopping a run cleanly: a signal asks every rank to stop after the current optimizer step.

Ctrl-C (SIGINT) once: the step in flight finishes, a checkpoint is written, the run exits 130 and says
how to resume. Ctrl-C twice: the step is abandoned at once (the newest checkpoint stays the resume point).
Preemption (SIGTERM, or SIGUSR1: SLURM's warning before a time limit) on any rank: every rank finishes the
step, one checkpoint is written and the run exits 0, within `trainer.preempt_grace_s`; past that it exits
143 at once (the newest checkpoint is still a valid resume point: saves are atomic).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_SIGNALS = (signal.SIGINT, *PREEMPT_SIGNALS)
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C"}
EXIT_GRACE_EXPIRED = 128 + signal.SIGTERM


class StopRequest:
    """Which stop signal arrived (None while none did); handlers live only inside `installed()`."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, announce: bool = True,
                 grace_s: float | None = None) -> None:
        self.signals, self.announce, self.grace_s = signals, announce, grace_s
        self.signum: int | None = None
        self._deadline: threading.Timer | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def preempted(self) -> bool:
        return self.signum in PREEMPT_SIGNALS

    def request(self, signum: int) -> None:
        """What a signal does (also called by the launcher watch and by peers' requests)."""
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abandon the step now
        first = self.signum is None
        self.signum = signum
        if signum in PREEMPT_SIGNALS and self._deadline is None and self.grace_s:
            self._deadline = threading.Timer(self.grace_s, _grace_expired, args=(self.grace_s,))
            self._deadline.daemon = True
            self._deadline.start()
        if self.announce and first:
            name = SIGNAL_NAMES.get(signum, signal.Signals(signum).name)
            again = " (Ctrl-C again to abandon it)" if signum == signal.SIGINT else ""
            print(f"\nllmtrain: {name}: stopping after this step and saving a checkpoint{again}",
                  file=sys.stderr, flush=True)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.request(signum)

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
            if self._deadline is not None:
                self._deadline.cancel()


def _grace_expired(grace_s: float) -> None:
    print(f"llmtrain: the stop did not finish within trainer.preempt_grace_s={grace_s:g}; exiting now (the newest "
          "checkpoint stays the resume point)", file=sys.stderr, flush=True)
    os._exit(EXIT_GRACE_EXPIRED)


_HELD: dict[int, object] = {}


def hold_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> None:
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
